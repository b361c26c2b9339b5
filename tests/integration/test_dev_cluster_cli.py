"""`cohdi-agent dev-cluster up|env|status|down` by hand: a background cluster that outlives the
command, and `down` stops exactly the processes `up` started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.devcluster import local

pytestmark = pytest.mark.controlplane


def _cli(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "dev-cluster", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COHDI_DEV_STATE_DIR": str(state)},
        timeout=180,
        check=False,
    )


def test_up_env_status_down(tmp_path: Path) -> None:
    state = tmp_path / "dev"
    up = _cli("up", state=state)
    try:
        assert up.returncode == 0, up.stderr
        assert "export KUBECONFIG=" in up.stdout
        pids = local.running(local.read_state(state) or {})
        assert set(pids) == {"etcd", "kube-apiserver", "kube-scheduler"}

        again = _cli("up", state=state)
        assert again.returncode == 1
        assert "already runs" in again.stderr

        env = _cli("env", state=state)
        assert env.returncode == 0
        assert env.stdout.strip() == f"export KUBECONFIG={state / 'admin.kubeconfig'}"
        status = _cli("status", state=state)
        assert status.returncode == 0
        assert status.stdout.count("running, pid") == 3
    finally:
        down = _cli("down", state=state)
    assert down.returncode == 0
    assert "kube-apiserver" in down.stdout
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or _zombie_or_gone(pid)
    assert _cli("env", state=state).returncode == 1


def _zombie_or_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
