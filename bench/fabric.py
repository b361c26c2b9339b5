"""Fabric-client benchmarks against the built-in emulator on loopback (HTTPS, zero injected
latency), so what is measured is client + emulator + TLS + loopback overhead:

- attach + detach round trip of one device through each client (redfish, fti): p50/p99;
- 200 concurrent attaches to 200 different machines: total wall time.

Run: `./dev bench-fabric` (or `python -m bench.fabric --out bench/results/fabric.json`).
Writes JSON with the machine description; prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.fabric.credentials import Secret
from agent.fabric.emulator import config
from agent.fabric.emulator.config import DEFAULT_TENANT
from agent.fabric.emulator.server import EmulatorServer
from agent.fabric.fti import FtiFabric
from agent.fabric.protocol import FabricManager
from agent.fabric.redfish import RedfishFabric
from agent.fabric.transport import FabricHttp
from agent.model.fabric import DeviceId, MachineId
from bench.machine import describe

PASSWORD = "bench-password-1"  # noqa: S105 -- a throwaway emulator user on loopback
MODEL = "BENCH-GPU"


def _config(machines: int, devices: int) -> config.EmulatorConfig:
    return config.parse(
        {
            "machines": [
                {"id": f"m{i}", "name": f"node-{i}", "fabric": "f0"} for i in range(machines)
            ],
            "devices": [{"model": MODEL, "count": devices, "fabric": "f0"}],
            "users": [{"name": "admin", "password": PASSWORD}],
        }
    )


def _client(server: EmulatorServer, backend: str) -> FabricManager:
    http = FabricHttp(base_url=server.url, ca_bundle=str(server.ca_file), concurrency=256)
    if backend == "redfish":
        return RedfishFabric(http, user="admin", password=Secret(PASSWORD))
    return FtiFabric(http, user="admin", password=Secret(PASSWORD), tenant=DEFAULT_TENANT)


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "n": len(ordered),
        "p50_ms": round(pick(0.50) * 1e3, 3),
        "p99_ms": round(pick(0.99) * 1e3, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1e3, 3),
        "max_ms": round(ordered[-1] * 1e3, 3),
    }


async def round_trips(backend: str, n: int, tmp: Path) -> dict[str, Any]:
    server = EmulatorServer(_config(2, 2), tls_dir=tmp / f"tls-{backend}-rt")
    await server.start()
    fabric = _client(server, backend)
    try:
        await fabric.inventory()  # log in, warm the connection
        device, machine = DeviceId("f0-gpu-0000"), MachineId("m1")
        for _ in range(10):  # warm-up
            await fabric.attach(device, machine, model=MODEL)
            await fabric.detach(device)
        attach, detach, total = [], [], []
        for _ in range(n):
            t0 = time.perf_counter()
            await fabric.attach(device, machine, model=MODEL)
            t1 = time.perf_counter()
            await fabric.detach(device)
            t2 = time.perf_counter()
            attach.append(t1 - t0)
            detach.append(t2 - t1)
            total.append(t2 - t0)
        return {
            "attach": _percentiles(attach),
            "detach": _percentiles(detach),
            "round_trip": _percentiles(total),
        }
    finally:
        await fabric.close()
        await server.stop()


async def concurrent_attaches(backend: str, n: int, tmp: Path) -> dict[str, Any]:
    server = EmulatorServer(_config(n, n), tls_dir=tmp / f"tls-{backend}-burst")
    await server.start()
    fabric = _client(server, backend)
    try:
        await fabric.inventory()
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(
                fabric.attach(DeviceId(f"f0-gpu-{i:04d}"), MachineId(f"m{i}"), model=MODEL)
                for i in range(n)
            )
        )
        elapsed = time.perf_counter() - t0
        assert all(r.machine == f"m{i}" for i, r in enumerate(results))
        assert server.state.attach_started == n
        return {
            "attaches": n,
            "total_s": round(elapsed, 3),
            "per_attach_ms": round(elapsed / n * 1e3, 3),
        }
    finally:
        await fabric.close()
        await server.stop()


async def measure(n: int, burst: int) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "benchmark": "fabric",
        "machine": describe(),
        "loop": "uvloop",
        "results": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("redfish", "fti"):
            doc["results"][backend] = {
                "round_trip": await round_trips(backend, n, Path(tmp)),
                f"concurrent_{burst}": await concurrent_attaches(backend, burst, Path(tmp)),
            }
    return doc


if __name__ == "__main__":
    import uvloop

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/fabric.json"))
    parser.add_argument(
        "--rounds", type=int, default=300, help="attach+detach round trips per client"
    )
    parser.add_argument(
        "--burst", type=int, default=200, help="concurrent attaches to different machines"
    )
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(measure(args.rounds, args.burst))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for backend, r in result["results"].items():
        rt = r["round_trip"]["round_trip"]
        burst = r[f"concurrent_{args.burst}"]
        print(
            f"{backend:8s} round trip p50 {rt['p50_ms']:.2f} ms  p99 {rt['p99_ms']:.2f} ms   "
            f"{burst['attaches']} concurrent attaches {burst['total_s']:.2f} s"
        )
    print(f"wrote {args.out}")
