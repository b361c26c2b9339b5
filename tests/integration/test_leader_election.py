"""Leader election on a real Lease: exactly one leads, a stopped leader hands over within the lease
duration, and a leader cut off from the API server stops acting before anyone else starts.

Each elector's `lead()` records when it starts and stops acting (monotonic clock, one process, so
the two timelines are comparable); the assertions are about those intervals never overlapping.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from agent.devcluster.controlplane import ControlPlane
from agent.kube.client import Kube
from agent.kube.leasing import LeaderElector
from tests.conftest import kubeconfig_via
from tests.tcpproxy import TcpProxy
from tests.waiting import until

pytestmark = pytest.mark.controlplane

DURATION, RENEW, RETRY = 3.0, 2.0, 0.25


class Timeline:
    def __init__(self) -> None:
        self.intervals: list[tuple[str, float, float]] = []
        self.open: dict[str, float] = {}

    def worker(self, who: str):  # type: ignore[no-untyped-def]
        async def lead() -> None:
            self.open[who] = time.monotonic()
            try:
                await asyncio.Event().wait()  # "acting" until cancelled
            finally:
                self.intervals.append((who, self.open.pop(who), time.monotonic()))

        return lead

    def leaders_now(self) -> list[str]:
        return list(self.open)

    def assert_no_overlap(self) -> None:
        now = time.monotonic()
        spans = sorted(
            [*self.intervals, *((w, s, now) for w, s in self.open.items())], key=lambda x: x[1]
        )
        for (w1, _, e1), (w2, s2, _) in itertools.pairwise(spans):
            assert e1 <= s2, f"{w1} acted until {e1:.3f} but {w2} started at {s2:.3f}"


def elector(kube: Kube, lease: str, who: str) -> LeaderElector:
    return LeaderElector(
        kube,
        namespace="kube-system",
        name=lease,
        identity=who,
        lease_duration=DURATION,
        renew_deadline=RENEW,
        retry_period=RETRY,
    )


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_one_leader_and_graceful_handover(kube: Kube) -> None:
    lease = f"le-{uuid.uuid4().hex[:6]}"
    timeline = Timeline()
    a, b = elector(kube, lease, "a"), elector(kube, lease, "b")
    tasks = {
        "a": asyncio.create_task(a.run(timeline.worker("a"))),
        "b": asyncio.create_task(b.run(timeline.worker("b"))),
    }
    try:
        await until(lambda: _some(timeline), what="a leader")
        await asyncio.sleep(DURATION)  # both campaign for a full lease duration...
        assert len(timeline.leaders_now()) == 1  # ...and exactly one leads
        first = timeline.leaders_now()[0]
        other = "b" if first == "a" else "a"
        stopped_at = time.monotonic()
        await _stop(tasks[first])  # graceful: cancels the work, then releases the Lease
        await until(
            lambda: _is(timeline, other), what=f"{other} to take over", timeout=DURATION * 2
        )
        handover = time.monotonic() - stopped_at
        assert handover <= DURATION, f"handover took {handover:.2f} s"
        lease_obj = await kube.get(
            f"/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/{lease}"
        )
        assert lease_obj["spec"]["holderIdentity"] == other
        assert lease_obj["spec"]["leaseTransitions"] >= 1
        timeline.assert_no_overlap()
    finally:
        for t in tasks.values():
            await _stop(t)
    timeline.assert_no_overlap()


async def test_partitioned_leader_stops_before_successor_starts(
    control_plane: ControlPlane, kube: Kube, tmp_path: Path
) -> None:
    """The leader loses the API server (no release possible): it must stop acting at its renew
    deadline, and the other may start only after a full lease duration without renewals."""
    lease = f"le-{uuid.uuid4().hex[:6]}"
    proxy = TcpProxy(control_plane.apiserver_port)
    port = await proxy.start()
    timeline = Timeline()
    async with await Kube.connect(
        kubeconfig=str(kubeconfig_via(control_plane, port, tmp_path / "kc")), request_timeout=1.0
    ) as cut_kube:
        a, b = elector(cut_kube, lease, "a"), elector(kube, lease, "b")
        ta = asyncio.create_task(a.run(timeline.worker("a")))
        try:
            await until(lambda: _is(timeline, "a"), what="a to lead")
            tb = asyncio.create_task(b.run(timeline.worker("b")))
            await asyncio.sleep(DURATION)
            assert timeline.leaders_now() == ["a"]
            cut_at = time.monotonic()
            proxy.block()
            await until(lambda: _is(timeline, "b"), what="b to take over", timeout=DURATION * 3)
            took = time.monotonic() - cut_at
            (a_span,) = [s for s in timeline.intervals if s[0] == "a"]
            # a stopped acting by its renew deadline (plus one request timeout of slack)...
            assert a_span[2] - cut_at <= RENEW + 1.0 + RETRY
            # ...and b waited for the lease to expire by its own clock.
            assert took >= DURATION - RETRY
            timeline.assert_no_overlap()
            proxy.unblock()
            await asyncio.sleep(DURATION)  # a is back, but b holds the Lease
            assert timeline.leaders_now() == ["b"]
            await _stop(tb)
        finally:
            await _stop(ta)
            await proxy.close()
    timeline.assert_no_overlap()


async def test_apiserver_stopped_past_the_renew_deadline_costs_one_term(
    control_plane: ControlPlane, kube: Kube, caplog: pytest.LogCaptureFixture
) -> None:
    """kube-apiserver frozen (SIGSTOP) for longer than the renew deadline, then resumed: the
    leader stops acting once, takes its Lease back once, and then leads quietly. (It used to
    re-acquire with its first term's timer and lose and regain leadership every retry period.)"""
    caplog.set_level(logging.INFO, logger="agent.kube.leasing")
    lease = f"le-{uuid.uuid4().hex[:6]}"
    timeline = Timeline()
    task = asyncio.create_task(elector(kube, lease, "a").run(timeline.worker("a")))
    apiserver = control_plane.pids()["kube-apiserver"]
    try:
        await until(lambda: _is(timeline, "a"), what="a to lead")
        os.kill(apiserver, signal.SIGSTOP)
        try:
            await until(lambda: _none(timeline), what="a to stop acting", timeout=DURATION * 3)
            await asyncio.sleep(DURATION)  # frozen for RENEW + DURATION in all
        finally:
            os.kill(apiserver, signal.SIGCONT)
        await until(lambda: _is(timeline, "a"), what="a to lead again", timeout=60)
        await asyncio.sleep(4 * DURATION)  # 48 retry periods
    finally:
        await _stop(task)
    records = [r.getMessage() for r in caplog.records]
    became = [m for m in records if "became leader" in m]
    lost = [m for m in records if "lost leadership" in m]
    failed = [m for m in records if "lease renewal failed" in m]
    print(f"\nbecame leader x{len(became)}, lost leadership x{len(lost)}; failures: {failed}")
    assert (len(became), len(lost)) == (2, 1)
    assert len(timeline.intervals) == 2  # the first term, and the second one ended by _stop
    assert all(m.split("failed:", 1)[1].strip() for m in failed), failed


async def _none(timeline: Timeline) -> bool:
    return not timeline.leaders_now()


async def _some(timeline: Timeline) -> bool:
    return bool(timeline.leaders_now())


async def _is(timeline: Timeline, who: str) -> bool:
    return timeline.leaders_now() == [who]
