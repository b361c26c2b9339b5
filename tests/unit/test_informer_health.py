"""The informer through an API-server outage, on the in-memory API server and virtual time: one
WARNING when it starts, DEBUG while it lasts, one INFO when the server answers again; `healthy`
and `last_error` say where it stands; a 429's Retry-After is waited out; the store catches up."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from agent import errors
from agent.kube.watching import Informer
from agent.testing.fakekube import FakeKube, Request
from tests import virtualtime

CMS = "/api/v1/namespaces/default/configmaps"


def cm(name: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {}}


def test_an_outage_logs_one_line_each_way_and_flips_healthy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.kube.watching")
    seen: dict[str, object] = {}

    async def main() -> None:
        kube = FakeKube(bookmark_interval=1.0, request_timeout=1.0)
        await kube.create(CMS, cm("a"))
        informer = Informer(kube, CMS, name="cms", backoff_max=5.0)
        task = asyncio.create_task(informer.run())
        await asyncio.sleep(2.0)
        seen["before"] = (informer.healthy, informer.last_error)
        kube.set_down(True)
        await asyncio.sleep(120.0)  # two minutes of retries, at most every 5 s
        seen["during"] = (informer.healthy, type(informer.last_error))
        kube.set_down(False)
        await kube.create(CMS, cm("b"))  # written while the informer may still be waiting
        await asyncio.sleep(10.0)
        seen["after"] = (informer.healthy, sorted(name for _, name in informer.store))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await kube.close()

    virtualtime.run(main())
    assert seen["before"] == (True, None)
    assert seen["during"] == (False, errors.KubeUnavailable)
    assert seen["after"] == (True, ["a", "b"])
    by_level = {
        level: [r.getMessage() for r in caplog.records if r.levelno == level]
        for level in (logging.WARNING, logging.INFO, logging.DEBUG)
    }
    retries = [m for m in by_level[logging.DEBUG] if "retry in" in m]
    recovered = [m for m in by_level[logging.INFO] if "recovered after" in m]
    print(
        f"\n120 s outage: {len(by_level[logging.WARNING])} WARNING, {len(retries)} DEBUG retries,"
        f" {recovered}"
    )
    assert len(by_level[logging.WARNING]) == 1
    assert "KubeUnavailable" in by_level[logging.WARNING][0]
    assert len(retries) >= 120 / 5 - 5  # the retries go on, quietly
    assert len(recovered) == 1
    took = float(re.search(r"recovered after ([0-9.]+) s", recovered[0]).group(1))  # type: ignore[union-attr]
    assert took >= 120.0  # counted from the first failure, on the loop's clock


def test_a_429_retry_after_is_waited_out() -> None:
    lists: list[float] = []

    async def main() -> Informer:
        loop = asyncio.get_running_loop()
        kube = FakeKube(request_timeout=1.0)

        def observe(request: Request) -> None:
            if request.verb == "list":
                lists.append(loop.time())

        kube.on_request(observe)
        kube.fail("GET", CMS, status=429, reason="TooManyRequests", retry_after=7)
        informer = Informer(kube, CMS, name="cms")
        task = asyncio.create_task(informer.run())
        await asyncio.sleep(20.0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await kube.close()
        return informer

    informer = virtualtime.run(main())
    assert len(lists) == 2
    assert lists[1] - lists[0] >= 7.0
    assert informer.healthy
    assert isinstance(informer.last_error, errors.KubeUnavailable)
    assert informer.last_error.retry_after == 7.0
