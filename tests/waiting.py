"""Waiting for the cluster to reach a state: poll with a deadline, and say what was last seen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def until(
    probe: Callable[[], Awaitable[T]],
    *,
    what: str,
    timeout: float = 30.0,  # noqa: ASYNC109 -- a deadline on polling, not an I/O timeout
    interval: float = 0.1,
) -> T:
    """Await `probe()` until it returns something truthy; fail with the last value after
    `timeout` seconds. (A deadline for a test that would otherwise hang, not a timing assert.)"""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last seen: {last!r}")
