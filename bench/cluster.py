"""Cluster-role benchmarks on a real local control plane (etcd + kube-apiserver + kube-scheduler
v1.36.3) with the fabric emulator (zero injected attach latency) and the node-report stand-in:

- scale-up agent overhead for a burst of N claims (default 200): for each claim,
  (claim allocated → FabricDeviceReady set) minus the fabric's own attach time, both instants
  taken from one watch on the claims, the attach time from the emulator;
- pool publication of D fabric devices (default 2,000): fabric read + all slices written, and
  one device changing afterwards (one slice rewritten).

Writes JSON (with the machine) and a PNG plot. Run: `./dev bench cluster` or
`python -m bench.cluster --claims 200 --devices 2000`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from agent import errors, settings
from agent.controllers import running
from agent.controllers.publishing import NODES, SLICES, Publisher
from agent.demo import objects
from agent.devcluster import local
from agent.devcluster.controlplane import ControlPlane
from agent.fabric.credentials import Secret
from agent.fabric.emulator import config as emuconfig
from agent.fabric.emulator.server import EmulatorServer
from agent.fabric.redfish import RedfishFabric
from agent.fabric.transport import FabricHttp
from agent.kube.client import Kube, path_of
from agent.kube.watching import Event, Informer
from agent.manifests import installing
from agent.model import claims as claimmodel
from agent.testing.nodereport import NodeDouble
from bench.machine import describe

PASSWORD = "bench-cluster-pass-1"  # noqa: S105 -- a throwaway emulator user on loopback
MODEL = "BENCH-GPU"
CLAIMS = path_of(
    group="resource.k8s.io", version="v1", plural="resourceclaims", namespace="default"
)
PODS = path_of(group="", version="v1", plural="pods", namespace="default")


def _pct(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {
        "n": len(s),
        "p50_ms": round(pick(0.5) * 1e3, 2),
        "p90_ms": round(pick(0.9) * 1e3, 2),
        "p99_ms": round(pick(0.99) * 1e3, 2),
        "max_ms": round(s[-1] * 1e3, 2),
        "mean_ms": round(statistics.fmean(s) * 1e3, 2),
    }


async def _node(kube: Kube, name: str) -> None:
    await objects.make_node(kube, name, pods=250)


def _emulator(prefix: str, nodes: list[str], devices: int, tmp: Path) -> EmulatorServer:
    conf = emuconfig.parse(
        {
            "machines": [{"id": f"m-{n}", "name": n, "fabric": f"{prefix}-fab"} for n in nodes],
            "devices": [
                {"model": MODEL, "count": devices, "fabric": f"{prefix}-fab", "memory": 2**34}
            ],
            "users": [{"name": "admin", "password": PASSWORD}],
        }
    )
    return EmulatorServer(conf, tls_dir=tmp / f"{prefix}-tls")


def _fabric(em: EmulatorServer) -> RedfishFabric:
    http = FabricHttp(base_url=em.url, ca_bundle=str(em.ca_file), concurrency=256)
    return RedfishFabric(http, user="admin", password=Secret(PASSWORD), poll_interval=1.0)


async def publication(kube: Kube, devices: int, tmp: Path) -> dict[str, Any]:
    tag = f"pub{devices}"
    driver = f"{tag}.bench.cohdi.io"
    nodes = [f"{tag}-node-{i}" for i in range(8)]
    for n in nodes:
        await _node(kube, n)
    await installing.install(kube, driver)
    em = _emulator(tag, nodes, devices, tmp)
    await em.start()
    fabric = _fabric(em)
    slices = Informer(kube, SLICES, field_selector=f"spec.driver={driver}")
    node_inf = Informer(kube, NODES)
    tasks = [asyncio.create_task(slices.run()), asyncio.create_task(node_inf.run())]
    try:
        await slices.synced.wait()
        await node_inf.synced.wait()
        publisher = Publisher(kube, driver=driver, slices=slices, nodes=node_inf)
        t0 = time.perf_counter()
        inv = await fabric.inventory()
        t1 = time.perf_counter()
        publisher.update_inventory(inv)
        await publisher.sync()
        t2 = time.perf_counter()
        written = sum(1 for o in slices.store.values() if o["spec"]["driver"] == driver)
        # one device gets attached: exactly one slice is rewritten
        dev = inv.devices[devices // 2]
        from dataclasses import replace

        from agent.model.fabric import DeviceState

        publisher.device_changed(
            replace(dev, state=DeviceState.ATTACHED, machine=inv.machines[0].id)
        )
        before = dict(publisher._sent)
        t3 = time.perf_counter()
        await publisher.sync()
        t4 = time.perf_counter()
        rewritten = [k for k, v in publisher._sent.items() if before.get(k) != v]
        # and nothing changes: no write at all
        t5 = time.perf_counter()
        await publisher.sync()
        t6 = time.perf_counter()
        return {
            "devices": devices,
            "slices": written,
            "fabric_read_ms": round((t1 - t0) * 1e3, 1),
            "publish_ms": round((t2 - t1) * 1e3, 1),
            "end_to_end_ms": round((t2 - t0) * 1e3, 1),
            "one_device_changed_ms": round((t4 - t3) * 1e3, 1),
            "one_device_changed_slices_rewritten": len(rewritten),
            "no_change_ms": round((t6 - t5) * 1e3, 1),
        }
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await fabric.close()
        await em.stop()


async def scale_up(kube: Kube, claims: int, tmp: Path) -> dict[str, Any]:
    tag = f"up{claims}"
    driver = f"{tag}.bench.cohdi.io"
    nodes = [f"{tag}-node-{i}" for i in range(4)]
    for n in nodes:
        await _node(kube, n)
    await installing.install(kube, driver)
    # NB: the first object of a freshly established CRD takes the API server ~2 s (its storage is
    # set up lazily); a real cluster pays that once at install time, so warm it up here.
    from agent.kube.resources import RESOURCES

    with contextlib.suppress(errors.KubeAlreadyExists):
        await kube.create(
            RESOURCES,
            {
                "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
                "kind": "ComposableResource",
                "metadata": {"name": "warm-up"},
                "spec": {"type": "gpu", "model": "x", "target_node": "none"},
            },
        )
    await kube.delete(f"{RESOURCES}/warm-up")
    em = _emulator(tag, nodes, claims + 8, tmp)
    await em.start()
    attach_started: dict[str, float] = {}
    attach_time: dict[str, float] = {}
    original = em.state.attach

    def timed_attach(device_id: str, machine_id: str) -> Any:
        attach_started.setdefault(device_id, time.monotonic())
        return original(device_id, machine_id)

    em.state.attach = timed_attach  # type: ignore[method-assign]
    em.state.on_appear.append(
        lambda d, _m: attach_time.__setitem__(
            d.spec.id, time.monotonic() - attach_started[d.spec.id]
        )
    )
    fabric = _fabric(em)
    cfg = settings.Settings(cluster=settings.ClusterSettings(driver=driver, workers=256))
    role = running.build(kube, fabric, cfg, identity="bench")
    allocated: dict[str, float] = {}
    ready: dict[str, float] = {}
    device_of: dict[str, tuple[str, str]] = {}

    def on_claim(e: Event) -> None:
        name = e.obj["metadata"]["name"]
        for b in claimmodel.bindings(e.obj, driver):
            allocated.setdefault(name, time.monotonic())
            device_of[name] = (b.pool, b.device)
            if b.ready:
                ready.setdefault(name, time.monotonic())

    watch = Informer(kube, CLAIMS, name="bench-claims")
    watch.add_handler(on_claim)
    double = NodeDouble(kube, set(nodes))
    tasks = [asyncio.create_task(x) for x in (role.run(), watch.run(), double.run())]
    try:
        await asyncio.wait_for(role.publisher.synced.wait(), 60)
        await watch.synced.wait()
        names = [f"{tag}-burst-{i:03d}" for i in range(claims)]
        limit = asyncio.Semaphore(32)

        async def submit(name: str) -> None:
            async with limit:
                await objects.submit(kube, name, driver, MODEL)

        t0 = time.monotonic()
        await asyncio.gather(*(submit(n) for n in names))
        all_ready = asyncio.Event()
        watch.add_handler(lambda _e: all_ready.set() if len(ready) >= claims else None)
        async with asyncio.timeout(900):
            await all_ready.wait()
        total = time.monotonic() - t0
        overhead, wall = [], []
        for n in names:
            pool, dev_name = device_of[n]
            device = role.publisher.device_id_of(pool, dev_name)
            span = ready[n] - allocated[n]
            wall.append(span)
            overhead.append(span - attach_time.get(device or "", 0.0))
        return {
            "claims": claims,
            "burst_total_s": round(total, 2),
            "overhead": _pct(overhead),
            "allocated_to_ready": _pct(wall),
            "fabric_attach": _pct(list(attach_time.values())),
            "samples_ms": [round(x * 1e3, 2) for x in overhead],
        }
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await fabric.close()
        await em.stop()


async def measure(bursts: list[int], sizes: list[int]) -> dict[str, Any]:
    binaries = await asyncio.to_thread(local.binaries, settings.Settings().cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        cp = ControlPlane(binaries=binaries, state_dir=Path(tmp) / "cp", progress=local.progress)
        await asyncio.to_thread(cp.start)
        try:
            async with await Kube.connect(kubeconfig=str(cp.kubeconfig)) as kube:
                # Bursts first: the scheduler evaluates every published device for every claim,
                # so thousands of leftover publication devices would slow its allocations.
                ups = {str(n): await scale_up(kube, n, Path(tmp)) for n in bursts}
                pubs = {str(n): await publication(kube, n, Path(tmp)) for n in sizes}
        finally:
            await asyncio.to_thread(cp.stop)
    return {
        "benchmark": "cluster",
        "machine": describe(),
        "kubernetes": "v1.36.3",
        "publication": pubs,
        "scale_up": ups,
    }


def main() -> None:
    import uvloop

    from bench import report

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bursts", default="1,50,200", help="claim bursts to measure (default 1,50,200)"
    )
    parser.add_argument(
        "--devices", default="200,2000,8000", help="pool sizes to publish (default 200,2000,8000)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/cluster.json"))
    args = parser.parse_args()
    bursts = [int(x) for x in args.bursts.split(",") if x]
    sizes = [int(x) for x in args.devices.split(",") if x]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        doc = runner.run(measure(bursts, sizes))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    for n, up in doc["scale_up"].items():
        print(
            f"scale-up overhead, burst of {n}: p50 {up['overhead']['p50_ms']} ms, "
            f"p99 {up['overhead']['p99_ms']} ms "
            f"(allocated→ready p50 {up['allocated_to_ready']['p50_ms']} ms)"
        )
    for n, pub in doc["publication"].items():
        print(
            f"publication of {n} devices: {pub['end_to_end_ms']} ms end to end "
            f"({pub['slices']} slices); one device changed: {pub['one_device_changed_ms']} ms, "
            f"{pub['one_device_changed_slices_rewritten']} slice rewritten"
        )
    print(f"wrote {args.out}; plots: {', '.join(str(p) for p in report.draw(args.out.parent))}")


if __name__ == "__main__":
    main()
