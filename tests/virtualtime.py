"""An asyncio event loop on virtual time, for unit tests of timers, leases and backoff.

`loop.time()` starts at 0 and jumps straight to the next scheduled timer whenever nothing is ready,
so `asyncio.sleep(30)` costs no wall time and a run is the same on an idle or a loaded machine.
Real I/O still works (the selector is polled without blocking), but a test that waits on I/O
alone would spin; the tests using this loop talk to in-memory fakes only.

    result = virtualtime.run(main())   # from a plain (sync) test function

An async test marked `@pytest.mark.virtualtime` (or a module with `pytestmark =
pytest.mark.virtualtime`) under tests/unit/ runs on this loop too (tests/unit/conftest.py). Code
that reads a clock of its own must be given this loop's: `clocks()` returns (wall, monotonic)
of the running loop — virtual ones here, `time.time`/`time.monotonic` on any other loop.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _Selector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        self._loop.now += self._loop.tick
        ready: list[Any] = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("virtual time: nothing is ready and no timer is due (a deadlock)")
        self._loop.now += timeout  # nothing to do until the next timer: jump to it
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """`tick`: virtual seconds each turn of the loop takes. With 0 time stands still while
    anything is ready; a small tick is what a real clock does, and keeps code that re-checks a
    deadline it computed as `deadline - now` (a float rounding to 1e-17 s left, say) from
    re-arming a timer at the same instant forever."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now = 0.0
        self.tick = tick
        #: the wall clock (epoch seconds) at virtual time 0
        self.epoch = time.time()
        super().__init__(selector=_Selector(self))

    def time(self) -> float:
        return self.now

    def wall(self) -> float:
        """Epoch seconds in virtual time: as `time.time()` would read after `now` seconds."""
        return self.epoch + self.now


def ticking() -> VirtualTimeLoop:
    """A loop whose every turn takes 1 µs of virtual time (the pytest marker's loop)."""
    return VirtualTimeLoop(tick=1e-6)


def clocks() -> tuple[Callable[[], float], Callable[[], float]]:
    """(wall clock in epoch seconds, monotonic clock) for code under test on the running loop."""
    loop = asyncio.get_running_loop()
    if isinstance(loop, VirtualTimeLoop):
        return loop.wall, loop.time
    return time.time, time.monotonic


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a fresh virtual-time loop."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main)
