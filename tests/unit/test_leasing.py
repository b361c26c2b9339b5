"""Leader election against the in-memory API server (`agent.testing.fakekube`), on virtual time:
an outage longer than the renew deadline costs exactly one loss and one re-acquisition, then
leadership is quiet; the renewal warnings name their reason; a partitioned leader stops before
anyone else starts; answers slower than the renew deadline do not make leadership flap.

Outages come in two kinds: `hang` (the API server is frozen, as SIGSTOP does: every request stalls
until the client's request timeout) and `refuse` (connections are refused at once).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, cast

import pytest

from agent import errors
from agent.kube.client import Kube, Obj
from agent.kube.leasing import LeaderElector
from agent.testing.fakekube import FakeKube
from tests import virtualtime

DURATION, RENEW, RETRY = 3.0, 2.0, 0.25
REQUEST_TIMEOUT = 1.0
FOREVER = 10**9


class Partitionable:
    """One replica's view of a shared FakeKube that can be cut off alone (a network partition):
    while `cut`, its requests stall for the request timeout and fail."""

    def __init__(self, kube: FakeKube) -> None:
        self.kube = kube
        self.cut = False

    async def _check(self, what: str) -> None:
        if self.cut:
            await asyncio.sleep(REQUEST_TIMEOUT)
            raise errors.KubeUnavailable(f"{what}: no answer within {REQUEST_TIMEOUT} s")

    async def get(self, path: str) -> Obj:
        await self._check(f"GET {path}")
        return await self.kube.get(path)

    async def create(self, path: str, body: Obj) -> Obj:
        await self._check(f"POST {path}")
        return await self.kube.create(path, body)

    async def replace(self, path: str, body: Obj) -> Obj:
        await self._check(f"PUT {path}")
        return await self.kube.replace(path, body)


class Record:
    """When each elector's `lead()` started and stopped (virtual seconds)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float | None]] = []

    def worker(self, who: str) -> Any:
        async def lead() -> None:
            loop = asyncio.get_running_loop()
            index = len(self.spans)
            self.spans.append((who, loop.time(), None))
            try:
                await asyncio.Event().wait()
            finally:
                self.spans[index] = (who, self.spans[index][1], loop.time())

        return lead

    def starts(self, who: str) -> int:
        return sum(1 for w, _, _ in self.spans if w == who)

    def stops(self, who: str) -> int:
        return sum(1 for w, _, end in self.spans if w == who and end is not None)

    def assert_no_overlap(self, now: float) -> None:
        spans = sorted(
            ((w, s, now if e is None else e) for w, s, e in self.spans), key=lambda x: x[1]
        )
        for (w1, _, e1), (w2, s2, _) in itertools.pairwise(spans):
            assert e1 <= s2, f"{w1} acted until {e1:.3f} but {w2} started at {s2:.3f}"


def elector(client: FakeKube | Partitionable, who: str) -> LeaderElector:
    loop = asyncio.get_running_loop()
    return LeaderElector(
        cast(Kube, client),
        namespace="kube-system",
        name="lease",
        identity=who,
        lease_duration=DURATION,
        renew_deadline=RENEW,
        retry_period=RETRY,
        clock=loop.time,
    )


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.mark.parametrize("outage", ["hang", "refuse"])
def test_outage_longer_than_renew_deadline_costs_one_loss_then_quiet(
    outage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue: after a 5 s outage the agent re-acquired the Lease that still named it but kept the
    acquire time of its first term, so every new term's deadline had already passed: "became
    leader" and "lost leadership" alternated for as long as it ran."""
    caplog.set_level(logging.DEBUG, logger="agent.kube.leasing")
    record = Record()

    async def main() -> None:
        kube = FakeKube(request_timeout=REQUEST_TIMEOUT)
        task = asyncio.create_task(elector(kube, "a").run(record.worker("a")))
        await asyncio.sleep(DURATION)
        assert record.starts("a") == 1
        if outage == "hang":
            kube.hang(seconds=FOREVER, times=FOREVER)
        else:
            kube.set_down(True)
        await asyncio.sleep(5.0)
        kube.clear_faults()
        kube.set_down(False)
        await asyncio.sleep(100 * DURATION)  # 1,200 retry periods
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    virtualtime.run(main())
    became, lost = messages(caplog, "became leader"), messages(caplog, "lost leadership")
    print(f"\n{outage}: became leader x{len(became)}, lost leadership x{len(lost)}")
    assert (record.starts("a"), record.stops("a")) == (2, 2)  # the second stop: the task's cancel
    assert (len(became), len(lost)) == (2, 1)
    failures = messages(caplog, "lease renewal failed")
    assert failures, "the outage must show as failed renewals"
    for line in failures:
        reason = line.split("lease renewal failed:", 1)[1].strip()
        assert reason, f"a renewal warning without a reason: {line!r}"
    if outage == "hang":
        assert any("timed out after" in line for line in failures), failures


def test_partitioned_leader_steps_down_then_stays_a_follower(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The leader is cut off for longer than the lease duration: it stops by its renew deadline,
    the other takes over only after a full lease duration, and when the first comes back it
    stays a follower. Each side changes state exactly once; nobody ever acts together."""
    caplog.set_level(logging.DEBUG, logger="agent.kube.leasing")
    record = Record()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        kube = FakeKube(request_timeout=REQUEST_TIMEOUT)
        ca, cb = Partitionable(kube), Partitionable(kube)
        ta = asyncio.create_task(elector(ca, "a").run(record.worker("a")))
        await asyncio.sleep(DURATION)
        tb = asyncio.create_task(elector(cb, "b").run(record.worker("b")))
        await asyncio.sleep(DURATION)
        assert (record.starts("a"), record.starts("b")) == (1, 0)
        cut = loop.time()
        ca.cut = True
        await asyncio.sleep(4 * DURATION)
        ca.cut = False
        a_span = record.spans[0]
        assert a_span[2] is not None
        assert a_span[2] - cut <= RENEW
        (b_span,) = [s for s in record.spans if s[0] == "b"]
        assert b_span[1] - cut >= DURATION
        await asyncio.sleep(100 * DURATION)
        record.assert_no_overlap(loop.time())
        for t in (ta, tb):
            t.cancel()
        await asyncio.gather(ta, tb, return_exceptions=True)

    virtualtime.run(main())
    assert (record.starts("a"), record.starts("b")) == (1, 1)
    assert len(messages(caplog, "lost leadership")) == 1
    assert len(messages(caplog, "became leader")) == 2


def test_slow_acquisition_does_not_flap(caplog: pytest.LogCaptureFixture) -> None:
    """Answers slower than the renew deadline: an acquisition that comes back after its own
    deadline is not leadership (its term would already be over), so the elector keeps trying
    instead of starting and stopping its work once per attempt."""
    caplog.set_level(logging.DEBUG, logger="agent.kube.leasing")
    record = Record()

    async def main() -> None:
        kube = FakeKube(request_timeout=REQUEST_TIMEOUT * 10)
        kube.hang(seconds=RENEW / 2 + 0.1, times=FOREVER)  # a get and a write: > RENEW
        task = asyncio.create_task(elector(kube, "a").run(record.worker("a")))
        await asyncio.sleep(20 * DURATION)
        assert record.starts("a") == 0
        kube.clear_faults()
        await asyncio.sleep(20 * DURATION)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    virtualtime.run(main())
    print(f"\nslow: became leader x{len(messages(caplog, 'became leader'))}")
    assert len(messages(caplog, "lost leadership")) == 0
    assert len(messages(caplog, "became leader")) == 1
