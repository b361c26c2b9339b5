"""Repeated failures are retried with backoff and logged once per change of state, not once per
retry: a WARNING when they start (or change kind), DEBUG while they repeat, INFO when the work
succeeds again.

Before: every retry of a cluster-role work queue was a WARNING, and the node role retried a
resource it could not report on every second, with a WARNING each time (an API server away for a
minute was a warning a second per resource)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from pathlib import Path

import pytest

from agent import errors
from agent.backoff import Backoff, RateLimiter, TokenBucket, loop_time
from agent.controllers.queueing import KeyedQueue
from agent.kube.resources import RESOURCES, resource_name
from tests.unit.test_cluster_role_fake import world
from tests.unit.test_decisions import node_role, root  # noqa: F401 -- the fixture
from tests.waiting import until


async def test_a_failing_key_is_one_warning_then_debug_then_one_recovery_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.controllers.queueing")
    attempts = 0

    async def handle(key: str) -> None:
        nonlocal attempts
        attempts += 1
        if attempts <= 6:
            raise errors.KubeUnavailable("GET /x: cannot reach the API server")

    fast = RateLimiter(
        Backoff(base=0.005, cap=0.02), TokenBucket(rate=1000, burst=1000, clock=loop_time)
    )
    queue: KeyedQueue[str] = KeyedQueue("test", handle, workers=1, limiter=fast)
    task = asyncio.create_task(queue.run())
    try:
        queue.enqueue("k")
        await until(_async(lambda: attempts >= 7), what="the seventh attempt", interval=0.01)
        await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    by_level = {
        level: [r.getMessage() for r in caplog.records if r.levelno == level]
        for level in (logging.WARNING, logging.DEBUG, logging.INFO)
    }
    print(by_level)
    assert len(by_level[logging.WARNING]) == 1
    assert "repeats logged at DEBUG" in by_level[logging.WARNING][0]
    assert len(by_level[logging.DEBUG]) == 5
    assert by_level[logging.INFO] == ["test: k: handled again after failures"]
    assert queue.retries == 6


def _async(probe: object) -> object:
    async def check() -> object:
        return probe()  # type: ignore[operator]

    return check


async def test_node_role_retries_a_failed_report_with_backoff_and_logs_the_change_only(
    root: Path,  # noqa: F811 -- the fixture imported above
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.node.reporting")
    async with world(double=False) as w:
        name = resource_name("gpu-1")
        w.new_claim("c1")
        w.allocate("c1", "gpu-1", "node-0")
        await w.wait(
            lambda: ((w.resource(name) or {}).get("status") or {}).get("state") == "Online",
            "gpu-1 attached",
            60,
        )
        # then the API server refuses the node's NodeReady write five times (503)
        w.kube.fail("PATCH", f"{RESOURCES}/{name}/status", status=503, times=5)
        async with node_role(w, "node-0", root) as preparer:
            preparer.reporter._backoff = Backoff(base=0.02, cap=0.2, jitter=0.0)  # fast
            await w.wait(lambda: w.condition("c1", "FabricDeviceReady"), "c1 ready", 60)
    records = [r for r in caplog.records if name in r.getMessage()]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    debugs = [r.getMessage() for r in records if r.levelno == logging.DEBUG]
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    delays = [float(m) for m in re.findall(r"retry in ([0-9.]+) s", " ".join(warnings + debugs))]
    print("\n".join([*warnings, *debugs, *infos]))
    assert len(warnings) == 1
    assert len(debugs) == 4
    assert delays == sorted(delays)
    assert delays[-1] > delays[0], "the retries back off"
    assert any("handled again after failures" in m for m in infos)
