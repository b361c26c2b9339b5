"""Process entry point: `cohdi-agent` and `python -m agent`.

The only place that installs uvloop: `asyncio.Runner(loop_factory=uvloop.new_event_loop)`.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any


def run_async(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run `main` on a uvloop event loop; Ctrl-C cancels it cleanly and exits 130."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            return runner.run(main())
        except KeyboardInterrupt:
            return 130


def main(argv: list[str] | None = None) -> int:
    from agent import cli

    return cli.main(sys.argv[1:] if argv is None else argv, run_async=run_async)


if __name__ == "__main__":
    sys.exit(main())
