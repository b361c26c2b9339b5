"""Attacks on anonymous slots (agent.model.slots) through the whole cluster role on the in-memory
API server and fabric: sequences that could offer one GPU under two identities, or more
identities than the fabric has GPUs, or hide a GPU for good."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.kube.resources import RESOURCES, resource_name
from agent.model import slots as slotmodel
from tests.unit.test_cluster_role_fake import A100, DRIVER, FABRIC, POOL, World, model_only, world
from tests.unit.test_slots_fake import physical_of_claims, try_pick

# In-memory worlds only: graces, settle periods and backoff pass in virtual time.
pytestmark = pytest.mark.virtualtime


def slot(n: int) -> str:
    return slotmodel.slot_id(FABRIC, A100, n)


def fabric_pool_offers(w: World) -> dict[str, dict[str, Any]]:
    """Device name -> entry, over our slices of the fabric pool (not the node-local pools)."""
    out = {}
    for s in w.kube.objects("resourceslices"):
        if s["spec"]["driver"] == DRIVER and s["spec"]["pool"]["name"] == POOL:
            for d in s["spec"].get("devices") or []:
                out[d["name"]] = d
    return out


async def test_a_model_only_gpu_goes_straight_to_its_nodes_pool_on_a_counting_fabric() -> None:
    """Warm capacity (a model-only resource) on a fabric that counts its free GPUs: the composer
    chooses a free slot number, records it (`status.cdi_device_id`), attaches through it, and places
    the GPU that arrives in its node's own pool before publishing it — it is never offered in the
    fabric pool. While the resource's record still names only the slot, the view held back the
    placed GPU as "maybe that slot's", and the publisher forgot the placement (a placed device the
    view does not list is no longer placed): the GPU was then offered in the fabric pool, attached
    to node-0, until the scaler's move brought it back."""
    async with world(anonymous=True, gpus=3) as w:
        real = {w.device_name(d) for d in w.fabric.devices}
        seen: list[str] = []

        def check(req: Any) -> None:
            if req.method in ("POST", "PUT") and "resourceslices" in req.path:
                asyncio.get_running_loop().call_soon(
                    lambda: seen.extend(sorted(real & set(fabric_pool_offers(w))))
                )

        w.kube.on_request(check)
        w.fabric.answer_lag = 0.5  # the record of the chosen slot lands before the answer
        model_only(w, "warm-0", "node-0")
        await w.wait(
            lambda: (w.resource("warm-0") or {}).get("status", {}).get("state") == "Online",
            "warm-0 online",
        )
        gpu = (w.resource("warm-0") or {})["status"]["cdi_device_id"]
        assert w.role.publisher.placed_on(gpu) == "node-0"
        await asyncio.sleep(0.5)
        assert seen == [], f"offered in the fabric pool: {sorted(set(seen))}"
        assert w.role.publisher.placed_on(gpu) == "node-0"


async def test_a_model_only_gpu_read_before_its_answer_is_not_offered_in_the_fabric_pool() -> None:
    """The same for a read taken during a model-only resource's attach: the GPU it lists
    attached to node-0 is the chosen slot's, not a device to offer with nodeName node-0."""
    async with world(anonymous=True, gpus=3) as w:
        real = {w.device_name(d) for d in w.fabric.devices}
        w.fabric.answer_lag = 0.5
        model_only(w, "warm-0", "node-0")
        await w.wait(lambda: w.fabric.attaches, "the attach under way")
        await asyncio.sleep(0.3)  # the read listing the GPU attached, the answer not back yet
        assert not real & set(fabric_pool_offers(w)), sorted(fabric_pool_offers(w))


