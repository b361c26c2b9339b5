"""Attached GPUs first: idle attached GPUs are offered from their node's own pool (no binding
conditions, so the scheduler's first-fit allocator takes them before any GPU that needs an
attach), moved there without ever being offered under two identities; warm capacity keeps idle
GPUs attached on every node. On the in-memory API server and fabric; every slice the publisher
writes is checked as it is written."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from typing import Any

import pytest

from agent.kube.resources import RESOURCES, resource_name
from agent.model import pool as poolmodel
from agent.testing.fakekube import Request
from tests.unit.test_cluster_role_fake import FABRIC, SLICES, World, scale_up, world

# In-memory worlds only: graces, settle periods and backoff pass in virtual time.
pytestmark = pytest.mark.virtualtime

NODE_POOL_0 = poolmodel.node_pool_name(FABRIC, "node-0")


def offered_by_pool(w: World) -> dict[str, dict[str, dict[str, Any]]]:
    """pool -> device name -> entry (with the slice's nodeName folded in)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for s in w.kube.objects("resourceslices"):
        spec = s["spec"]
        for d in spec.get("devices") or []:
            entry = {**d, **({"nodeName": spec["nodeName"]} if spec.get("nodeName") else {})}
            out.setdefault(spec["pool"]["name"], {})[d["name"]] = entry
    return out


class IdentityWatch:
    """After every slice write: no fabric device is offered twice across all our slices."""

    def __init__(self, w: World) -> None:
        self.w = w
        self.writes = 0
        self.twins: list[str] = []
        w.kube.on_request(self._on)

    def _on(self, req: Request) -> None:
        if req.method in ("POST", "PUT", "DELETE") and req.path.startswith(SLICES):
            asyncio.get_running_loop().call_soon(self.check)

    def check(self) -> None:
        self.writes += 1
        ids = Counter(
            d["attributes"][poolmodel.DEVICE_ID_ATTRIBUTE]["string"]
            for s in self.w.kube.objects("resourceslices")
            for d in s["spec"].get("devices") or []
        )
        self.twins += [f"{dev} offered {n} times" for dev, n in ids.items() if n > 1]


async def test_an_idle_attached_gpu_moves_to_its_nodes_pool_and_is_taken_from_there() -> None:
    async with world(gpus=3, scale_down_settle=0.2) as w:
        watch = IdentityWatch(w)
        await scale_up(w, "c1", "gpu-0", "node-0")
        w.release("c1")
        entry = await w.wait(
            lambda: offered_by_pool(w).get(NODE_POOL_0, {}).get(w.device_name("gpu-0")),
            "gpu-0 offered from node-0's pool",
        )
        assert entry["nodeName"] == "node-0"
        assert "bindingConditions" not in entry
        assert w.device_name("gpu-0") not in offered_by_pool(w)[POOL_FABRIC()]
        # the scheduler takes it from there: no binding conditions, no attach
        w.new_claim("c2")
        w.allocate_in("c2", NODE_POOL_0, "gpu-0", "node-0")
        await asyncio.sleep(0.3)
        assert w.fabric.attaches == [("gpu-0", "m-node-0")]  # still the one attach
        cr = w.resource(resource_name("gpu-0"))
        assert cr is not None
        assert "deletionTimestamp" not in cr["metadata"]
        assert watch.twins == []
        assert watch.writes > 0


def POOL_FABRIC() -> str:
    return poolmodel.pool_name(FABRIC)


async def test_a_move_is_abandoned_when_a_claim_takes_the_gpu_while_it_settles() -> None:
    async with world(gpus=2, scale_down_settle=1.5) as w:
        watch = IdentityWatch(w)
        await scale_up(w, "c1", "gpu-0", "node-0")
        w.release("c1")
        await w.wait(
            lambda: w.device_name("gpu-0") not in offered_by_pool(w).get(POOL_FABRIC(), {}),
            "gpu-0 withheld for the move",
        )
        # the scheduler allocated the old identity from its older view of the slices
        w.new_claim("c2")
        w.allocate("c2", "gpu-0", "node-0", conditions=False)
        await asyncio.sleep(2.0)
        pools = offered_by_pool(w)
        assert w.device_name("gpu-0") not in pools.get(NODE_POOL_0, {})  # stayed where held
        assert pools[POOL_FABRIC()][w.device_name("gpu-0")]["nodeName"] == "node-0"
        assert watch.twins == []


async def test_node_pool_gpus_are_scaled_down_after_the_grace() -> None:
    async with world(gpus=2, idle_grace=1.0, scale_down_settle=0.1) as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        w.release("c1")
        await w.wait(lambda: w.fabric.attached_to("gpu-0") is None, "detached", timeout=10)
        await w.wait(
            lambda: (
                "bindsToNode"
                in offered_by_pool(w).get(POOL_FABRIC(), {}).get(w.device_name("gpu-0"), {})
            ),
            "offered free from the fabric pool again",
        )
        assert NODE_POOL_0 not in offered_by_pool(w)


async def test_warm_capacity_keeps_an_idle_gpu_attached_on_every_node() -> None:
    async with world(gpus=4, warm_devices=1, scale_down_settle=0.1, idle_grace=0.3) as w:
        watch = IdentityWatch(w)

        def warm_on(node: str) -> list[str]:
            return list(offered_by_pool(w).get(poolmodel.node_pool_name(FABRIC, node), {}))

        await w.wait(lambda: warm_on("node-0") and warm_on("node-1"), "one warm GPU per node")
        assert len(w.fabric.attaches) == 2
        # a pod takes node-0's warm GPU: another one is attached to keep node-0 warm
        (name,) = warm_on("node-0")
        w.new_claim("c1")
        w.allocate_in("c1", NODE_POOL_0, w.device_of_name(name), "node-0")
        await w.wait(lambda: len(warm_on("node-0")) == 2, "node-0 warm again")
        await w.wait(lambda: len(w.fabric.attaches) == 3, "a third attach")
        # the pod ends: node-0 has two idle GPUs, one more than it keeps: one goes back
        w.release("c1")
        await w.wait(lambda: len(warm_on("node-0")) == 1, "back to one warm GPU", timeout=10)
        assert len([o for o in w.kube.objects("composableresources")]) >= 2
        assert w.kube.get_obj(f"{RESOURCES}/x") is None
        assert watch.twins == []


async def test_a_device_leaving_one_pool_for_another_is_never_in_both() -> None:
    """One sync in which a device leaves a pool and appears in another (a GPU leaving its node's
    pool as the fabric pool takes it up; an anonymous fabric's free slot number let go by one
    pool and offered by another): the pool that stops offering it is written first, so after
    every single slice write it stands in one pool at most. (Pools used to be written in name
    order, and the fabric pool's name sorts before its node pools': CI's churn on FTI saw a
    slot offered twice.)"""
    async with world(gpus=3, scale_down_settle=0.2) as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        w.release("c1")
        name = w.device_name("gpu-0")
        await w.wait(
            lambda: offered_by_pool(w).get(NODE_POOL_0, {}).get(name), "gpu-0 in node-0's pool"
        )
        watch = IdentityWatch(w)
        fabric_pool = poolmodel.pool_name(FABRIC)

        def move_back(desired: dict[str, list[poolmodel.SliceSpec]]) -> Any:
            out = dict(desired)
            entry = None
            kept = []
            for sl in out.get(NODE_POOL_0, []):
                devices = [d for d in sl.spec["devices"] if d["name"] != name]
                entry = entry or next((d for d in sl.spec["devices"] if d["name"] == name), None)
                kept.append(dataclasses.replace(sl, spec={**sl.spec, "devices": devices}))
            out[NODE_POOL_0] = kept
            assert entry is not None
            first, *rest = out[fabric_pool]
            moved = {**entry, "nodeName": "node-0"}
            grown = {**first.spec, "devices": [*first.spec["devices"], moved]}
            out[fabric_pool] = [dataclasses.replace(first, spec=grown), *rest]
            return out

        w.role.publisher.shape = move_back
        w.role.publisher.changed()
        await w.wait(
            lambda: (
                name in offered_by_pool(w).get(fabric_pool, {})
                and name not in offered_by_pool(w).get(NODE_POOL_0, {})
            ),
            "gpu-0 moved to the fabric pool",
        )
        assert watch.writes >= 2
        assert watch.twins == []
