"""Fabric attach through the agent's own clients.

On the embedded default: both clients (redfish, fti) against the built-in emulator in the same
process, over HTTPS on loopback, zero injected attach latency — so the figures are client +
emulator + TLS + loopback, the overhead the agent adds on top of a real fabric's hardware time:
attach + detach round trips (one pedantic round each) and 200 concurrent attaches to 200
machines. Given --fabric-url (and --fabric-machine, --fabric-device): the round trip on that
fabric manager, with the client its --fabric-backend names.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from agent import settings
from agent.fabric.backends import open_fabric
from agent.fabric.credentials import Secret
from agent.fabric.emulator import config
from agent.fabric.emulator.config import DEFAULT_TENANT
from agent.fabric.emulator.server import EmulatorServer
from agent.fabric.fti import FtiFabric
from agent.fabric.protocol import FabricManager
from agent.fabric.redfish import RedfishFabric
from agent.fabric.transport import FabricHttp
from agent.model.fabric import DeviceId, MachineId
from bench.harness import percentiles

PASSWORD = "bench-password-1"  # noqa: S105 -- a throwaway emulator user on loopback
MODEL = "BENCH-GPU"


def _emulator(machines: int, devices: int, tmp: Path) -> EmulatorServer:
    conf = config.parse(
        {
            "machines": [
                {"id": f"m{i}", "name": f"node-{i}", "fabric": "f0"} for i in range(machines)
            ],
            "devices": [{"model": MODEL, "count": devices, "fabric": "f0"}],
            "users": [{"name": "admin", "password": PASSWORD}],
        }
    )
    return EmulatorServer(conf, tls_dir=tmp / f"tls-{machines}")


def _client(server: EmulatorServer, backend: str) -> FabricManager:
    http = FabricHttp(base_url=server.url, ca_bundle=str(server.ca_file), concurrency=256)
    if backend == "redfish":
        return RedfishFabric(http, user="admin", password=Secret(PASSWORD))
    return FtiFabric(http, user="admin", password=Secret(PASSWORD), tenant=DEFAULT_TENANT)


def _round_trips(
    benchmark: Any,
    runner: asyncio.Runner,
    fabric: FabricManager,
    device: DeviceId,
    machine: MachineId,
    *,
    model: str,
    rounds: int,
) -> dict[str, Any]:
    attach: list[float] = []
    detach: list[float] = []

    async def one() -> None:
        t0 = time.perf_counter()
        await fabric.attach(device, machine, model=model)
        t1 = time.perf_counter()
        await fabric.detach(device)
        attach.append(t1 - t0)
        detach.append(time.perf_counter() - t1)

    runner.run(fabric.inventory())  # log in, warm the connection
    benchmark.pedantic(lambda: runner.run(one()), rounds=rounds, iterations=1, warmup_rounds=3)
    warm = 3  # pedantic's warm-up rounds ran `one` too: leave them out
    return {"attach": percentiles(attach[warm:]), "detach": percentiles(detach[warm:])}


@pytest.mark.parametrize("backend", ["redfish", "fti"])
def test_attach_detach_round_trip(
    benchmark: Any,
    runner: asyncio.Runner,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    fabric_settings: settings.FabricSettings,
    backend: str,
) -> None:
    rounds = request.config.getoption("--fabric-rounds")
    if fabric_settings.url:
        if backend != fabric_settings.backend:
            pytest.skip(f"the fabric given speaks {fabric_settings.backend}")
        machine = request.config.getoption("--fabric-machine")
        device = request.config.getoption("--fabric-device")
        if not machine or not device:
            pytest.skip("--fabric-url needs --fabric-machine and --fabric-device")
        fabric = open_fabric(fabric_settings)
        try:
            inv = runner.run(fabric.inventory())
            dev = inv.device(device)
            figures = _round_trips(
                benchmark,
                runner,
                fabric,
                DeviceId(device),
                MachineId(machine),
                model=dev.model if dev else "",
                rounds=min(rounds, 20),
            )
        finally:
            runner.run(fabric.close())
        benchmark.extra_info.update(figures, fabric=fabric_settings.url)
        return
    server = _emulator(2, 2, tmp_path)
    runner.run(server.start())
    fabric = _client(server, backend)
    try:
        figures = _round_trips(
            benchmark,
            runner,
            fabric,
            DeviceId("f0-gpu-0000"),
            MachineId("m1"),
            model=MODEL,
            rounds=rounds,
        )
    finally:
        runner.run(fabric.close())
        runner.run(server.stop())
    benchmark.extra_info.update(figures, fabric="emulator")


@pytest.mark.parametrize("backend", ["redfish", "fti"])
def test_concurrent_attaches(
    benchmark: Any,
    runner: asyncio.Runner,
    tmp_path: Path,
    fabric_settings: settings.FabricSettings,
    backend: str,
) -> None:
    """200 attaches at once to 200 machines, one round (timed: all of them), three rounds,
    everything detached again between rounds (not timed)."""
    if fabric_settings.url:
        pytest.skip("200 concurrent attaches are measured on the emulator only")
    n = 200
    server = _emulator(n, n, tmp_path)
    runner.run(server.start())
    fabric = _client(server, backend)
    pairs = [(DeviceId(f"f0-gpu-{i:04d}"), MachineId(f"m{i}")) for i in range(n)]

    async def attach_all() -> None:
        results = await asyncio.gather(*(fabric.attach(d, m, model=MODEL) for d, m in pairs))
        assert all(r.machine == m for r, (_, m) in zip(results, pairs, strict=True))

    async def detach_all() -> None:
        await asyncio.gather(*(fabric.detach(d) for d, _ in pairs))

    try:
        runner.run(fabric.inventory())
        benchmark.pedantic(
            lambda: runner.run(attach_all()),
            setup=lambda: runner.run(detach_all()),
            rounds=3,
            iterations=1,
        )
    finally:
        runner.run(fabric.close())
        runner.run(server.stop())
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(attaches=n, per_attach_ms=round(mean / n * 1e3, 3))
