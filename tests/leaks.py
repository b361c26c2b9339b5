"""Blame a leaked resource on the test that leaked it (a plugin of tests/conftest.py).

A socket or transport left open is reported (ResourceWarning, an error under this suite's
`filterwarnings = error`) only when the garbage collector finds it, which may be minutes and many
tests later: the control-plane tier once failed `test_device_health` for a connection another
test had left behind. After each control-plane test, once its fixtures (and its event loop) are
torn down, a full collection runs, and what it finds fails that test's teardown, named. The fast
tier's ~1000 short tests skip it: a full collection per test would cost more than the tier's
whole run of unit tests, and their worlds are in memory.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Generator

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    result = yield  # the fixtures, the event loop included, are torn down
    if item.get_closest_marker("controlplane") is None:
        return result
    found: list[str] = []

    def record(u: sys.UnraisableHookArgs) -> None:
        found.append(f"{u.err_msg or 'Exception ignored in'}: {u.object!r}: {u.exc_value!r}")

    previous, sys.unraisablehook = sys.unraisablehook, record
    try:
        gc.collect()
    finally:
        sys.unraisablehook = previous
    if found:
        raise AssertionError(f"{item.nodeid} left behind:\n" + "\n".join(found))
    return result
