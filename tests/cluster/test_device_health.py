"""Device health on the real kube-apiserver + kube-scheduler (v1.36: DRADeviceTaints beta, on by
default): the node's `DeviceHealthy=False` on a GPU's resource (written here as the node role
writes it) and the emulator's health fault become `cohdi.io/unhealthy` taints in the
ResourceSlices, which the real scheduler honours; the unhealthy GPU is swapped out when its pod
ends and not offered again until it is healthy."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

import pytest

from agent import errors, settings
from agent.controllers import running
from agent.controllers.publishing import NODES, SLICES, Publisher
from agent.kube.client import Kube, Obj
from agent.kube.resources import RESOURCES
from agent.kube.watching import Informer
from agent.model import claims as claimmodel
from agent.model import health as healthmodel
from agent.model.fabric import DeviceId, DeviceState, FabricId, Inventory, PoolDevice
from agent.model.objects import DEVICE_HEALTHY, attached_device, fabric_device
from tests.cluster.conftest import CLAIMS, PODS, World, finish
from tests.waiting import until

pytestmark = [pytest.mark.controlplane]

GRACE = 2.0


async def start(w: World) -> running.ClusterRole:
    w.cfg = settings.Settings(
        cluster=dataclasses.replace(w.cfg.cluster, health_grace=GRACE),
        leader=w.cfg.leader,
    )
    role = await w.start_role()
    await asyncio.wait_for(role.publisher.synced.wait(), 30)
    return role


async def entries(w: World) -> dict[str, dict[str, Any]]:
    """fabric device id -> its slice entry, over our slices."""
    out = {}
    for s in (await w.kube.get(SLICES))["items"]:
        if s["spec"]["driver"] == w.driver:
            for d in s["spec"]["devices"]:
                out[d["attributes"]["fabricDeviceId"]["string"]] = d
    return out


async def pod_node(w: World, name: str) -> str | None:
    return (await w.kube.get(f"{PODS}/{name}"))["spec"].get("nodeName")


async def device_of(w: World, role: running.ClusterRole, claim: str) -> str:
    obj = await w.kube.get(f"{CLAIMS}/{claim}")
    (b,) = claimmodel.bindings(obj, w.driver)
    device = role.publisher.device_id_of(b.pool, b.device)
    assert device is not None
    return device


async def resource_for(w: World, device: str) -> Obj:
    for o in (await w.kube.get(RESOURCES))["items"]:
        if fabric_device(o) == device and o["spec"].get("target_node") in w.nodes:
            return o
    raise AssertionError(f"no resource for {device}")


async def write_device_healthy(w: World, device: str, status: str, reason: str) -> None:
    """What the node role writes on the GPU's resource: condition DeviceHealthy."""
    for _ in range(8):
        obj = await resource_for(w, device)
        st = obj.setdefault("status", {})
        st["conditions"] = [
            c for c in st.get("conditions") or [] if c.get("type") != DEVICE_HEALTHY
        ] + [
            {
                "type": DEVICE_HEALTHY,
                "status": status,
                "reason": reason,
                "message": "GPU has fallen off the bus" if status == "False" else "",
                "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        ]
        try:
            await w.kube.replace(f"{RESOURCES}/{obj['metadata']['name']}/status", obj)
            return
        except errors.KubeConflict:
            await asyncio.sleep(0.05)
    raise AssertionError("the resource's status kept changing")


@pytest.mark.parametrize("world", [{"nodes": 2, "gpus": 3, "settle": 0.5}], indirect=True)
async def test_node_xid79_taints_the_gpu_the_scheduler_avoids_it_and_it_is_swapped_out(
    world: World,
) -> None:
    role = await start(world)
    first = f"p{world.suffix}-a"
    await world.claim_and_pod(first)
    await until(lambda: pod_node(world, first), what="the first pod bound", timeout=60)
    sick = await device_of(world, role, first)

    started = time.monotonic()
    await write_device_healthy(world, sick, "False", "Xid79")

    async def tainted() -> list[dict[str, Any]]:
        return list((await entries(world)).get(sick, {}).get("taints") or [])

    taints = await until(tainted, what="the taint in the slice", timeout=30, interval=0.01)
    took = time.monotonic() - started
    print(f"DeviceHealthy=False Xid79 written -> taint stored in the ResourceSlice: {took:.3f} s")
    assert [(t["key"], t["value"], t["effect"]) for t in taints] == [
        (healthmodel.TAINT_KEY, "Xid79", "NoSchedule")
    ]
    assert taints[0]["timeAdded"]
    assert role.publisher.taints_supported

    # the real scheduler gives a new claim another GPU (there are three; every other is free)
    second = f"p{world.suffix}-b"
    await world.claim_and_pod(second)
    await until(lambda: pod_node(world, second), what="the second pod bound", timeout=60)
    assert await device_of(world, role, second) != sick
    emulated = world.emulator.state.devices[attached_device(await resource_for(world, sick))]
    assert emulated.state == DeviceState.ATTACHED  # still its pod's

    # the pod ends: detached, and offered again only tainted
    await finish(world.kube, first)
    await until(
        lambda: _free(world, sick), what="the unhealthy GPU detached", timeout=60, interval=0.1
    )
    entry = await until(
        lambda: _offered_free(world, sick), what="the GPU back in the free pool", timeout=30
    )
    assert entry["taints"] == taints  # the same taint: never schedulable meanwhile
    third = f"p{world.suffix}-c"
    await world.claim_and_pod(third)
    await until(lambda: pod_node(world, third), what="the third pod bound", timeout=60)
    assert await device_of(world, role, third) != sick
    events = (await world.kube.get("/api/v1/namespaces/default/events"))["items"]
    reasons = {e["reason"] for e in events if sick in str(e.get("message"))}
    assert {"DeviceUnhealthy", "UnhealthyDetach"} <= reasons


@pytest.mark.parametrize("backend", ["fti"], indirect=True)
@pytest.mark.parametrize("world", [{"nodes": 2, "gpus": 3, "settle": 0.5}], indirect=True)
async def test_on_fti_the_held_slot_carries_its_gpus_taint_and_the_gpu_is_swapped_out(
    world: World,
) -> None:
    """FTI names no free GPU: the claim holds a slot, the node names the GPU behind it. The
    taint goes on the slot (the identity the scheduler sees), and the GPU is detached when the
    pod ends. (Once detached, FTI's free count cannot tell it from the other free GPUs.)"""
    role = await start(world)
    first = f"p{world.suffix}-a"
    await world.claim_and_pod(first)
    await until(lambda: pod_node(world, first), what="the first pod bound", timeout=60)
    slot = await device_of(world, role, first)
    gpu = attached_device(await resource_for(world, slot))
    assert gpu != slot
    started = time.monotonic()
    await write_device_healthy(world, slot, "False", "Xid79")

    async def tainted() -> list[dict[str, Any]]:
        return list((await entries(world)).get(slot, {}).get("taints") or [])

    taints = await until(tainted, what="the slot tainted", timeout=30, interval=0.01)
    print(f"FTI: DeviceHealthy=False -> taint on the held slot: {time.monotonic() - started:.3f} s")
    assert taints[0]["value"] == "Xid79"
    second = f"p{world.suffix}-b"
    await world.claim_and_pod(second)
    await until(lambda: pod_node(world, second), what="the second pod bound", timeout=60)
    other = attached_device(await resource_for(world, await device_of(world, role, second)))
    assert other != gpu
    await finish(world.kube, first)
    await until(lambda: _free(world, gpu), what="the unhealthy GPU detached", timeout=60)
    events = (await world.kube.get("/api/v1/namespaces/default/events"))["items"]
    assert any(e["reason"] == "UnhealthyDetach" and gpu in str(e.get("message")) for e in events)


@pytest.mark.parametrize("world", [{"nodes": 2, "gpus": 2, "settle": 0.5}], indirect=True)
async def test_a_cleared_condition_lifts_the_taint_after_the_grace(world: World) -> None:
    role = await start(world)
    name = f"p{world.suffix}-a"
    await world.claim_and_pod(name)
    await until(lambda: pod_node(world, name), what="the pod bound", timeout=60)
    device = await device_of(world, role, name)
    await write_device_healthy(world, device, "False", "Xid79")

    async def taints() -> list[Any] | None:
        entry = (await entries(world)).get(device)
        return None if entry is None else list(entry.get("taints") or [])

    await until(taints, what="tainted", timeout=30)
    await write_device_healthy(world, device, "True", "Healthy")
    cleared = time.monotonic()
    await until(
        lambda: _is(taints(), []), what="the taint lifted", timeout=30 + GRACE, interval=0.05
    )
    waited = time.monotonic() - cleared
    print(f"DeviceHealthy=True -> taint lifted after {waited:.2f} s (grace {GRACE} s)")
    assert waited >= GRACE
    assert world.emulator.state.devices[device].state == DeviceState.ATTACHED  # never swapped


@pytest.mark.parametrize("world", [{"nodes": 2, "gpus": 3}], indirect=True)
async def test_a_fabric_health_fault_on_a_free_gpu_keeps_every_pod_off_it(world: World) -> None:
    role = await start(world)
    sick = sorted(world.emulator.state.devices)[0]
    world.emulator.state.set_health(sick, "Critical", "PCIe link down")
    started = time.monotonic()

    async def tainted() -> list[Any]:
        return list((await entries(world)).get(sick, {}).get("taints") or [])

    taints = await until(tainted, what="the fabric fault tainted", timeout=30)
    took = time.monotonic() - started
    print(f"emulator health fault -> taint in the slice: {took:.3f} s (fabric poll every 0.5 s)")
    assert taints[0]["value"] == "FabricCritical"
    names = [f"p{world.suffix}-{i}" for i in range(2)]
    for n in names:
        await world.claim_and_pod(n)
    for n in names:
        await until(lambda n=n: pod_node(world, n), what=f"{n} bound", timeout=60)  # type: ignore[misc]
        assert await device_of(world, role, n) != sick
    assert world.emulator.state.devices[sick].state == DeviceState.FREE  # never allocated
    # a third pod has nothing healthy left: it waits rather than get the sick GPU
    third = f"p{world.suffix}-x"
    await world.claim_and_pod(third)
    await asyncio.sleep(3)
    assert await pod_node(world, third) is None
    assert world.emulator.state.devices[sick].state == DeviceState.FREE
    # repaired: after the grace the waiting pod gets it
    world.emulator.state.set_health(sick, "OK")
    await until(lambda: pod_node(world, third), what="the third pod bound", timeout=60)
    assert await device_of(world, role, third) == sick


async def _free(w: World, device: str) -> bool:
    return w.emulator.state.devices[device].state == DeviceState.FREE


async def _offered_free(w: World, device: str) -> dict[str, Any] | None:
    entry = (await entries(w)).get(device)
    return entry if entry is not None and entry.get("bindsToNode") else None


async def _is(value: Any, want: Any) -> bool:
    return bool(await value == want)


async def test_the_api_server_takes_a_tainted_pool_of_130_devices(kube: Kube) -> None:
    """With taints the API server allows 64 devices a slice, not 128: a pool of 130 with one
    unhealthy device is rewritten in slices of 64 and every write is taken."""
    driver = f"t{uuid.uuid4().hex[:6]}.cohdi.io"
    slices = Informer(kube, SLICES, field_selector=f"spec.driver={driver}")
    nodes = Informer(kube, NODES)
    tasks = [asyncio.create_task(slices.run()), asyncio.create_task(nodes.run())]
    try:
        await asyncio.wait_for(slices.synced.wait(), 30)
        await asyncio.wait_for(nodes.synced.wait(), 30)
        publisher = Publisher(kube, driver=driver, slices=slices, nodes=nodes)
        f = FabricId(f"fab-{driver[:7]}")
        publisher.update_inventory(
            Inventory(
                (),
                tuple(
                    PoolDevice(DeviceId(f"gpu-{i:03d}"), f, "A100", DeviceState.FREE)
                    for i in range(130)
                ),
            )
        )
        await publisher.sync()
        sick = healthmodel.Health(healthmodel.Source.NODE, "Xid79", "", added=time.time())
        publisher.set_taints("gpu-100", healthmodel.taints(sick, evict=False))
        await publisher.sync()
        stored = (await kube.get(SLICES, fieldSelector=f"spec.driver={driver}"))["items"]
        sizes = sorted(len(s["spec"]["devices"]) for s in stored)
        assert sizes == [2, 64, 64]
        generations = {s["spec"]["pool"]["generation"] for s in stored}
        assert len(generations) == 1  # the pool rewritten whole, in a new generation
        assert generations != {1}
        tainted = [d["name"] for s in stored for d in s["spec"]["devices"] if d.get("taints")]
        assert tainted == ["gpu-100"]
        for s in stored:
            await kube.delete(f"{SLICES}/{s['metadata']['name']}")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize("world", [{"nodes": 2, "gpus": 2}], indirect=True)
async def test_a_flapping_link_holds_one_steady_taint_until_it_stops(world: World) -> None:
    """The emulator's link flap (Critical/OK every 0.3 s) on a free GPU: one taint, never lifted
    or re-added while it flaps (the grace is longer than the flap), lifted after it stops."""
    role = await start(world)
    gpu = sorted(world.emulator.state.devices)[0]
    world.emulator.state.device_faults(gpu).link_flap_period = 0.3
    world.emulator.state.start_link_flap(gpu)

    async def tainted() -> list[Any]:
        return list((await entries(world)).get(gpu, {}).get("taints") or [])

    first = await until(tainted, what="the flapping GPU tainted", timeout=30)
    seen = []
    for _ in range(20):  # 3 s of flapping, ten flips
        seen.append(await tainted())
        await asyncio.sleep(0.15)
    assert all(t == first for t in seen), "the taint was lifted or rewritten while flapping"
    world.emulator.state.device_faults(gpu).link_flap_period = 0
    await until(lambda: _is(tainted(), []), what="the taint lifted", timeout=30)
    assert role.scaler.unhealthy_reason(gpu) == ""
