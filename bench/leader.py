"""The leader's memory with a large cluster: 1,000 nodes wired to one fabric of 8,000 GPUs (8 a
node), 2,000 ResourceClaims, on a real local control plane; `cohdi-agent run --roles cluster`
as its own process publishes the pool and keeps every informer; its RSS is sampled once a
second. Run: `./dev bench leader`. Writes bench/results/leader.json."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent import settings
from agent.controllers.publishing import NODES
from agent.devcluster import local
from agent.devcluster.controlplane import ControlPlane
from agent.fabric.emulator import config as emuconfig
from agent.fabric.emulator.server import EmulatorServer
from agent.kube.client import Kube
from agent.manifests import installing
from bench.cluster import CLAIMS, _node
from bench.machine import describe

PASSWORD = "bench-leader-pass-1"  # noqa: S105 -- a throwaway emulator user on loopback
DRIVER = "leader.bench.cohdi.io"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _bounded(coros: list[Any], limit: int = 16) -> None:
    sem = asyncio.Semaphore(limit)

    async def one(c: Any) -> None:
        async with sem:
            await c

    await asyncio.gather(*(one(c) for c in coros))


async def measure(nodes: int, per_node: int, claims: int, seconds: float) -> dict[str, Any]:
    binaries = await asyncio.to_thread(local.binaries, settings.Settings().cache_dir)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        cp = ControlPlane(binaries=binaries, state_dir=tmp / "cp", progress=local.progress)
        await asyncio.to_thread(cp.start)
        proc = None
        try:
            async with await Kube.connect(kubeconfig=str(cp.kubeconfig)) as kube:
                await installing.install(kube, DRIVER)
                names = [f"big-node-{i:04d}" for i in range(nodes)]
                t0 = time.monotonic()
                await _bounded([_node(kube, n) for n in names])
                expr = f'device.driver == "{DRIVER}"'
                await _bounded(
                    [
                        kube.create(
                            CLAIMS,
                            {
                                "apiVersion": "resource.k8s.io/v1",
                                "kind": "ResourceClaim",
                                "metadata": {"name": f"idle-{i:05d}"},
                                "spec": {
                                    "devices": {
                                        "requests": [
                                            {
                                                "name": "gpu",
                                                "exactly": {
                                                    "deviceClassName": f"gpu.{DRIVER}",
                                                    "selectors": [{"cel": {"expression": expr}}],
                                                },
                                            }
                                        ]
                                    }
                                },
                            },
                        )
                        for i in range(claims)
                    ]
                )
                setup_s = time.monotonic() - t0
                conf = emuconfig.parse(
                    {
                        "machines": [{"id": f"m-{n}", "name": n, "fabric": "big"} for n in names],
                        "devices": [
                            {
                                "model": "BENCH-GPU",
                                "count": nodes * per_node,
                                "fabric": "big",
                                "memory": 2**34,
                            }
                        ],
                        "users": [{"name": "admin", "password": PASSWORD}],
                    }
                )
                em = EmulatorServer(conf, tls_dir=tmp / "tls")
                await em.start()
                try:
                    proc = subprocess.Popen(  # noqa: ASYNC220 -- started once, not awaited
                        [
                            sys.executable,
                            "-m",
                            "agent",
                            "run",
                            "--roles",
                            "cluster",
                            "--kubeconfig",
                            str(cp.kubeconfig),
                            "--driver",
                            DRIVER,
                            "--fabric-url",
                            em.url,
                            "--fabric-user",
                            "admin",
                            "--fabric-ca-bundle",
                            str(em.ca_file),
                            "--fabric-poll-interval",
                            "5",
                            "--lease-name",
                            "leader-bench",
                        ],
                        env={**os.environ, "COHDI_FABRIC_PASSWORD": PASSWORD},
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    want = -(-nodes * per_node // 128)
                    start = time.monotonic()
                    samples, published_s = [], None
                    while time.monotonic() - start < seconds:
                        await asyncio.sleep(1.0)
                        samples.append(
                            {
                                "t": round(time.monotonic() - start, 1),
                                "rss_mb": round(rss_mb(proc.pid), 1),
                            }
                        )
                        if published_s is None:
                            slices = await kube.get(
                                "/apis/resource.k8s.io/v1/resourceslices",
                                fieldSelector=f"spec.driver={DRIVER}",
                            )
                            devices = sum(len(s["spec"]["devices"]) for s in slices["items"])
                            if len(slices["items"]) >= want and devices == nodes * per_node:
                                published_s = round(time.monotonic() - start, 1)
                    labelled = sum(
                        1
                        for n in (await kube.get(NODES))["items"]
                        if n["metadata"].get("labels", {}).get("cohdi.io/fabric") == "big"
                    )
                finally:
                    if proc is not None:
                        proc.terminate()
                        await asyncio.to_thread(proc.wait, 20)
                    await em.stop()
        finally:
            await asyncio.to_thread(cp.stop)
    peak = max(s["rss_mb"] for s in samples)
    return {
        "benchmark": "leader",
        "machine": describe(),
        "nodes": nodes,
        "devices": nodes * per_node,
        "claims": claims,
        "setup_s": round(setup_s, 1),
        "published_after_s": published_s,
        "nodes_labelled": labelled,
        "rss_peak_mb": peak,
        "rss_last_mb": samples[-1]["rss_mb"],
        "samples": samples,
    }


def main() -> None:
    import uvloop

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--per-node", type=int, default=8)
    parser.add_argument("--claims", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/leader.json"))
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        doc = runner.run(measure(args.nodes, args.per_node, args.claims, args.seconds))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(
        f"leader with {doc['nodes']} nodes, {doc['devices']} devices, {doc['claims']} claims: "
        f"published after {doc['published_after_s']} s, {doc['nodes_labelled']} nodes labelled, "
        f"RSS peak {doc['rss_peak_mb']} MB, last {doc['rss_last_mb']} MB"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
