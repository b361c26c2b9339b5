"""Test order for pytest-xdist: the tests that start processes and wait on them in real time
first, the many small unit tests last (a plugin of tests/conftest.py).

`./dev test` runs the fast tier with `-n 4` and xdist's default `load` scheduling, which deals the
first quarter of the collected tests out one by one, round robin, and the rest to whichever
worker runs dry. In collection order the few long tests (real processes: the DMTF validators, the
systemd notify runs, the kubelet plugin managers, the wheel build) bunch up late on one or two
workers while the others have finished; dealt out first they spread over all four, and the unit
tests (about 600, most well under 0.1 s) fill in behind them. The order within each group, and
so within each module, is kept."""

from __future__ import annotations

import pytest

#: Directories under tests/ whose tests run first: agent processes watched for seconds of real
#: time (watchdog pings, PID 1 signal handling) and the wheel build.
FIRST = ("systemd", "image", "packaging")
#: ... and last: in-memory and pure-function tests.
LAST = ("unit",)


def _rank(item: pytest.Item) -> int:
    parts = item.nodeid.split("/")
    folder = parts[1] if len(parts) > 2 and parts[0] == "tests" else ""
    return 0 if folder in FIRST else 2 if folder in LAST else 1


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: each group keeps its own order
