"""Retry pacing, one kit for every retry loop of the agent.

- `Backoff`: per-key exponential delays with jitter and a cap (client-go's
  ItemExponentialFailureRateLimiter, plus jitter so keys that failed together do not retry
  together);
- `TokenBucket`: an overall retry rate with a burst (client-go's BucketRateLimiter, i.e.
  golang.org/x/time/rate reservations);
- `RateLimiter`: both at once, the longer delay wins, and a server's Retry-After is honoured —
  client-go's DefaultControllerRateLimiter (MaxOf(per-item exponential, bucket)). A failure storm
  over many keys is bounded by the bucket; one stubborn key by its own backoff;
- `parse_retry_after`: the HTTP `Retry-After` header (delay-seconds or an HTTP-date, RFC 9110
  §10.2.3) in seconds;
- `FailureStreak`: consecutive failures of one retried operation, so a loop logs a line per change
  of state (first failure, recovery) instead of one per attempt.

Delays are seconds (float). Clocks are monotonic seconds (`time.monotonic` or a loop's `time`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import math
import random
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from agent import errors

K = TypeVar("K", bound=Hashable)

Clock = Callable[[], float]
#: `uniform(a, b)` -> a float in [a, b]; tests pass a fixed one.
Uniform = Callable[[float, float], float]


def loop_time() -> float:
    """The running event loop's clock (monotonic seconds; virtual in tests that run on one)."""
    return asyncio.get_running_loop().time()


#: A Retry-After longer than this is cut to it: a wrong header must not park a key for days.
RETRY_AFTER_MAX = 300.0


class Backoff(Generic[K]):
    """Per-key exponential backoff: the n-th consecutive failure of a key waits
    `min(cap, base * factor**(n-1))` scaled by a random factor in `[1 - jitter, 1]` (jitter only
    shortens, so the cap holds and delays still grow when `jitter < 1 - 1/factor`). `forget(key)`
    after a success starts the key over at `base`."""

    def __init__(
        self,
        *,
        base: float = 0.1,
        cap: float = 30.0,
        factor: float = 2.0,
        jitter: float = 0.2,
        uniform: Uniform = random.uniform,
    ) -> None:
        if not (0 < base <= cap and factor >= 1 and 0 <= jitter < 1):
            raise errors.ConfigError(
                "backoff",
                (base, cap, factor, jitter),
                "0 < base <= cap, factor >= 1, 0 <= jitter < 1",
            )
        self.base, self.cap, self.factor, self.jitter = base, cap, factor, jitter
        #: Failures past this many wait the cap (and factor**n never overflows).
        self._steps = math.ceil(math.log(cap / base, factor)) if factor > 1 and cap > base else 0
        self._uniform = uniform
        self._failures: dict[K, int] = {}

    def delay(self, key: K) -> float:
        """Count one more failure of `key`; seconds to wait before retrying it."""
        n = self._failures.get(key, 0) + 1
        self._failures[key] = n
        raw = self.base * self.factor ** min(n - 1, self._steps)
        return min(self.cap, raw) * self._uniform(1.0 - self.jitter, 1.0)

    def failures(self, key: K) -> int:
        """Consecutive failures counted for `key` since it was last forgotten."""
        return self._failures.get(key, 0)

    def forget(self, key: K) -> None:
        self._failures.pop(key, None)

    def __len__(self) -> int:
        """Keys with at least one failure counted."""
        return len(self._failures)


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; starts full. `reserve()` takes a token
    and says how long to wait for it; reservations queue (the balance may go negative), so n
    callers at once are spaced 1/rate apart once the burst is spent."""

    def __init__(self, *, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        if not (rate > 0 and burst >= 1):
            raise errors.ConfigError("token bucket", (rate, burst), "rate > 0 and burst >= 1")
        self.rate, self.burst = rate, burst
        self._clock = clock
        self._tokens = float(burst)
        self._last: float | None = None

    def reserve(self) -> float:
        """Take one token; seconds until it is available (0.0 when one is there now)."""
        now = self._clock()
        if self._last is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class RateLimiter(Generic[K]):
    """When to retry a key: the longest of its own backoff, the server's Retry-After (up to
    `retry_after_max`) and the overall bucket's wait."""

    def __init__(
        self,
        backoff: Backoff[K] | None = None,
        bucket: TokenBucket | None = None,
        *,
        retry_after_max: float = RETRY_AFTER_MAX,
    ) -> None:
        self.backoff: Backoff[K] = backoff if backoff is not None else Backoff()
        self.bucket = bucket
        self.retry_after_max = retry_after_max

    def when(self, key: K, *, retry_after: float | None = None) -> float:
        """Count a failure of `key`; seconds until it may be retried."""
        delay = self.backoff.delay(key)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.retry_after_max))
        if self.bucket is not None:
            delay = max(delay, self.bucket.reserve())
        return delay

    def failures(self, key: K) -> int:
        return self.backoff.failures(key)

    def forget(self, key: K) -> None:
        self.backoff.forget(key)


def retry_after_of(exc: BaseException) -> float | None:
    """The seconds a server asked us to wait before retrying, if the error carries them."""
    return exc.retry_after if isinstance(exc, errors.AgentError) else None


def parse_retry_after(value: str | None, *, now: dt.datetime | None = None) -> float | None:
    """`Retry-After: 120` or `Retry-After: Fri, 31 Dec 1999 23:59:59 GMT` -> seconds from `now`
    (default: the wall clock, as the date is the server's wall clock), never negative; None when
    absent or unreadable."""
    if not value or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - (now or dt.datetime.now(dt.UTC))).total_seconds())


class FailureStreak:
    """Consecutive failures of one retried operation (a watch, a lease campaign), so its loop
    logs one line per change of state: `fail()` says whether a failure deserves a loud line (it
    starts the streak, or is of another kind than the previous one); `succeed()` ends the streak
    and says how long it lasted."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.failures = 0
        self.since: float | None = None
        self.last_error: BaseException | None = None

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def fail(self, exc: BaseException) -> bool:
        """Count a failure; True when it starts the streak or changes its kind."""
        loud = self.failures == 0 or type(exc) is not type(self.last_error)
        if self.failures == 0:
            self.since = self._clock()
        self.failures += 1
        self.last_error = exc
        return loud

    def succeed(self) -> float | None:
        """End the streak: the seconds from its first failure to now, or None if there was none."""
        if not self.failures or self.since is None:
            return None
        took = self._clock() - self.since
        self.failures, self.since = 0, None
        return took


def describe(exc: BaseException, *, timeout: float | None = None) -> str:
    """An error as a log line can show it: never empty. A `TimeoutError` (whose str is empty)
    says how long was waited when `timeout` is given."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"timed out after {timeout:.1f} s" if timeout is not None else "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
