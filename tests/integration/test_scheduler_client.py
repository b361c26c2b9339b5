"""The local control plane takes kube-scheduler's API client limiter (qps/burst) as a parameter,
and the scheduler runs with it (its own /configz says so); left unset, the scheduler keeps its
defaults (qps 50, burst 100)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent import settings
from agent.devcluster import local
from agent.devcluster.controlplane import ControlPlane

pytestmark = pytest.mark.controlplane


def _client_connection(cp: ControlPlane) -> dict[str, Any]:
    doc: Any = cp.scheduler_config()
    conn: dict[str, Any] = doc["componentconfig"]["clientConnection"]
    return conn


def test_scheduler_runs_with_the_client_qps_and_burst_given(tmp_path: Path) -> None:
    cp = ControlPlane(
        binaries=local.binaries(settings.Settings().cache_dir),
        state_dir=tmp_path / "cp",
        scheduler_qps=400.0,
        scheduler_burst=800,
    )
    cp.start()
    try:
        conn = _client_connection(cp)
    finally:
        cp.stop()
    assert (conn["qps"], conn["burst"]) == (400, 800)


def test_scheduler_keeps_its_defaults_when_none_is_given(control_plane: ControlPlane) -> None:
    conn = _client_connection(control_plane)
    assert (conn["qps"], conn["burst"]) == (50, 100)
