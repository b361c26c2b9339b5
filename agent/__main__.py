"""Process entry point: `cohdi-agent` and `python -m agent`.

The only place that installs uvloop: `asyncio.Runner(loop_factory=uvloop.new_event_loop)`.

SIGTERM stops every command, also as PID 1 of a container, where the kernel gives SIGTERM no
default action (an unhandled one is ignored, and `docker stop` or the kubelet then waits out its
grace period and kills): an asynchronous command's task is cancelled and it exits 0 (`run` and
`demo` install handlers of their own, which replace this one while they run: `demo` exits
128 + the signal's number); a synchronous one raises SystemExit(143) (128 + SIGTERM, as a shell
reports a process SIGTERM ended).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any


def run_async(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run `main` on a uvloop event loop; Ctrl-C cancels it cleanly and exits 130, SIGTERM
    cancels it and exits 0 (unless `main` handles SIGTERM itself)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            return runner.run(_stopped_by_sigterm(main))
        except KeyboardInterrupt:
            return 130


async def _stopped_by_sigterm(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    task = asyncio.current_task()
    assert task is not None
    stopped = False

    def stop() -> None:
        nonlocal stopped
        stopped = True
        task.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)
    try:
        return await main()
    except asyncio.CancelledError:
        if stopped:
            return 0
        raise


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    from agent import cli

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return cli.main(sys.argv[1:] if argv is None else argv, run_async=run_async)


if __name__ == "__main__":
    sys.exit(main())
