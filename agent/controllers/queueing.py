"""Keyed work queues: one ordered stream of work per object key, keys processed in parallel.

`enqueue(key)` marks a key dirty; a worker takes it, calls `handle(key)`, and if the key was
marked again meanwhile, handles it again (never two handlers for one key at once, never a lost
wake-up). A handler that raises a transient error is retried after an exponential per-key
backoff; a permanent error is logged and dropped until the key is enqueued again by an event.
Handlers are level-triggered: they read the current state, so coalescing events is safe.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from agent import errors

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


class KeyedQueue(Generic[K]):
    def __init__(
        self,
        name: str,
        handle: Callable[[K], Awaitable[None]],
        *,
        workers: int = 32,
        backoff_max: float = 30.0,
    ) -> None:
        self.name = name
        self._handle = handle
        self._workers = workers
        self._backoff_max = backoff_max
        self._ready: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._active: set[K] = set()
        self._again: set[K] = set()
        self._failures: dict[K, int] = {}
        self._timers: dict[K, asyncio.TimerHandle] = {}

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
                self._failures.pop(key, None)
            except asyncio.CancelledError:
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

    def _retry(self, key: K, exc: BaseException, *, transient: bool) -> None:
        if not transient:
            logger.error("%s: %s: %s (not retried until it changes)", self.name, key, exc)
            return
        n = self._failures.get(key, 0) + 1
        self._failures[key] = n
        delay = min(0.1 * 2 ** (n - 1), self._backoff_max) * random.uniform(0.8, 1.2)  # noqa: S311
        logger.warning("%s: %s: %s; retry %d in %.1f s", self.name, key, exc, n, delay)
        self.enqueue_after(key, delay)
