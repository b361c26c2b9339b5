"""tests/unit: async tests marked `virtualtime` run on the virtual-time loop (tests/virtualtime.py),
every other async test on asyncio's default loop, as everywhere else.

The in-memory worlds (FakeKube, an in-memory fabric, the node double) do no real I/O, so their
tests need no real time: a grace of 30 s, a settle period or a retry backoff passes at once, and
a run is the same on an idle or a loaded machine."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest

from tests import virtualtime


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "virtualtime: run this async test on tests/virtualtime.py's loop (tests/unit only)",
    )


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """pytest-asyncio's hook: the loop each async test here runs on (a mapping is required for
    every one of them once the hook exists)."""
    if item.get_closest_marker("virtualtime"):
        return {"virtualtime": virtualtime.ticking}
    return {"asyncio": asyncio.new_event_loop}
