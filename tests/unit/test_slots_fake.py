"""Anonymous slots (fabric managers that give a free *count*, like the FTI API) through the whole
cluster role on the in-memory API server: one identity per physical GPU at every step, a lost
attach answer adopted instead of attaching a second GPU, and GPUs attached behind the agent's back
adopted and scaled down. The same for a fabric that names its devices, where it applies."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from agent.kube.resources import RESOURCES, resource_name
from agent.model import pool as poolmodel
from agent.model import slots as slotmodel
from agent.model.fabric import DeviceId, DeviceState, FabricId, Inventory, MachineId, PoolDevice
from agent.model.objects import attached_device, fabric_device
from tests.unit.test_cluster_role_fake import A100, FABRIC, World, world

# In-memory worlds only: graces, settle periods and backoff pass in virtual time.
pytestmark = pytest.mark.virtualtime


def slot(n: int) -> str:
    return slotmodel.slot_id(FABRIC, A100, n)


def physical_of_claims(w: World) -> dict[str, str]:
    """claim -> the physical GPU behind the device it holds (through its resource, if a slot)."""
    by_identity = {
        fabric_device(o): attached_device(o)
        for o in w.kube.objects("composableresources")
        if "deletionTimestamp" not in o["metadata"]
    }
    names = {w.device_name(d): d for d in [*w.fabric.devices, *map(slot, range(16))]}
    out = {}
    for c in w.kube.objects("resourceclaims"):
        for r in (
            ((c.get("status") or {}).get("allocation") or {}).get("devices", {}).get("results", [])
        ):
            ident = names[r["device"]]
            out[c["metadata"]["name"]] = by_identity.get(ident, ident)
    return out


def pick(w: World, node: str) -> tuple[str, bool]:
    """What the scheduler's allocator would give a new claim on `node`: an offered device no
    claim holds — an attached one on that node first, else a free one (binding conditions)."""
    held = {
        r["device"]
        for c in w.kube.objects("resourceclaims")
        for r in ((c.get("status") or {}).get("allocation") or {})
        .get("devices", {})
        .get("results", [])
    }
    offered = w.offered()
    for name, entry in sorted(offered.items()):
        if name not in held and entry.get("nodeName") == node:
            return name, False
    for name, entry in sorted(offered.items()):
        if name not in held and entry.get("bindsToNode"):
            return name, True
    raise AssertionError(f"nothing offered for {node}: {sorted(offered)}; held {sorted(held)}")


def after_each_slice_write(w: World, probe: Callable[[], list[str]]) -> list[str]:
    """What `probe()` finds just after each ResourceSlice write of the world (so in every state
    the scheduler could have read), in one list."""
    seen: list[str] = []

    def check(req: Any) -> None:
        if req.method in ("POST", "PUT") and "resourceslices" in req.path:
            asyncio.get_running_loop().call_soon(lambda: seen.extend(probe()))

    w.kube.on_request(check)
    return seen


async def attach_behind_our_back(w: World, gpu: str, node: str) -> None:
    """The fabric attaches `gpu` to `node`'s machine without the agent; returns once it is
    offered on that node under its own id (as the scheduler then sees it)."""
    w.fabric.set(gpu, DeviceState.ATTACHED, f"m-{node}")
    await w.wait(
        lambda: w.offered().get(w.device_name(gpu), {}).get("nodeName") == node,
        f"{gpu} offered on {node}",
    )


def allocate_name(w: World, claim: str, name: str, node: str, conditions: bool) -> None:
    device = next(d for d in [*w.fabric.devices, *map(slot, range(16))] if w.device_name(d) == name)
    w.allocate(claim, device, node, conditions=conditions)


async def test_a_slot_keeps_its_name_and_the_gpu_is_never_offered_twice() -> None:
    async with world(anonymous=True, gpus=3) as w:
        assert sorted(w.offered()) == sorted(w.device_name(slot(n)) for n in range(3))
        w.new_claim("c1")
        w.allocate("c1", slot(0), "node-0")
        await w.wait(lambda: w.condition("c1", poolmodel.READY), "c1 ready")
        gpu = attached_device(w.resource(resource_name(slot(0))) or {})
        assert w.fabric.attached_to(gpu) == "m-node-0"
        offered = await w.wait(
            lambda: (o := w.offered()).get(w.device_name(slot(0)), {}).get("nodeName") and o,
            "slot 0 offered as attached",
        )
        assert w.device_name(gpu) not in offered  # no second identity
        # the free count (2) is offered under the numbers nobody holds: 1 and 2
        free = sorted(n for n, e in offered.items() if e.get("bindsToNode"))
        assert free == sorted(w.device_name(slot(n)) for n in (1, 2))


async def test_pods_one_after_another_on_one_node_never_share_a_gpu() -> None:
    async with world(anonymous=True, gpus=4, idle_grace=0.3) as w:
        live: list[str] = []
        for i in range(16):
            if len(live) == 3:  # a pod ends; its GPU idles, may go back, may be taken again
                w.release(live.pop(0))
            claim = f"c{i}"
            w.new_claim(claim)
            name, conditions = await w.wait(lambda: try_pick(w, "node-0"), "something offered")
            allocate_name(w, claim, name, "node-0", conditions)
            live.append(claim)
            if conditions:
                await w.wait(lambda c=claim: w.condition(c, poolmodel.READY), f"{claim} ready")
            phys = physical_of_claims(w)
            assert len(set(phys.values())) == len(phys), phys  # no GPU held by two claims
            await asyncio.sleep(0.1 * (i % 4))  # sometimes past the idle grace, sometimes not


def try_pick(w: World, node: str) -> tuple[str, bool] | None:
    """`pick`, or None when nothing is offered for `node`."""
    try:
        return pick(w, node)
    except AssertionError:
        return None


async def test_a_lost_attach_answer_is_adopted_not_attached_twice() -> None:
    async with world(anonymous=True, gpus=3, idle_grace=0.5) as w:
        w.fabric.lose_answer = 1
        w.new_claim("c1")
        w.allocate("c1", slot(0), "node-0")
        await w.wait(lambda: w.condition("c1", poolmodel.READY), "c1 ready")
        attached = [d for d in w.fabric.devices if w.fabric.attached_to(d)]
        assert len(attached) == 1  # one GPU, not two
        owner = w.resource(resource_name(slot(0)))
        assert owner is not None
        assert attached_device(owner) == attached[0]
        # and it is scaled down later like any other
        w.release("c1")
        await w.wait(lambda: not any(w.fabric.attached_to(d) for d in w.fabric.devices), "idle")


@pytest.mark.parametrize("anonymous", [False, True])
async def test_a_gpu_attached_behind_our_back_is_adopted_and_detached(anonymous: bool) -> None:
    async with world(anonymous=anonymous, gpus=2, idle_grace=0.5) as w:
        w.role.scaler.orphan_grace = 0.3
        w.fabric.set("gpu-1", DeviceState.ATTACHED, "m-node-1")
        await w.wait(lambda: w.fabric.attached_to("gpu-1") is None, "orphan detached", timeout=10)
        events: list[dict[str, Any]] = w.events("OrphanAdopted")
        assert events
        assert w.resource(resource_name("gpu-1")) is None


async def test_an_orphan_a_claim_holds_is_kept() -> None:
    async with world(gpus=2, idle_grace=0.3) as w:
        w.role.scaler.orphan_grace = 0.2
        # the scheduler hands it out as an attached device before the agent adopts it
        await attach_behind_our_back(w, "gpu-1", "node-1")
        w.new_claim("c1")
        w.allocate("c1", "gpu-1", "node-1", conditions=False)
        await w.wait(lambda: w.resource(resource_name("gpu-1")) is not None, "adopted")
        await asyncio.sleep(1.0)
        assert w.fabric.attached_to("gpu-1") == "m-node-1"  # held: never scaled down
        assert w.kube.get_obj(f"{RESOURCES}/{resource_name('gpu-1')}") is not None


async def test_a_gpu_detached_back_into_the_free_count_is_never_offered_under_its_own_id() -> None:
    """On a fabric that counts its free GPUs (FTI), the detach's answer names the GPU, which
    is now back in the count with no identity of its own: offered under its own id it would be a
    free device the fabric cannot attach by name (claims got `UnknownDevice`), or — from a read
    still under way during the detach — an attached GPU on its old node that no resource holds.
    (CI's churn on FTI: a pod bound on one node to a GPU attached on another.)"""
    async with world(anonymous=True, gpus=3, idle_grace=0.2) as w:
        real = {w.device_name(d) for d in w.fabric.devices}
        seen = after_each_slice_write(w, lambda: sorted(real & set(w.offered())))
        w.fabric.watch_lag = 1.0  # the fabric is polled: its reads trail the composer's answers
        w.new_claim("c1")
        w.allocate("c1", slot(0), "node-0")
        await w.wait(lambda: w.condition("c1", poolmodel.READY), "c1 ready")
        gpu = attached_device(w.resource(resource_name(slot(0))) or {})
        w.release("c1")
        await w.wait(lambda: w.fabric.detaches, "the idle GPU detached")
        assert w.fabric.devices[gpu].state == DeviceState.FREE
        await w.wait(
            lambda: (
                sorted(n for n, e in w.offered().items() if e.get("bindsToNode"))
                == sorted(w.device_name(slot(n)) for n in range(3))
            ),
            "three free slots offered again",
        )
        await asyncio.sleep(0.3)
        assert seen == [], f"offered under its own id: {sorted(set(seen))}"
        inventory = w.role.publisher.inventory
        assert inventory is not None
        assert inventory.device(gpu) is None  # in the count, not a device of its own


async def test_a_gpu_arriving_before_the_next_fabric_read_takes_its_number_out_of_the_count() -> (
    None
):
    """The composer publishes a GPU that arrived through a slot at once, before the next fabric
    read brings the lower free count. Added to the inventory with the old count kept, the view
    offered one free number more than the fabric had GPUs for each such arrival (`free-3` of 3
    GPUs here; CI's scale-up on FTI allocated `free-24` and `free-25` of 24, which never came
    back, and the claims were rescheduled). Every slice written offers at most as many free slots
    as the fabric has free GPUs."""
    async with world(anonymous=True, gpus=3) as w:
        beyond = w.device_name(slot(3))
        seen = after_each_slice_write(w, lambda: [n for n in w.offered() if n == beyond])
        w.fabric.watch_lag = 1.0  # the fabric is polled: its reads trail the composer's answers
        w.new_claim("c1")
        w.allocate("c1", slot(0), "node-0")
        await w.wait(lambda: w.condition("c1", poolmodel.READY), "c1 ready")
        await w.wait(
            lambda: w.offered().get(w.device_name(slot(0)), {}).get("nodeName"),
            "slot 0 offered as attached",
        )
        assert beyond not in w.offered()
        await asyncio.sleep(1.5)  # the trailing read arrives
        free = sorted(n for n, e in w.offered().items() if e.get("bindsToNode"))
        assert free == sorted(w.device_name(slot(n)) for n in (1, 2))
        assert seen == [], "offered a free slot the fabric has no GPU for"


def test_with_arrival_takes_a_new_gpu_out_of_its_models_count_only() -> None:
    v100 = "V100"
    inv = Inventory(
        (), (*slotmodel.placeholders(FABRIC, A100, 3), *slotmodel.placeholders(FABRIC, v100, 2))
    )
    gpu = PoolDevice(
        DeviceId("gpu-7"), FabricId(FABRIC), A100, DeviceState.ATTACHED, machine=MachineId("m-0")
    )
    after = slotmodel.with_arrival(inv, gpu)
    ids = sorted(d.id for d in after.devices)
    # the highest A100 number goes; the V100 count is untouched
    assert ids == sorted(
        [
            "gpu-7",
            *(slotmodel.slot_id(FABRIC, A100, n) for n in (0, 1)),
            *(slotmodel.slot_id(FABRIC, v100, n) for n in (0, 1)),
        ]
    )
    # the same answer again (or a read already listed it): the count is not taken twice
    again = slotmodel.with_arrival(after, replace(gpu, pci_address="0000:41:00.0"))
    assert len(again.devices) == len(after.devices)
    assert [d.pci_address for d in again.devices if d.id == "gpu-7"] == ["0000:41:00.0"]
    # a fabric that names its free devices has no count: only the entry changes
    named = Inventory((), (replace(gpu, state=DeviceState.FREE, machine=None),))
    assert slotmodel.with_arrival(named, gpu).devices == (gpu,)
    # a failed attach's answer takes nothing from the count
    failed = replace(gpu, id=DeviceId("gpu-8"), state=DeviceState.FAILED)
    assert len(slotmodel.with_arrival(inv, failed).devices) == len(inv.devices) + 1


async def test_a_gpu_read_on_its_node_before_the_attach_answers_is_not_offered_as_its_own() -> None:
    """A fabric read can list the GPU an attach through a slot brought, attached to the node,
    before the attach's answer reaches the composer (the answer and the read race; the FTI
    client reads the machines first). That GPU is the slot's: offered under its own id, with
    its node, for even one slice write, the scheduler could give it to a second claim on that
    node while the first claim's slot resolves to it too. While a slot of a model waits on a
    machine, a GPU of that model that appears there and no resource names is not offered."""
    async with world(anonymous=True, gpus=3) as w:
        real = {w.device_name(d) for d in w.fabric.devices}
        seen = after_each_slice_write(w, lambda: sorted(real & set(w.offered())))
        w.fabric.answer_lag = 0.5
        w.new_claim("c1")
        w.allocate("c1", slot(0), "node-0")
        await w.wait(lambda: w.fabric.attaches, "the attach under way")
        await asyncio.sleep(0.3)  # the read listing the GPU attached, the answer not back yet
        assert not real & set(w.offered()), "the arriving GPU is offered under its own id"
        await w.wait(lambda: w.condition("c1", poolmodel.READY), "c1 ready")
        assert seen == [], f"offered under its own id: {sorted(set(seen))}"


def test_view_holds_back_an_unnamed_gpu_where_a_slot_is_arriving() -> None:
    gpu = PoolDevice(
        DeviceId("gpu-7"), FabricId(FABRIC), A100, DeviceState.ATTACHED, machine=MachineId("m-0")
    )
    inv = Inventory((), (gpu, *slotmodel.placeholders(FABRIC, A100, 2)))
    held = {slotmodel.slot_id(FABRIC, A100, 0): None}

    def ids(**kw: Any) -> set[str]:
        return {d.id for d in slotmodel.view(inv, held, **kw).devices}

    assert "gpu-7" not in ids(arriving={("m-0", A100)})  # maybe the slot's GPU: held back
    assert "gpu-7" in ids(arriving={("m-0", A100)}, named={"gpu-7"})  # a resource's own
    assert "gpu-7" in ids(arriving={("m-1", A100)})  # the slot arrives elsewhere
    assert "gpu-7" in ids(arriving={("m-0", "V100")})  # ... or is of another model
    assert "gpu-7" in ids()  # nothing arriving: an attached GPU no one holds is offered


async def test_a_slot_attach_never_adopts_a_gpu_a_claim_holds() -> None:
    """Before it attaches through a slot, the composer adopts a GPU of the model on the machine
    that no resource names (an earlier attach's lost answer). A GPU attached behind the agent's
    back is such a GPU too, and it is offered on its node under its own id: a claim the scheduler
    gave it to (no binding conditions, so no resource yet) must keep it, and the slot gets a GPU
    of its own."""
    async with world(anonymous=True, gpus=3) as w:
        w.role.scaler.orphan_grace = 3600  # not adopted as an orphan within the test
        await attach_behind_our_back(w, "gpu-0", "node-0")
        w.new_claim("c1")
        w.allocate("c1", "gpu-0", "node-0", conditions=False)
        w.new_claim("c2")
        w.allocate("c2", slot(0), "node-0")
        await w.wait(lambda: w.condition("c2", poolmodel.READY), "c2 ready")
        gpu = attached_device(w.resource(resource_name(slot(0))) or {})
        assert gpu != "gpu-0", "the slot adopted the GPU claim c1 holds"
        assert w.fabric.attached_to(gpu) == "m-node-0"
        phys = physical_of_claims(w)
        assert len(set(phys.values())) == len(phys), phys
