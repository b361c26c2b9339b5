"""Events aggregated like Kubernetes' own recorder, and never lost in silence.

Before: every Event had `count: 1` (20 identical failures were 20 Events), and an Event the API
server refused (RBAC forbidding `create events`) was dropped with a DEBUG line only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent.kube.eventing import Recorder
from agent.testing.fakekube import FakeKube
from tests.waiting import until

EVENTS = "/api/v1/namespaces/default/events"


def _claim(name: str = "c1", uid: str = "uid-1") -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": "default", "uid": uid, "resourceVersion": "7"},
    }


@contextlib.asynccontextmanager
async def recording(kube: FakeKube, capacity: int = 4096) -> AsyncIterator[Recorder]:
    recorder = Recorder(kube, component="cohdi-agent", instance="test", capacity=capacity)
    task = asyncio.create_task(recorder.run())
    try:
        yield recorder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _written(kube: FakeKube, reason: str, count: int) -> list[dict[str, Any]]:
    async def probe() -> list[dict[str, Any]]:
        found = [e for e in kube.objects("events") if e["reason"] == reason]
        return found if sum(e["count"] for e in found) == count else []

    return await until(probe, what=f"{count} {reason} occurrences written", interval=0.01)


async def test_twenty_repeated_failures_are_one_event_with_count_20() -> None:
    kube = FakeKube()
    async with recording(kube) as recorder:
        for i in range(20):
            recorder.emit(_claim(), "AttachDeadline", "no device within 480 s", warning=True)
            if i % 3 == 0:  # let some writes happen in between: create, then patches
                await asyncio.sleep(0.01)
        (event,) = await _written(kube, "AttachDeadline", 20)
    print(f"20 failures -> {len(kube.objects('events'))} Event, count {event['count']}")
    assert event["count"] == 20
    assert event["type"] == "Warning"
    assert event["involvedObject"]["uid"] == "uid-1"
    assert event["lastTimestamp"] >= event["firstTimestamp"]
    creates = [r for r in kube.requests if r.method == "POST" and "/events" in r.path]
    patches = [r for r in kube.requests if r.method == "PATCH" and "/events/" in r.path]
    assert len(creates) == 1
    assert 1 <= len(patches) < 20, "occurrences during a write are folded into the next one"


async def test_other_object_reason_or_message_is_another_event() -> None:
    kube = FakeKube()
    async with recording(kube) as recorder:
        recorder.emit(_claim(), "Detached", "gpu-1 detached from node-0")
        recorder.emit(_claim(), "Detached", "gpu-2 detached from node-0")
        recorder.emit(_claim("c2", "uid-2"), "Detached", "gpu-1 detached from node-0")
        recorder.emit(_claim(), "ScaleDown", "gpu-1 detached from node-0")
        found = await _written(kube, "Detached", 3)
        await _written(kube, "ScaleDown", 1)
    assert sorted(e["count"] for e in found) == [1, 1, 1]


async def test_an_expired_event_starts_a_new_one() -> None:
    kube = FakeKube()
    async with recording(kube) as recorder:
        recorder.emit(_claim(), "NodeGone", "node-0 is gone", warning=True)
        (first,) = await _written(kube, "NodeGone", 1)
        kube.remove(f"{EVENTS}/{first['metadata']['name']}")  # Events live an hour
        recorder.emit(_claim(), "NodeGone", "node-0 is gone", warning=True)
        (second,) = await _written(kube, "NodeGone", 2)
    assert second["metadata"]["name"] != first["metadata"]["name"]


async def test_forbidden_events_are_a_warning_once_and_recovery_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kube = FakeKube()
    kube.fail("POST", EVENTS, status=403, times=5, reason="Forbidden", message="RBAC says no")
    caplog.set_level(logging.DEBUG, logger="agent.kube.eventing")
    async with recording(kube) as recorder:
        for i in range(5):
            recorder.emit(_claim(f"c{i}", f"u{i}"), "DeviceReady", "ready")
        await until(lambda: _done(recorder, 5), what="five refusals counted", interval=0.01)
        recorder.emit(_claim("c9", "u9"), "DeviceReady", "ready")
        await _written(kube, "DeviceReady", 1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    print("\n".join(r.getMessage() for r in warnings + infos))
    assert len(warnings) == 1, "one line when it starts, not one per Event"
    assert "cannot write Events" in warnings[0].getMessage()
    assert "Forbidden" in warnings[0].getMessage() or "403" in warnings[0].getMessage()
    assert len(infos) == 1
    assert "written again" in infos[0].getMessage()
    assert "5 dropped" in infos[0].getMessage()


async def _done(recorder: Recorder, dropped: int) -> bool:
    return recorder.dropped == dropped


async def test_memory_is_bounded() -> None:
    kube = FakeKube()
    async with recording(kube, capacity=8) as recorder:
        for i in range(50):
            recorder.emit(_claim(f"c{i}", f"u{i}"), "AttachRequested", "attaching")
        await _written(kube, "AttachRequested", 50)
        assert len(recorder._series) == 8
