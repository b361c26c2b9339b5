"""The emulator on loopback (HTTPS with its generated CA) and a client of each protocol."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from agent.fabric.credentials import Secret
from agent.fabric.emulator import config
from agent.fabric.emulator.config import DEFAULT_TENANT
from agent.fabric.emulator.server import EmulatorServer
from agent.fabric.fti import FtiFabric
from agent.fabric.protocol import FabricManager
from agent.fabric.redfish import RedfishFabric
from agent.fabric.transport import FabricHttp

PASSWORD = "s3cret-fabric-pass"
A100 = "NVIDIA-A100-PCIE-40GB"
H100 = "NVIDIA-H100-PCIE-80GB"


def small_config(latency: float = 0.0) -> config.EmulatorConfig:
    return config.example(password=PASSWORD, nodes=2, gpus=4, latency=latency)


@pytest.fixture
async def emulator(tmp_path: Path) -> AsyncIterator[EmulatorServer]:
    server = EmulatorServer(
        small_config(), state_file=tmp_path / "fabric-state.json", tls_dir=tmp_path / "tls"
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def make_client(
    server: EmulatorServer,
    backend: str,
    *,
    ca: Path | None = None,
    timeout: float = 5.0,
    retries: int = 3,
    password: str = PASSWORD,
    operation_timeout: float = 30.0,
) -> FabricManager:
    http = FabricHttp(
        base_url=server.url,
        ca_bundle=str(ca or server.ca_file),
        timeout=timeout,
        retries=retries,
    )
    if backend == "redfish":
        return RedfishFabric(
            http, user="admin", password=Secret(password), operation_timeout=operation_timeout
        )
    return FtiFabric(
        http,
        user="admin",
        password=Secret(password),
        tenant=DEFAULT_TENANT,
        models=(A100, H100),
        operation_timeout=operation_timeout,
    )


@pytest.fixture(params=["redfish", "fti"])
async def client(
    request: pytest.FixtureRequest, emulator: EmulatorServer
) -> AsyncIterator[FabricManager]:
    fabric = make_client(emulator, request.param)
    try:
        yield fabric
    finally:
        await fabric.close()


async def admin(server: EmulatorServer, method: str, path: str, body: object = None) -> object:
    """Call the emulator's admin API (the test's hand on the fabric)."""
    assert server.ca_file is not None
    import ssl

    ctx = ssl.create_default_context(cafile=str(server.ca_file))
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, f"{server.url}/emulator/v1{path}", json=body, ssl=ctx) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def until(
    server: EmulatorServer,
    predicate: Callable[[], bool],
    timeout: float = 10.0,  # noqa: ASYNC109
) -> None:
    """Wait for the emulator's state to satisfy `predicate` (woken by its change notifications)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await server.state.wait_change(server.state.seq, 0.5)