@pytest.mark.parametrize(
    ("answer_lag", "watch_lag", "lose_every"), [(0.3, 0.4, 3), (0.0, 0.7, 2), (0.4, 0.0, 4)]
)
async def test_churn_on_two_nodes_never_offers_more_identities_than_gpus(
    answer_lag: float, watch_lag: float, lose_every: int
) -> None:
    """Claims on two nodes one after another, the scheduler taking what the slices offer (an
    attached GPU on the node first, else a free slot), answers lagging the fabric, fabric reads
    lagging the answers, every few attaches an answer lost (the composer adopts the GPU), pods
    ending and their GPUs detached after the idle grace. At every slice write: no more identities
    offered than the fabric has GPUs, and no GPU behind a slot offered under its own id too; no
    GPU held by two claims; and once every pod ended, every GPU is free and offered again."""
    gpus = 4
    async with world(anonymous=True, gpus=gpus, idle_grace=0.3) as w:
        bad: list[str] = []

        def check() -> None:
            offered = set(w.offered())
            if len(offered) > gpus:
                bad.append(f"{len(offered)} identities offered: {sorted(offered)}")
            for o in w.kube.objects("composableresources"):
                dev = (o.get("status") or {}).get("cdi_device_id") or ""
                behind_slot = slotmodel.is_slot(o["spec"].get("fabric_device") or "")
                if (
                    behind_slot
                    and dev
                    and not slotmodel.is_slot(dev)
                    and w.device_name(dev) in offered
                ):
                    bad.append(f"{dev} offered under its own id and as {o['spec']}")

        def hook(req: Any) -> None:
            if req.method in ("POST", "PUT") and "resourceslices" in req.path:
                asyncio.get_running_loop().call_soon(check)

        w.kube.on_request(hook)
        w.fabric.answer_lag = answer_lag
        w.fabric.watch_lag = watch_lag
        live: list[str] = []
        for i in range(14):
            if len(live) == 3:
                w.release(live.pop(0))
            node = f"node-{i % 2}"
            if i % lose_every == 0:
                w.fabric.lose_answer = 1
            claim = f"c{i}"
            w.new_claim(claim)
            picked = await w.wait(lambda n=node: try_pick(w, n), "something offered")
            name, conditions = picked
            device = next(
                d for d in [*w.fabric.devices, *map(slot, range(16))] if w.device_name(d) == name
            )
            w.allocate(claim, device, node, conditions=conditions)
            live.append(claim)
            await asyncio.sleep(0.15 * (i % 3))
            phys = physical_of_claims(w)
            assert len(set(phys.values())) == len(phys), phys  # no GPU held by two claims
        await asyncio.sleep(3)
        assert bad == []
        for claim in live:
            w.release(claim)
        # nothing hidden for good: every GPU comes back as a free slot
        await w.wait(
            lambda: sorted(w.offered()) == sorted(w.device_name(slot(n)) for n in range(gpus)),
            "every GPU free and offered again",
            timeout=30,
        )
        assert bad == []


@pytest.mark.parametrize("lose", [False, True])
async def test_a_resource_deleted_while_its_slot_attaches_leaves_nothing_hidden(lose: bool) -> None:
    """The claim goes (and its resource is deleted) while the attach through its slot is under
    way, its answer late — or lost. Meanwhile the GPU is held back (maybe the slot's); afterwards
    it is neither offered under its own id while attached to nobody's resource for good, nor
    hidden for good: it is detached, and every GPU is a free slot again."""
    async with world(anonymous=True, gpus=2, idle_grace=0.2) as w:
        w.role.scaler.orphan_grace = 0.3
        w.fabric.answer_lag = 0.5
        if lose:
            w.fabric.lose_answer = 1
        w.new_claim("c1")
        w.allocate("c1", slot(0), "node-0")
        await w.wait(lambda: w.fabric.attaches, "the attach under way")
        await w.wait(lambda: w.resource(resource_name(slot(0))), "its resource")
        w.release("c1")
        w.kube.remove(f"{RESOURCES}/{resource_name(slot(0))}")
        await w.wait(
            lambda: (
                not any(w.fabric.attached_to(d) for d in w.fabric.devices)
                and sorted(w.offered()) == sorted(w.device_name(slot(n)) for n in range(2))
            ),
            "every GPU detached and offered as a free slot",
            timeout=30,
        )
        assert w.fabric.detaches  # it was attached, and went back
        # one attach through the slot; anything after (adoption of the orphan) names its GPU
        assert [d for d, _ in w.fabric.attaches if slotmodel.is_slot(d)] == [slot(0)]
