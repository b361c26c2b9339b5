"""An asyncio event loop on virtual time, for unit tests of timers, leases and backoff.

`loop.time()` starts at 0 and jumps straight to the next scheduled timer whenever nothing is ready,
so `asyncio.sleep(30)` costs no wall time and a run is the same on an idle or a loaded machine.
Real I/O still works (the selector is polled without blocking), but a test that waits on I/O
alone would spin; the tests using this loop talk to in-memory fakes only.

    result = virtualtime.run(main())   # from a plain (sync) test function
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _Selector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        ready: list[Any] = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("virtual time: nothing is ready and no timer is due (a deadlock)")
        self._loop.now += timeout  # nothing to do until the next timer: jump to it
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(selector=_Selector(self))

    def time(self) -> float:
        return self.now


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a fresh virtual-time loop."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main)
