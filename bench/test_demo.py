"""The demo as a benchmark: `cohdi-agent demo` (its own local control plane, the emulator with
0.2 s attach latency, 4 simulated GPU servers running the real node role, the cluster role, 24
pods in three bursts over 30 s) once with warm capacity off and once with --demo-warm-devices
idle GPUs of each model kept attached per node, one round each, so both land in the same JSON.

extra_info is the demo's own summary (agent.demo.running.figures): pods bound, how many warm
(an already-attached GPU: no binding-condition wait) and cold, and submit → bound (all, warm,
cold) with the cold pods' allocated → ready and ready → bound. The target: with warm capacity,
submit → bound p50 ≤ 1 s and at least two thirds of the pods bound with no wait.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from agent import settings
from agent.demo import running
from bench.conftest import Site


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "warm" in metafunc.fixturenames:
        warm = metafunc.config.getoption("--demo-warm-devices")
        metafunc.parametrize("warm", [0, warm], ids=["warm-off", f"warm-{warm}"])


def test_demo(
    benchmark: Any,
    site: Site,
    runner: asyncio.Runner,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    warm: int,
) -> None:
    if not site.embedded:
        pytest.skip("the demo runs on a local control plane of its own")
    pods = request.config.getoption("--demo-pods")
    # A short directory: the simulated servers' plugin sockets live under it, and a unix
    # socket's path must fit in 107 bytes (pytest's tmp_path is too deep).
    short = Path(tempfile.mkdtemp(prefix="cohdi-demo-"))
    request.addfinalizer(lambda: shutil.rmtree(short, ignore_errors=True))
    cfg = settings.Settings(
        cluster=settings.ClusterSettings(warm_devices=warm),
        dev=settings.DevClusterSettings(state_dir=str(short / "state")),
    )
    status: list[int] = []

    def demo() -> None:
        status.append(
            runner.run(
                running.run(
                    cfg,
                    pods=pods,
                    duration=30.0,
                    nodes=4,
                    gpus=16,
                    attach_latency=0.2,
                    keep=False,
                )
            )
        )

    benchmark.pedantic(demo, rounds=1, iterations=1)
    summary = short / "demo" / "summary.json"
    figures: dict[str, Any] = json.loads(summary.read_text()) if summary.exists() else {}
    phases = figures.get("phases", {})
    benchmark.extra_info.update(
        warm_devices=warm,
        demo_exit_status=status[0] if status else None,
        bound_without_wait_fraction=round(
            figures.get("warm", 0) / max(figures.get("bound", 0), 1), 2
        ),
        submit_to_bound=phases.get("all: pod submitted → pod bound"),
        **figures,
    )
