"""The emulator on loopback (HTTPS with its generated CA) and a client of each protocol."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.devcluster.controlplane import free_port
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
#: DMTF's mockups (unmodified copies; read only).
MOCKUPS = Path(__file__).resolve().parents[2].parent / "shared" / "redfish-mockups"


def mockup_config(directory: Path, **options: object) -> config.EmulatorConfig:
    """The emulator serving the DMTF mockup in `directory`, user admin/PASSWORD."""
    return config.parse(
        {
            "mockup": {"dir": str(directory), **options},
            "users": [{"name": "admin", "password": PASSWORD}],
        }
    )


def edited_mockup(
    tmp_path: Path, name: str, edits: dict[str, Callable[[dict[str, Any]], None]]
) -> Path:
    """A copy of DMTF mockup `name` with `edits` (URI below /redfish/v1 -> change in place)."""
    out = tmp_path / name
    shutil.copytree(MOCKUPS / name, out)
    for uri, edit in edits.items():
        path = out / uri.removeprefix("/redfish/v1").strip("/") / "index.json"
        doc = json.loads(path.read_text())
        edit(doc)
        path.write_text(json.dumps(doc))
    return out


def small_config(latency: float = 0.0) -> config.EmulatorConfig:
    return config.example(password=PASSWORD, nodes=2, gpus=4, latency=latency)


@contextlib.asynccontextmanager
async def serving(cfg: config.EmulatorConfig, tmp_path: Path) -> AsyncIterator[EmulatorServer]:
    """The emulator with `cfg`, over HTTPS on loopback, for the block."""
    server = EmulatorServer(
        cfg, state_file=tmp_path / "fabric-state.json", tls_dir=tmp_path / "tls"
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def emulator(tmp_path: Path) -> AsyncIterator[EmulatorServer]:
    async with serving(small_config(), tmp_path) as server:
        yield server


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


@contextlib.contextmanager
def emulator_subprocess(tmp_path: Path, password: str, **env: str) -> Iterator[tuple[str, Path]]:
    """`cohdi-agent fabric-emulator` as its own process on a free loopback port, user admin with
    `password`, `env` added to its environment: yields (URL, the CA file its clients trust) and
    stops it at the end. (DMTF's validators are separate programs: they need a server of their
    own to talk to.)"""
    port = free_port()
    log = tmp_path / "emulator.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "fabric-emulator",
                "--emulator-tls-dir",
                str(tmp_path / "tls"),
                "--emulator-port",
                str(port),
            ],
            env={**os.environ, "COHDI_FABRIC_PASSWORD": password, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + 30
        while "fabric emulator:" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the emulator did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield f"https://127.0.0.1:{port}", tmp_path / "tls" / "ca.crt"
    finally:
        proc.terminate()
        proc.wait(10)
