"""The cluster role against the real kube-apiserver + kube-scheduler and the fabric emulator:
pods asking for GPUs get them attached to exactly the node the scheduler pinned, in one scheduling
cycle; failures, scale-down and pre-warm requests behave."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from agent.controllers.publishing import SLICES
from agent.kube.client import Kube, Obj
from agent.kube.resources import RESOURCES
from agent.kube.watching import Informer
from agent.model import claims as claimmodel
from agent.model import slots as slotmodel
from agent.model.fabric import DeviceState
from agent.model.objects import attached_device, fabric_device
from tests.cluster.conftest import BACKENDS, CLAIMS, PODS, World, finish
from tests.waiting import until

pytestmark = [
    pytest.mark.controlplane,
    pytest.mark.all_kube_versions,
    pytest.mark.parametrize("backend", BACKENDS, indirect=True),
]


class ClaimHistory:
    """Every allocation state each claim passed through, from a watch (so nothing is missed)."""

    def __init__(self, kube: Kube, suffix: str) -> None:
        self.seen: dict[str, list[bool]] = defaultdict(list)
        self.informer = Informer(kube, CLAIMS, name="history")
        self.informer.add_handler(self._on)
        self.suffix = suffix

    def _on(self, event) -> None:  # type: ignore[no-untyped-def]
        name = event.obj["metadata"]["name"]
        if self.suffix in name and event.type != "DELETED":
            allocated = bool((event.obj.get("status") or {}).get("allocation"))
            if not self.seen[name] or self.seen[name][-1] != allocated:
                self.seen[name].append(allocated)

    def cleared(self, name: str) -> bool:
        h = self.seen[name]
        return True in h and False in h[h.index(True) :]


class SlotNumbers:
    """Every anonymous free-slot number any of our slices offered, from a watch: a count-only
    fabric (FTI) of N GPUs must never offer a number N or above (a claim given it waits for a GPU
    that does not exist)."""

    def __init__(self, kube: Kube, driver: str) -> None:
        self.numbers: set[int] = set()
        self.driver = driver
        self.informer = Informer(kube, SLICES, name="slot-numbers")
        self.informer.add_handler(self._on)

    def _on(self, event) -> None:  # type: ignore[no-untyped-def]
        spec = event.obj.get("spec") or {}
        if event.type == "DELETED" or spec.get("driver") != self.driver:
            return
        for entry in spec.get("devices") or []:
            parsed = slotmodel.parse_slot(entry["attributes"]["fabricDeviceId"]["string"])
            if parsed is not None:
                self.numbers.add(parsed[2])


async def bound_pods(w: World, names: list[str]) -> dict[str, str] | None:
    out = {}
    for name in names:
        pod = await w.kube.get(f"{PODS}/{name}")
        if not pod["spec"].get("nodeName"):
            return None
        out[name] = pod["spec"]["nodeName"]
    return out


async def gpus_behind(w: World) -> dict[str, str]:
    """Published device id -> the GPU the fabric attached for it (they differ only for an
    anonymous slot, whose resource records the GPU that arrived through it)."""
    return {
        fabric_device(o): attached_device(o)
        for o in (await w.kube.get(RESOURCES))["items"]
        if o["spec"].get("target_node") in w.nodes
    }


async def our_slices(w: World) -> list[Obj]:
    return [s for s in (await w.kube.get(SLICES))["items"] if s["spec"]["driver"] == w.driver]


@pytest.mark.parametrize("world", [{"nodes": 4, "gpus": 24}], indirect=True)
async def test_twenty_pods_bind_in_one_cycle_with_devices_on_their_nodes(world: World) -> None:
    history = ClaimHistory(world.kube, world.suffix)
    watch = asyncio.create_task(history.informer.run())
    world.tasks.append(watch)
    offered = SlotNumbers(world.kube, world.driver)
    world.tasks.append(asyncio.create_task(offered.informer.run()))
    role = await world.start_role()
    await asyncio.wait_for(role.publisher.synced.wait(), 30)
    names = [f"p{world.suffix}-{i:02d}" for i in range(20)]
    await asyncio.gather(*(world.claim_and_pod(n) for n in names))
    placed = await until(lambda: bound_pods(world, names), what="all 20 pods bound", timeout=90)

    emulator = {d.spec.id: d for d in world.emulator.state.devices.values()}
    behind = await gpus_behind(world)
    used: dict[str, str] = {}
    physical: dict[str, str] = {}
    for name in names:
        claim = await world.kube.get(f"{CLAIMS}/{name}")
        (b,) = claimmodel.bindings(claim, world.driver)
        assert b.ready, f"{name} has no FabricDeviceReady"
        assert b.node == placed[name], "the pod landed on the node its claim was pinned to"
        device = role.publisher.device_id_of(b.pool, b.device)
        assert device is not None
        assert device not in used, f"{device} is in two claims: {used[device]} and {name}"
        used[device] = name
        gpu = behind.get(device, device)  # for an anonymous slot: the GPU that arrived
        assert gpu not in physical, f"GPU {gpu} is in two claims: {physical[gpu]} and {name}"
        physical[gpu] = name
        assert emulator[gpu].state == DeviceState.ATTACHED
        assert emulator[gpu].machine == world.machine_of(b.node)
        assert not history.cleared(name), f"{name}'s allocation was cleared: a reschedule"
    attached = {i for i, d in emulator.items() if d.state != DeviceState.FREE}
    assert attached == set(physical), "no device attached that no claim holds"
    assert world.emulator.state.attach_started == 20
    beyond = sorted(n for n in offered.numbers if n >= len(emulator))
    assert not beyond, f"free slots offered beyond the fabric's {len(emulator)} GPUs: {beyond}"

    slices = await our_slices(world)
    by_name = {d["name"]: d for s in slices for d in s["spec"]["devices"]}
    for device, claim_name in used.items():
        entry = next(
            e for e in by_name.values() if e["attributes"]["fabricDeviceId"]["string"] == device
        )
        assert entry.get("nodeName") == placed[claim_name]
        assert "bindingConditions" not in entry
    free = [e for e in by_name.values() if "nodeName" not in e]
    assert len(free) == 4
    assert all(e["bindsToNode"] for e in free)
    pools = {s["spec"]["pool"]["name"] for s in slices}
    assert pools == {f"fab-{world.suffix}"}
    for node in world.nodes:
        obj = await world.kube.get(f"/api/v1/nodes/{node}")
        assert obj["metadata"]["labels"]["cohdi.io/fabric"] == f"fab-{world.suffix}"


@pytest.mark.parametrize("world", [{"nodes": 2, "gpus": 3}], indirect=True)
async def test_failed_attach_fails_the_claim_and_the_pod_lands_with_another_device(
    world: World,
) -> None:
    history = ClaimHistory(world.kube, world.suffix)
    world.tasks.append(asyncio.create_task(history.informer.run()))
    role = await world.start_role()
    await asyncio.wait_for(role.publisher.synced.wait(), 30)
    world.emulator.state.faults.fail_next_attaches = 1
    name = f"p{world.suffix}-0"
    await world.claim_and_pod(name)
    await until(lambda: bound_pods(world, [name]), what="the pod bound after a retry", timeout=90)
    failed = [d for d in world.emulator.state.devices.values() if d.state == DeviceState.FAILED]
    assert len(failed) == 1
    claim = await world.kube.get(f"{CLAIMS}/{name}")
    (b,) = claimmodel.bindings(claim, world.driver)
    assert b.ready
    held = role.publisher.device_id_of(b.pool, b.device) or ""
    assert (await gpus_behind(world)).get(held, held) != failed[0].spec.id
    assert history.cleared(name), "the scheduler dropped the failed allocation and retried"
    events = await world.kube.get(
        "/api/v1/namespaces/default/events", fieldSelector=f"involvedObject.name={name}"
    )
    assert any(
        e["reason"] == "InjectedFailure" or "failed" in e["message"] for e in events["items"]
    )

    def offered() -> set[str]:
        return {
            d["attributes"]["fabricDeviceId"]["string"]
            for s in role.publisher.slices.store.values()
            if s["spec"]["driver"] == world.driver
            for d in s["spec"]["devices"]
        }

    assert failed[0].spec.id not in offered(), "a failed device is not offered"
    free_before = len(offered()) - 1  # minus the one the pod holds
    world.emulator.state.heal(failed[0].spec.id)

    async def back() -> bool:
        if world.backend == "fti":  # a healed GPU is one more in the free count
            return len(offered()) - 1 == free_before + 1
        return failed[0].spec.id in offered()

    await until(back, what="the healed device offered again", timeout=10)


@pytest.mark.parametrize("world", [{"nodes": 2, "gpus": 4, "idle_grace": 1.0}], indirect=True)
async def test_idle_devices_are_detached_and_offered_free_again(world: World) -> None:
    role = await world.start_role()
    await asyncio.wait_for(role.publisher.synced.wait(), 30)
    names = [f"p{world.suffix}-{i}" for i in range(3)]
    await asyncio.gather(*(world.claim_and_pod(n) for n in names))
    await until(lambda: bound_pods(world, names), what="pods bound", timeout=60)
    assert sum(d.state == DeviceState.ATTACHED for d in world.emulator.state.devices.values()) == 3
    for n in names:
        await finish(world.kube, n)

    async def all_free() -> bool:
        return all(d.state == DeviceState.FREE for d in world.emulator.state.devices.values())

    await until(all_free, what="idle devices detached", timeout=30)

    async def slices_free() -> bool:
        devices = [d for s in await our_slices(world) for d in s["spec"].get("devices") or []]
        return len(devices) == 4 and all(
            d.get("bindsToNode") and "nodeName" not in d for d in devices
        )

    await until(slices_free, what="the pool slices to show every device free", timeout=10)
