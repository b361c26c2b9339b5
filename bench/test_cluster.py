"""Scale-up latency on the API server, the agent beside the floor, in one run.

- single claim, N one after another (default 50): each round submits a pod with its claim and
  returns when the claim needs nothing more (FabricDeviceReady, or allocated warm); claims stay
  allocated, so every round needs a fresh attach;
- burst of N claims (default 200) in one round;
- each for `floor` (bench.apichain: the raw API chain, no agent logic) and for the agent
  (its cluster role with the node-report stand-in; on a cluster given with --kubeconfig,
  the agent deployed there);
- pool publication of 200, 2,000 and 8,000 fabric devices.

The timed rounds are what pytest-benchmark's table shows (submit → settled, one claim; or the
whole burst). The figures the targets speak of are in extra_info: per-claim percentiles of
allocated → ready (from one watch for agent and floor alike), the agent's overhead (minus the
fabric emulator's own attach time), submit → bound cold and warm, API requests per claim from
`apiserver_request_total` before/after, and CPU seconds of kube-apiserver, etcd and
kube-scheduler. The session reports agent/floor ratios (conftest.ratios).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.controllers.publishing import NODES, SLICES, Publisher
from agent.demo import objects
from agent.kube.client import Kube
from agent.kube.watching import Informer
from agent.manifests import installing
from agent.model.fabric import DeviceState
from bench import worlds
from bench.conftest import Site
from bench.harness import bounded, difference, percentiles

pytestmark = pytest.mark.controlplane

SETTLE_S = 300.0  # longest wait for one claim (a loaded 2-core machine is slow, never this slow)
BOUND_S = 300.0  # longest wait for every pod of a benchmark to be bound


async def _world(site: Site, tmp: Path, *, tag: str, devices: int, mode: str) -> worlds.World:
    if not site.embedded:
        if mode == "floor":
            pytest.skip(
                "the floor runs on the local control plane only: on a real cluster the deployed "
                "agent would act on the floor's ComposableResources"
            )
        if not site.model:
            pytest.skip("--kubeconfig needs --model: the GPU model the claims ask for")
        return await worlds.deployed(site.kubeconfig, driver=site.driver, model=site.model)
    return await worlds.embedded(
        site.kubeconfig,
        tmp,
        tag=tag,
        devices=devices,
        mode="agent" if mode == "agent" else "floor",
    )


async def _one(world: worlds.World, name: str) -> None:
    await world.submit(name)
    await world.clock.until(lambda: world.clock.settled(name), SETTLE_S)


async def _all_bound(world: worlds.World, names: list[str]) -> None:
    await world.clock.until(lambda: all(n in world.clock.bound for n in names), BOUND_S)


def _figures(world: worlds.World, names: list[str], before: Any, after: Any) -> dict[str, Any]:
    clock = world.clock
    figures = clock.figures(names)
    cold = [n for n in names if n not in clock.warm and n in clock.ready]
    if world.embedded and world.mode == "agent":
        overhead, attach = [], []
        for n in cold:
            took = world.attach_time(n)
            if took is not None:
                attach.append(took)
                overhead.append(clock.ready[n] - clock.allocated[n] - took)
        figures["fabric_attach"] = percentiles(attach)
        figures["overhead"] = percentiles(overhead)
    waits = clock.spans(cold, "allocated", "ready")
    figures["ready_later_than_5s_after_allocation"] = sum(w > 5.0 for w in waits)
    figures["allocated_to_ready_samples_ms"] = [round(w * 1e3, 2) for w in waits]
    figures.update(difference(before, after, len(names)))
    figures["mode"] = world.mode
    return figures


@pytest.mark.parametrize("mode", ["floor", "agent"])
def test_single_claim(
    benchmark: Any,
    site: Site,
    runner: asyncio.Runner,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    record: Any,
    mode: str,
) -> None:
    n = request.config.getoption("--single-claims")
    world = runner.run(_world(site, tmp_path, tag=f"{mode}-one", devices=n + 8, mode=mode))
    try:
        prefix = f"{mode}-one" if world.embedded else f"cohdi-bench-{int(time.time())}"
        runner.run(_one(world, f"{prefix}-warmup"))  # caches, connections, first-object costs
        numbers = itertools.count()
        names: list[str] = []

        def one() -> None:
            names.append(f"{prefix}-{next(numbers):03d}")
            runner.run(_one(world, names[-1]))

        before = runner.run(site.apiserver.snapshot())
        benchmark.pedantic(one, rounds=n, iterations=1)
        runner.run(_all_bound(world, names))
        after = runner.run(site.apiserver.snapshot())
        figures = _figures(world, names, before, after)
        benchmark.extra_info.update(figures)
        record(f"{mode}_single", figures)
    finally:
        runner.run(world.stop())


@pytest.mark.parametrize("mode", ["floor", "agent"])
def test_burst(
    benchmark: Any,
    site: Site,
    runner: asyncio.Runner,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    record: Any,
    mode: str,
) -> None:
    n = request.config.getoption("--burst")
    world = runner.run(_world(site, tmp_path, tag=f"{mode}-burst", devices=n + 8, mode=mode))
    try:
        prefix = f"{mode}-burst" if world.embedded else f"cohdi-burst-{int(time.time())}"
        runner.run(_one(world, f"{prefix}-warmup"))
        names = [f"{prefix}-{i:03d}" for i in range(n)]

        async def burst() -> None:
            await bounded((world.submit(name) for name in names), 32)
            await world.clock.until(lambda: all(world.clock.settled(x) for x in names), 900)

        before = runner.run(site.apiserver.snapshot())
        benchmark.pedantic(lambda: runner.run(burst()), rounds=1, iterations=1)
        runner.run(_all_bound(world, names))
        after = runner.run(site.apiserver.snapshot())
        figures = _figures(world, names, before, after)
        allocs = sorted(world.clock.allocated[x] for x in names)
        figures["allocations_spread_s"] = round(allocs[-1] - allocs[0], 2)
        benchmark.extra_info.update(figures)
        record(f"{mode}_burst", figures)
    finally:
        runner.run(world.stop())


async def _publication(kubeconfig: str, tmp: Path, devices: int) -> dict[str, Any]:
    tag = f"pub{devices}"
    driver = f"{tag}.bench.cohdi.io"
    nodes = [f"{tag}-node-{i}" for i in range(8)]
    async with await Kube.connect(kubeconfig=kubeconfig) as kube:
        await installing.install(kube, driver)
        await bounded((objects.make_node(kube, n, pods=250) for n in nodes), 8)
        em = worlds.emulator(tag, nodes, devices, tmp)
        await em.start()
        fabric = worlds.redfish(em)
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
            written = len(publisher._sent)
            dev = inv.devices[devices // 2]  # one device gets attached: one slice rewritten
            publisher.device_changed(
                replace(dev, state=DeviceState.ATTACHED, machine=inv.machines[0].id)
            )
            before = dict(publisher._sent)
            t3 = time.perf_counter()
            await publisher.sync()
            t4 = time.perf_counter()
            rewritten = [k for k, v in publisher._sent.items() if before.get(k) != v]
            t5 = time.perf_counter()
            await publisher.sync()  # nothing changed: no write
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
            await kube.request("DELETE", SLICES, params={"fieldSelector": f"spec.driver={driver}"})
            for n in nodes:
                await kube.delete(f"{NODES}/{n}")


@pytest.mark.parametrize("devices", [200, 2000, 8000])
def test_publication(
    benchmark: Any, site: Site, runner: asyncio.Runner, tmp_path: Path, devices: int
) -> None:
    """Fabric read + every slice written for `devices` GPUs (one round), then one device
    changing (slices rewritten) and nothing changing (no write)."""
    if not site.embedded:
        pytest.skip("publication is measured on the local control plane and the emulator")
    out: dict[str, Any] = {}
    benchmark.pedantic(
        lambda: out.update(runner.run(_publication(site.kubeconfig, tmp_path, devices))),
        rounds=1,
        iterations=1,
    )
    benchmark.extra_info.update(out)
