"""The retry kit (`agent.backoff`) and the keyed work queue that uses it, on virtual time: delays
grow per key and stop at the cap, a token bucket bounds the overall rate, a server's Retry-After
is waited out, permanent errors are dropped until the key is enqueued again."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections import defaultdict

import pytest

from agent import errors
from agent.backoff import (
    Backoff,
    FailureStreak,
    RateLimiter,
    TokenBucket,
    describe,
    parse_retry_after,
    retry_after_of,
)
from agent.controllers.queueing import KeyedQueue
from tests import virtualtime


def longest(a: float, b: float) -> float:
    return b


def shortest(a: float, b: float) -> float:
    return a


# --- the kit -------------------------------------------------------------------------------------


def test_backoff_doubles_per_key_up_to_the_cap_and_forget_starts_over() -> None:
    backoff: Backoff[str] = Backoff(base=0.1, cap=2.0, uniform=longest)
    assert [round(backoff.delay("a"), 3) for _ in range(7)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert backoff.delay("b") == 0.1  # keys are independent
    assert (backoff.failures("a"), len(backoff)) == (7, 2)
    backoff.forget("a")
    assert backoff.failures("a") == 0
    assert backoff.delay("a") == 0.1
    for _ in range(5000):  # no overflow however long a key keeps failing
        last = backoff.delay("c")
    assert last == 2.0


def test_jitter_only_shortens_and_delays_still_grow() -> None:
    low: Backoff[str] = Backoff(base=0.1, cap=2.0, jitter=0.2, uniform=shortest)
    assert [round(low.delay("a"), 3) for _ in range(6)] == [0.08, 0.16, 0.32, 0.64, 1.28, 1.6]
    real: Backoff[str] = Backoff(base=0.1, cap=2.0, jitter=0.2)
    delays = [real.delay("a") for _ in range(5)]
    assert all(d1 < d2 for d1, d2 in itertools.pairwise(delays)), delays
    assert all(0.8 * 0.1 * 2**i <= d <= 0.1 * 2**i for i, d in enumerate(delays)), delays
    with pytest.raises(errors.ConfigError):
        Backoff(base=1.0, cap=0.5)


def test_token_bucket_spends_its_burst_then_spaces_reservations() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.reserve() for _ in range(5)] == [0.0, 0.0, 0.0, 0.5, 1.0]
    now[0] = 100.0  # refills, but never beyond the burst
    assert [bucket.reserve() for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]


def test_rate_limiter_takes_the_longest_of_backoff_retry_after_and_bucket() -> None:
    now = [0.0]
    limiter: RateLimiter[str] = RateLimiter(
        Backoff(base=0.1, cap=10.0, uniform=longest),
        TokenBucket(rate=1.0, burst=2, clock=lambda: now[0]),
        retry_after_max=60.0,
    )
    assert limiter.when("a") == 0.1
    assert limiter.when("a", retry_after=5.0) == 5.0  # the server's wish beats the backoff
    assert limiter.when("b") == 1.0  # the bucket is empty: one token a second
    now[0] = 50.0
    assert limiter.when("c", retry_after=3600.0) == 60.0  # an absurd Retry-After is cut
    assert limiter.failures("a") == 2
    limiter.forget("a")
    assert limiter.when("a") == 0.1


def test_parse_retry_after_seconds_and_http_dates() -> None:
    now = dt.datetime(2026, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 1 ") == 1.0
    assert parse_retry_after("Fri, 01 May 2026 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Fri, 01 May 2026 11:00:00 GMT", now=now) == 0.0  # past: now
    for bad in (None, "", "soon", "-3", "nan", "inf"):
        assert parse_retry_after(bad, now=now) is None, bad


def test_errors_carry_retry_after_to_the_kit() -> None:
    assert retry_after_of(errors.KubeUnavailable("x", status=429, retry_after=2.0)) == 2.0
    assert retry_after_of(errors.KubeConflict("x")) is None
    assert retry_after_of(ValueError("x")) is None


def test_failure_streak_is_loud_once_per_change_of_state() -> None:
    now = [10.0]
    streak = FailureStreak(clock=lambda: now[0])
    assert streak.succeed() is None
    assert streak.fail(errors.KubeUnavailable("down")) is True
    now[0] = 12.5
    assert streak.fail(errors.KubeUnavailable("still down")) is False
    assert streak.fail(errors.KubeForbidden("rbac")) is True  # another kind of failure
    assert (streak.failing, streak.failures) == (True, 3)
    now[0] = 14.0
    assert streak.succeed() == 4.0
    assert not streak.failing
    assert streak.fail(errors.KubeUnavailable("again")) is True


def test_describe_never_gives_an_empty_reason() -> None:
    assert describe(TimeoutError(), timeout=2.0) == "timed out after 2.0 s"
    assert describe(TimeoutError()) == "timed out"
    assert describe(errors.KubeUnavailable("GET /x: 503")) == "KubeUnavailable: GET /x: 503"
    assert describe(RuntimeError()) == "RuntimeError"


# --- the keyed queue ---------------------------------------------------------------------------


class Calls:
    """Loop times at which the handler saw each key; what each call raises in turn (None: it
    succeeds; the last entry repeats)."""

    def __init__(self) -> None:
        self.at: defaultdict[str, list[float]] = defaultdict(list)
        self.raises: dict[str, list[Exception | None]] = {}

    async def handle(self, key: str) -> None:
        self.at[key].append(asyncio.get_running_loop().time())
        plan = self.raises.get(key) or [None]
        outcome = plan.pop(0) if len(plan) > 1 else plan[0]
        if outcome is not None:
            raise outcome


async def running(queue: KeyedQueue[str], seconds: float) -> None:
    task = asyncio.create_task(queue.run())
    try:
        await asyncio.sleep(seconds)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_transient_errors_are_retried_with_growing_delays_then_forgotten() -> None:
    calls = Calls()
    unavailable = errors.KubeUnavailable("503")

    async def main() -> KeyedQueue[str]:
        queue: KeyedQueue[str] = KeyedQueue("t", calls.handle, workers=4, backoff_max=30.0)
        calls.raises["k"] = [*[unavailable] * 5, None]
        queue.enqueue("k")
        await running(queue, 60.0)
        return queue

    queue = virtualtime.run(main())
    times = calls.at["k"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    print(f"\nretry gaps: {[round(g, 3) for g in gaps]}")
    assert len(times) == 6  # five failures, then the success
    assert all(g1 < g2 for g1, g2 in itertools.pairwise(gaps)), gaps
    assert 0.08 <= gaps[0] <= 0.1
    assert (queue.retries, queue.failures("k"), queue.depth) == (5, 0, 0)


def test_permanent_errors_are_dropped_until_the_key_is_enqueued_again() -> None:
    calls = Calls()

    async def main() -> None:
        queue: KeyedQueue[str] = KeyedQueue("t", calls.handle, workers=2)
        calls.raises["k"] = [errors.KubeInvalid("422")]
        queue.enqueue("k")
        await running(queue, 100.0)
        assert (len(calls.at["k"]), queue.retries, queue.depth) == (1, 0, 0)
        queue.enqueue("k")  # an event: the object changed
        await running(queue, 1.0)
        assert len(calls.at["k"]) == 2

    virtualtime.run(main())


def test_a_servers_retry_after_is_waited_out() -> None:
    calls = Calls()

    async def main() -> None:
        queue: KeyedQueue[str] = KeyedQueue("t", calls.handle)
        calls.raises["k"] = [errors.KubeUnavailable("429", status=429, retry_after=7.0), None]
        queue.enqueue("k")
        await running(queue, 20.0)

    virtualtime.run(main())
    first, second = calls.at["k"]
    assert second - first == pytest.approx(7.0)


def test_the_overall_bucket_bounds_the_retry_rate_of_many_failing_keys() -> None:
    """200 keys fail at once and keep failing. Per-key backoff alone retries each about 7 times
    in 20 s (some 1,400 retries); the queue's bucket (10/s, burst 100) allows 100 + 10 * 20."""
    keys = [f"k{i}" for i in range(200)]
    window = 20.0

    def storm(limiter: RateLimiter[str] | None) -> tuple[int, Calls]:
        calls = Calls()

        async def main() -> None:
            queue: KeyedQueue[str] = KeyedQueue("t", calls.handle, workers=32, limiter=limiter)
            for key in keys:
                calls.raises[key] = [errors.FabricUnavailable("down")]
                queue.enqueue(key)
            await running(queue, window)
            assert queue.retries >= sum(len(calls.at[k]) - 1 for k in keys)

        virtualtime.run(main())
        return sum(len(calls.at[k]) - 1 for k in keys), calls

    bounded, calls = storm(None)  # the queue's default limiter
    unbounded, _ = storm(RateLimiter(Backoff(base=0.1, cap=30.0)))
    print(f"\n200 failing keys, {window:.0f} s: {bounded} retries, {unbounded} without the bucket")
    assert all(calls.at[k] for k in keys)  # every key was handled once right away
    assert bounded <= 100 + 10 * window + 1
    assert bounded >= 10 * window  # the bucket's rate is used, not starved
    assert unbounded > 1000


def test_depth_and_forget() -> None:
    calls = Calls()

    async def main() -> None:
        queue: KeyedQueue[str] = KeyedQueue("t", calls.handle)
        queue.enqueue("a")
        queue.enqueue("a")  # coalesced
        queue.enqueue_after("b", 10.0)
        queue.enqueue_after("a", 10.0)
        assert queue.depth == 2
        queue.forget("b")  # its object is gone: no delayed enqueue any more
        assert queue.depth == 1
        await running(queue, 30.0)
        assert queue.depth == 0

    virtualtime.run(main())
    assert "b" not in calls.at
    assert len(calls.at["a"]) == 2  # once at once, once after its timer
