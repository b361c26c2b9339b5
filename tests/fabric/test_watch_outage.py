"""The fabric watch (both backends) never gives up: started while the fabric manager is
unreachable it keeps trying, the first read included, records the state on `fabric.link`, and logs
one line per change of state (unreachable, reachable again), not one per attempt. A refusal that
retrying cannot fix soon (wrong password) is retried too, slowly, with its reason visible.

Before the fix, the Redfish watch read its first inventory outside its retry: the watch raised
FabricUnavailable after 5 attempts (and the cluster role exited within 3 s)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import pytest

from agent import errors
from agent.fabric import link as linkmod
from agent.fabric.credentials import Secret
from agent.fabric.emulator.config import DEFAULT_TENANT
from agent.fabric.emulator.server import EmulatorServer
from agent.fabric.fti import FtiFabric
from agent.fabric.protocol import FabricManager
from agent.fabric.redfish import RedfishFabric
from agent.fabric.transport import FabricHttp
from agent.model.fabric import Inventory
from tests.fabric.conftest import A100, H100, PASSWORD
from tests.tcpproxy import TcpProxy
from tests.waiting import until


def client_via(port: int, server: EmulatorServer, backend: str, password: str) -> FabricManager:
    http = FabricHttp(
        base_url=f"https://127.0.0.1:{port}", ca_bundle=str(server.ca_file), timeout=2, retries=2
    )
    if backend == "redfish":
        return RedfishFabric(http, user="admin", password=Secret(password), poll_interval=0.05)
    return FtiFabric(
        http,
        user="admin",
        password=Secret(password),
        tenant=DEFAULT_TENANT,
        models=(A100, H100),
        poll_interval=0.05,
    )


@pytest.fixture
async def proxy(emulator: EmulatorServer) -> AsyncIterator[TcpProxy]:
    port = int(emulator.url.rsplit(":", 1)[1])
    p = TcpProxy(port)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    """Poll `predicate()` until true (a deadline so a broken watch fails instead of hanging)."""

    async def probe() -> bool:
        return predicate()

    await until(probe, what=what, timeout=20, interval=0.02)


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.mark.parametrize("backend", ["redfish", "fti"])
async def test_watch_started_while_the_fabric_is_down_waits_for_it(
    backend: str,
    emulator: EmulatorServer,
    proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    proxy.block()
    fabric = client_via(proxy.port, emulator, backend, PASSWORD)
    seen: list[Inventory] = []

    async def consume() -> None:
        async for inv in fabric.watch():
            seen.append(inv)

    task = asyncio.create_task(consume())
    try:
        await wait_for(lambda: proxy.refused >= 8, "the watch to retry several times")
        assert not task.done(), "the watch must not end while the fabric is down"
        assert seen == []
        assert fabric.link.up is False
        assert "unreachable" in (fabric.link.reason or "")
        print(f"\n{backend}: {proxy.refused} connections refused, link: {fabric.link.reason}")
        assert len(lines(caplog, "unreachable")) == 1, "one line per change of state"
        assert not lines(caplog, "attempt"), "no line per retry"

        proxy.unblock()
        await wait_for(lambda: len(seen) == 1, "the first inventory once the fabric is up")
        assert fabric.link.up is True
        assert fabric.link.reason is None
        assert len(seen[0].devices) >= 4
        assert len(lines(caplog, "reachable again")) == 1

        # down again, up again: one more line each; a change is then seen
        refused = proxy.refused
        proxy.block()
        await wait_for(lambda: proxy.refused >= refused + 4, "retries during the second outage")
        assert len(lines(caplog, "unreachable:")) == 2
        proxy.unblock()
        await wait_for(lambda: fabric.link.up is True, "the fabric reachable again")
        inv = await fabric.inventory()
        free = next(d for d in inv.devices if d.state.value == "free" and d.model == A100)
        machine = inv.machines[0].id
        await fabric.attach(free.id, machine, model=A100)
        await wait_for(lambda: len(seen) >= 2, "the attach seen by the watch")
        assert len(lines(caplog, "reachable again")) == 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await fabric.close()


@pytest.mark.parametrize("backend", ["redfish", "fti"])
async def test_watch_refused_credentials_retries_slowly_with_the_reason(
    backend: str,
    emulator: EmulatorServer,
    proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(linkmod, "PERMANENT_RETRY", 0.1)
    fabric = client_via(proxy.port, emulator, backend, "wrong-password")
    failures: list[str] = []
    record = fabric.link.lost

    def lost(exc: errors.AgentError) -> None:
        failures.append(type(exc).__name__)
        record(exc)

    monkeypatch.setattr(fabric.link, "lost", lost)
    task = asyncio.create_task(anext(aiter(fabric.watch())))
    try:
        await wait_for(lambda: len(failures) >= 3, "three refused reads")
        reason = fabric.link.reason or ""
        print(f"\n{backend}: {len(failures)} refused reads, link: {reason}")
        assert set(failures) == {"FabricAuthError"}
        assert "refuses us" in reason
        assert not task.done()
        assert len(lines(caplog, "refuses us")) == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await fabric.close()
