"""Keyed work queues: one ordered stream of work per object key, keys processed in parallel.

`enqueue(key)` marks a key dirty; a worker takes it, calls `handle(key)`, and if the key was
marked again meanwhile, handles it again (never two handlers for one key at once, never a lost
wake-up). A handler that raises a transient error is retried after the queue's rate limiter says
so (`agent.backoff.RateLimiter`): the longest of the key's exponential backoff (0.1 s doubling up
to `backoff_max`, with jitter), the server's Retry-After if the error carries one, and an overall
token bucket shared by every key of the queue (10 retries a second, bursts of 100, as client-go's
default controller rate limiter) — so a failure storm over many keys cannot hammer the API server
or the fabric. A permanent error is logged and dropped until the key is enqueued again by an
event. Handlers are level-triggered: they read the current state, so coalescing events is safe.

Logging follows the state of each key, not each retry: a WARNING when its failures start or
change kind, DEBUG for the retries in between, INFO when it succeeds again (with how many
retries it took), so an API server away for a minute is a few lines, not one per retry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Final, Generic, TypeVar

from agent import errors
from agent.backoff import (
    Backoff,
    RateLimiter,
    TokenBucket,
    describe,
    loop_time,
    retry_after_of,
)

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

#: First retry delay of a key, seconds; it doubles per consecutive failure up to `backoff_max`.
RETRY_BASE: Final = 0.1
#: Retries a second over all keys of one queue, and how many may come at once.
RETRY_RATE: Final = 10.0
RETRY_BURST: Final = 100


class KeyedQueue(Generic[K]):
    """`enqueue`/`enqueue_after` from event handlers, `await run()` in the component's task group.

    `limiter` replaces the default retry pacing (tests, or a queue that wants its own rate)."""

    def __init__(
        self,
        name: str,
        handle: Callable[[K], Awaitable[None]],
        *,
        workers: int = 32,
        backoff_max: float = 30.0,
        limiter: RateLimiter[K] | None = None,
    ) -> None:
        self.name = name
        self._handle = handle
        self._workers = workers
        self._limiter: RateLimiter[K] = limiter or RateLimiter(
            Backoff(base=min(RETRY_BASE, backoff_max), cap=backoff_max),
            TokenBucket(rate=RETRY_RATE, burst=RETRY_BURST, clock=loop_time),
        )
        self._ready: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._active: set[K] = set()
        self._again: set[K] = set()
        self._timers: dict[K, asyncio.TimerHandle] = {}
        #: Retries scheduled after transient failures, since the queue was made.
        self.retries = 0
        #: key -> the class of its last transient failure, while it keeps failing (for logging
        #: one line per change of state)
        self._failing: dict[K, type[BaseException]] = {}

    @property
    def depth(self) -> int:
        """Keys waiting to be handled: queued, marked again while being handled, or waiting on
        a timer (a retry or `enqueue_after`); each key counted once."""
        waiting = self._queued | self._again
        return len(waiting) + sum(1 for key in self._timers if key not in waiting)

    def failures(self, key: K) -> int:
        """Consecutive transient failures of `key` (0 after a success or `forget`)."""
        return self._limiter.failures(key)

    def enqueue(self, key: K) -> None:
        if key in self._active:
            self._again.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._ready.put_nowait(key)

    def enqueue_after(self, key: K, delay: float) -> None:
        """Enqueue once `delay` seconds from now (one pending timer per key: the earliest wins)."""
        loop = asyncio.get_running_loop()
        old = self._timers.get(key)
        when = loop.time() + delay
        if old is not None and old.when() <= when:
            return
        if old is not None:
            old.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _recovered(self, key: K) -> None:
        if self._failing.pop(key, None) is not None:
            logger.info("%s: %s: handled again after failures", self.name, key)

    def forget(self, key: K) -> None:
        """Drop what the queue remembers of `key` (its object is gone, say): its failure count,
        so a next failure starts at the first delay again, and a pending delayed enqueue. A key
        already queued or being handled still is."""
        self._limiter.forget(key)
        self._failing.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.enqueue(key)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for i in range(self._workers):
                tg.create_task(self._worker(), name=f"{self.name}-worker-{i}")

    async def _worker(self) -> None:
        while True:
            key = await self._ready.get()
            self._queued.discard(key)
            self._active.add(key)
            try:
                await self._handle(key)
                self._limiter.forget(key)
                self._recovered(key)
            except asyncio.CancelledError:
                # Stopped mid-handle (a supervised loop restarting): a later run() handles the
                # key again instead of losing it until its next event.
                self._active.discard(key)
                self._again.discard(key)
                self.enqueue(key)
                raise
            except errors.AgentError as exc:
                self._retry(key, exc, transient=exc.transient)
            except Exception as exc:  # a bug: log it loudly, retry slowly, keep the others going
                logger.exception("%s: handling %s failed", self.name, key)
                self._retry(key, exc, transient=True)
            finally:
                self._active.discard(key)
            if key in self._again:
                self._again.discard(key)
                self.enqueue(key)

    def _retry(self, key: K, exc: Exception, *, transient: bool) -> None:
        if not transient:
            self._limiter.forget(key)
            self._failing.pop(key, None)
            logger.error("%s: %s: %s (not retried until it changes)", self.name, key, describe(exc))
            return
        delay = self._limiter.when(key, retry_after=retry_after_of(exc))
        self.retries += 1
        loud = self._failing.get(key) is not type(exc)
        self._failing[key] = type(exc)
        logger.log(
            logging.WARNING if loud else logging.DEBUG,
            "%s: %s: %s; retry %d in %.1f s%s",
            self.name,
            key,
            describe(exc),
            self._limiter.failures(key),
            delay,
            " (with backoff; repeats logged at DEBUG)" if loud else "",
        )
        self.enqueue_after(key, delay)
