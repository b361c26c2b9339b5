"""Test order for pytest-xdist: the tests that start processes and wait on them in real time
first, the many small unit tests last (a plugin of tests/conftest.py).

`./dev test` runs the fast tier with `-n 4` and xdist's default `load` scheduling, which hands
each worker a first chunk of consecutive tests (a sixteenth of them) and then more as it runs
dry. The fast tier's tests take from a millisecond to ten seconds, and a handful of long ones
(agent processes watched in real time, the wheel build, the DMTF validators, the kubelet plugin
managers) in one chunk set the floor for the whole run. So here the default chunk is one test
(`--maxschedchunk 1` unless given: each worker keeps two queued and takes the next as one ends)
and the long-waiting ones come first, so they start on different workers at once and the unit
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


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "maxschedchunk", 0) is None:  # xdist's option, not given
        config.option.maxschedchunk = 1


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: each group keeps its own order
