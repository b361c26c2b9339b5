"""Device health on the whole cluster role over the in-memory API server and fabric
(`tests/unit/test_cluster_role_fake.py`'s world): the node's `DeviceHealthy` condition and the
fabric's `PoolDevice.health` become `cohdi.io/unhealthy` DRA device taints in the slices, an
unhealthy GPU is swapped out (at once when free of claims, when its claim lets go otherwise), stays
out of the free pool, and comes back after `--health-grace` once healthy. The test writes the
condition on the resource as the node role would, and plays the scheduler (which never allocates a
device whose taint it does not tolerate)."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from typing import Any

import pytest

from agent import settings
from agent.controllers import metrics, running
from agent.kube.resources import REQUESTS, RESOURCES, resource_name
from agent.model import health as healthmodel
from agent.model import slots as slotmodel
from agent.model.fabric import DeviceState
from agent.model.objects import DEVICE_HEALTHY, Obj
from tests.unit.test_cluster_role_fake import (
    A100,
    DRIVER,
    FABRIC,
    World,
    model_only,
    scale_up,
    world,
)

# In-memory worlds only: graces, settle periods and backoff pass in virtual time.
pytestmark = pytest.mark.virtualtime


def set_node_health(
    w: World, device: str, status: str, reason: str = "", message: str = ""
) -> None:
    """What the node role writes: `DeviceHealthy` on the GPU's resource (replacing any earlier)."""

    def change(obj: Obj) -> None:
        conditions = [
            c
            for c in (obj.setdefault("status", {}).get("conditions") or [])
            if c.get("type") != DEVICE_HEALTHY
        ]
        conditions.append(
            {
                "type": DEVICE_HEALTHY,
                "status": status,
                "reason": reason or "Healthy",
                "message": message,
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        )
        obj["status"]["conditions"] = conditions

    assert w.kube.edit(f"{RESOURCES}/{resource_name(device)}", change) is not None


def set_fabric_health(w: World, device: str, health: str, reason: str = "") -> None:
    """The fabric reports the device's health (Redfish Status.Health) on its next read."""
    w.fabric.devices[device] = dataclasses.replace(
        w.fabric.devices[device], health=health, health_reason=reason
    )
    w.fabric._version += 1
    w.fabric._changed.set()


def taints_of(w: World, device: str) -> list[dict[str, Any]] | None:
    """The device's taints as published ([] untainted), None when it is not offered at all."""
    entry = w.offered().get(w.device_name(device))
    return None if entry is None else list(entry.get("taints") or [])


def schedulable_free(w: World) -> list[str]:
    """Free pool devices kube-scheduler could allocate to a claim tolerating nothing."""
    return sorted(
        w.device_of_name(name)
        for name, entry in w.offered().items()
        if entry.get("bindsToNode") and not entry.get("taints")
    )


def counter(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_node_xid79_taints_at_once_keeps_the_gpu_for_its_pod_then_swaps_it_out() -> None:
    async with world(gpus=3, idle_grace=300.0, health_grace=0.3) as w:
        added = counter("cohdi_device_taints_total", change="added")
        await scale_up(w, "c1", "gpu-0", "node-0")
        started = w.mono()
        set_node_health(w, "gpu-0", "False", "Xid79", "GPU has fallen off the bus")
        taints = await w.wait(lambda: taints_of(w, "gpu-0"), "gpu-0 tainted")
        took = w.mono() - started
        print(f"DeviceHealthy=False Xid79 -> taint in the slice: {took * 1000:.0f} ms")
        assert taints == [
            {
                "key": healthmodel.TAINT_KEY,
                "value": "Xid79",
                "effect": "NoSchedule",
                "timeAdded": taints[0]["timeAdded"],
            }
        ]
        assert taints[0]["timeAdded"].endswith("Z")
        assert counter("cohdi_device_taints_total", change="added") == added + 1
        assert counter("cohdi_unhealthy_devices", source="node", reason="Xid79") == 1
        assert [e["reason"] for e in w.events("DeviceUnhealthy")] == ["DeviceUnhealthy"]
        # the held GPU stays with its pod; a new claim gets another GPU
        assert "gpu-0" not in schedulable_free(w)
        await scale_up(w, "c2", schedulable_free(w)[0], "node-0")
        await asyncio.sleep(0.3)
        assert w.fabric.detaches == []
        assert w.fabric.attached_to("gpu-0") == "m-node-0"
        # the pod ends: detached, and kept out of the free pool (tainted) although free
        w.release("c1")
        await w.wait(lambda: w.resource(resource_name("gpu-0")) is None, "gpu-0's resource gone")
        await w.wait(lambda: w.fabric.devices["gpu-0"].state == DeviceState.FREE, "detached")
        assert w.events("UnhealthyDetach")
        assert w.events("ScaleDown") == []
        await w.wait(
            lambda: (w.offered().get(w.device_name("gpu-0")) or {}).get("bindsToNode"),
            "gpu-0 in the free pool again",
        )
        assert taints_of(w, "gpu-0") == taints  # same taint, same timeAdded
        assert "gpu-0" not in schedulable_free(w)
        assert "gpu-0" in w.role.publisher.withheld  # no model-only resource may choose it
        await asyncio.sleep(0.5)  # longer than the grace: the node's word outlives its resource
        assert taints_of(w, "gpu-0") == taints


async def test_a_cleared_condition_lifts_the_taint_after_the_grace() -> None:
    async with world(gpus=2, health_grace=0.4) as w:
        removed = counter("cohdi_device_taints_total", change="removed")
        await scale_up(w, "c1", "gpu-0", "node-0")
        set_node_health(w, "gpu-0", "False", "DoubleBitEcc", "uncorrectable ECC error")
        await w.wait(lambda: taints_of(w, "gpu-0"), "gpu-0 tainted")
        set_node_health(w, "gpu-0", "True")
        cleared = w.mono()
        await w.wait(lambda: taints_of(w, "gpu-0") == [], "taint lifted")
        waited = w.mono() - cleared
        print(f"condition cleared -> taint lifted after {waited:.2f} s (grace 0.4 s)")
        assert waited >= 0.4
        assert counter("cohdi_device_taints_total", change="removed") == removed + 1
        assert counter("cohdi_unhealthy_devices", source="node", reason="DoubleBitEcc") == 0
        assert w.events("DeviceHealthy")
        assert w.fabric.detaches == []  # held all along: never swapped
        assert "gpu-0" not in w.role.publisher.withheld


async def test_a_flap_shorter_than_the_grace_keeps_one_taint() -> None:
    async with world(gpus=2, health_grace=0.5) as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        set_node_health(w, "gpu-0", "False", "Xid48")
        first = await w.wait(lambda: taints_of(w, "gpu-0"), "tainted")
        set_node_health(w, "gpu-0", "True")
        await asyncio.sleep(0.1)
        set_node_health(w, "gpu-0", "False", "Xid48")
        await asyncio.sleep(0.7)
        assert taints_of(w, "gpu-0") == first


async def test_an_unhealthy_idle_gpu_is_detached_at_once_whatever_keeps_idle_ones() -> None:
    async with world(gpus=2, idle_grace=300.0, node_labels={"cohdi.io/min-devices": "5"}) as w:
        await scale_up(w, "c1", "gpu-1", "node-1")
        w.release("c1")
        await asyncio.sleep(0.1)
        assert w.fabric.attached_to("gpu-1") == "m-node-1"  # idle, kept by the node's minimum
        set_node_health(w, "gpu-1", "False", "FellOffBus")
        await w.wait(lambda: w.fabric.devices["gpu-1"].state == DeviceState.FREE, "detached")
        assert w.events("UnhealthyDetach")
        assert counter("cohdi_decisions_total", kind="unhealthy-detach") >= 1


async def test_noexecute_for_node_errors_only_when_eviction_is_allowed() -> None:
    async with world(gpus=2, health_fatal_effect="NoExecute") as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        set_node_health(w, "gpu-0", "False", "Xid79")
        taints = await w.wait(lambda: taints_of(w, "gpu-0"), "tainted")
        assert taints[0]["effect"] == "NoExecute"
        set_fabric_health(w, "gpu-1", "Critical", "link down")
        fabric = await w.wait(lambda: taints_of(w, "gpu-1"), "gpu-1 tainted")
        assert fabric[0]["effect"] == "NoSchedule"  # the fabric's word never evicts


async def test_fabric_critical_on_a_free_gpu_taints_it_within_one_read_and_it_is_never_chosen() -> (
    None
):
    async with world(gpus=2, health_grace=0.3) as w:
        set_fabric_health(w, "gpu-0", "Critical", "PCIe link down")
        taints = await w.wait(lambda: taints_of(w, "gpu-0"), "gpu-0 tainted")
        assert taints[0]["value"] == "FabricCritical"
        assert counter("cohdi_unhealthy_devices", source="fabric", reason="FabricCritical") == 1
        assert schedulable_free(w) == ["gpu-1"]
        # a model-only resource (request member, warm capacity) never chooses it
        model_only(w, "warm-0", "node-0")
        await w.wait(
            lambda: (w.resource("warm-0") or {}).get("status", {}).get("state") == "Online",
            "warm-0 online",
        )
        assert w.resource("warm-0")["status"]["cdi_device_id"] == "gpu-1"  # type: ignore[index]
        # healthy again: offered after the grace
        set_fabric_health(w, "gpu-0", "OK")
        await w.wait(lambda: taints_of(w, "gpu-0") == [], "gpu-0 untainted")
        assert counter("cohdi_unhealthy_devices", source="fabric", reason="FabricCritical") == 0


async def test_a_claim_waiting_for_a_gpu_that_turns_unhealthy_fails_for_another() -> None:
    async with world(gpus=2, double=False) as w:  # no node: the attach never becomes ready
        w.new_claim("c1")
        w.allocate("c1", "gpu-0", "node-0")
        await w.wait(lambda: w.resource(resource_name("gpu-0")), "resource made")
        set_fabric_health(w, "gpu-0", "Critical", "link down")
        failed = await w.wait(lambda: w.condition("c1", "FabricDeviceFailed"), "c1 failed")
        assert failed["reason"] == "DeviceUnhealthy"


async def test_taints_dropped_by_the_api_server_fall_back_to_withholding(caplog: Any) -> None:
    """DRADeviceTaints off: the API server stores the slice without the taints. Said once; the
    unhealthy device is then not offered at all."""
    async with world(gpus=3) as w:
        kube = w.kube
        create, replace = kube.create, kube.replace

        def strip(body: Obj) -> Obj:
            body = copy.deepcopy(body)  # the server's copy: what was sent stays as it was
            for dev in (body.get("spec") or {}).get("devices") or []:
                dev.pop("taints", None)
            return body

        async def create_without(path: str, body: Obj, **kw: Any) -> Obj:
            return await create(path, strip(body) if "resourceslices" in path else body, **kw)

        async def replace_without(path: str, body: Obj, **kw: Any) -> Obj:
            return await replace(path, strip(body) if "resourceslices" in path else body, **kw)

        kube.create = create_without  # type: ignore[method-assign]
        kube.replace = replace_without  # type: ignore[method-assign]
        set_fabric_health(w, "gpu-2", "Critical", "link down")
        await w.wait(lambda: w.device_name("gpu-2") not in w.offered(), "gpu-2 withheld")
        assert w.role.publisher.taints_supported is False
        set_fabric_health(w, "gpu-1", "Critical", "link down")
        await w.wait(lambda: w.device_name("gpu-1") not in w.offered(), "gpu-1 withheld")
        said = [r for r in caplog.records if "DRADeviceTaints" in r.getMessage()]
        assert len(said) == 1


async def test_a_new_leader_keeps_the_node_reported_taint_of_a_detached_gpu() -> None:
    """The node's word on a detached GPU lives only in the leader's memory and the slice: a new
    leader reads the taint back before its first write, so the GPU is never offered untainted."""
    async with world(gpus=2, health_grace=0.2) as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        set_node_health(w, "gpu-0", "False", "Xid79")
        taints = await w.wait(lambda: taints_of(w, "gpu-0"), "gpu-0 tainted")
        w.release("c1")
        await w.wait(lambda: w.fabric.devices["gpu-0"].state == DeviceState.FREE, "detached")
        await w.wait(
            lambda: (w.offered().get(w.device_name("gpu-0")) or {}).get("bindsToNode"),
            "gpu-0 free, tainted",
        )
        old = w.tasks.pop(0)
        old.cancel()
        await asyncio.gather(old, return_exceptions=True)
        seen: list[list[dict[str, Any]] | None] = []
        cfg = settings.Settings(
            cluster=settings.ClusterSettings(
                driver=DRIVER, idle_grace=300.0, scale_down_settle=0.05, health_grace=0.2
            )
        )
        role = running.build(  # type: ignore[arg-type]
            w.kube, w.fabric, cfg, identity="next", wall=w.wall, mono=w.mono
        )
        w.tasks.append(asyncio.create_task(role.run()))
        await w.wait(lambda: role.publisher.syncs >= 1, "the new leader published", timeout=60)
        seen.append(taints_of(w, "gpu-0"))
        await asyncio.sleep(0.5)  # past the grace: the node has said nothing new
        seen.append(taints_of(w, "gpu-0"))
        assert seen == [taints, taints]
        assert role.scaler.unhealthy_reason("gpu-0") == "Xid79"


async def test_a_request_member_on_an_unhealthy_gpu_is_swapped_for_a_healthy_one() -> None:
    """A ComposabilityRequest keeps N GPUs on a node: its member whose GPU turns unhealthy is
    detached (no claim holds it), and the requester's new member gets a healthy GPU."""
    async with world(gpus=3) as w:
        w.kube.add(
            REQUESTS,
            {
                "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
                "kind": "ComposabilityRequest",
                "metadata": {"name": "keep"},
                "spec": {
                    "resource": {
                        "type": "gpu",
                        "model": A100,
                        "size": 1,
                        "allocation_policy": "samenode",
                        "target_node": "node-0",
                    }
                },
            },
        )

        def online_member() -> Obj | None:
            return next(
                (
                    o
                    for o in w.kube.objects("composableresources")
                    if o["metadata"]["name"].startswith("keep-")
                    and (o.get("status") or {}).get("state") == "Online"
                    and "deletionTimestamp" not in o["metadata"]
                ),
                None,
            )

        member = await w.wait(online_member, "the request's member online")
        sick = member["status"]["cdi_device_id"]

        def write(obj: Obj) -> None:
            obj["status"].setdefault("conditions", []).append(
                {"type": DEVICE_HEALTHY, "status": "False", "reason": "Xid79", "message": ""}
            )

        w.kube.edit(f"{RESOURCES}/{member['metadata']['name']}", write)
        await w.wait(lambda: w.fabric.devices[sick].state == DeviceState.FREE, "sick GPU detached")
        replacement = await w.wait(
            lambda: (m := online_member()) and m["status"]["cdi_device_id"] != sick and m,
            "a new member on a healthy GPU",
        )
        assert w.fabric.attached_to(replacement["status"]["cdi_device_id"]) == "m-node-0"
        # free again, the sick one is offered only tainted
        free = await w.wait(lambda: w.offered().get(w.device_name(sick)), "sick GPU offered")
        assert free.get("bindsToNode")
        assert free["taints"][0]["value"] == "Xid79"


async def test_a_slot_held_gpu_is_tainted_under_the_slot_and_swapped_when_its_claim_ends() -> None:
    """An anonymous fabric (FTI): the claim holds a slot, the node names the GPU behind it."""
    async with world(gpus=2, anonymous=True) as w:
        slot = slotmodel.slot_id(FABRIC, A100, 0)
        w.new_claim("c1")
        w.allocate("c1", slot, "node-0")
        await w.wait(lambda: w.condition("c1", "FabricDeviceReady"), "c1 ready")
        resource = w.resource(resource_name(slot))
        assert resource is not None
        gpu = resource["status"]["cdi_device_id"]
        assert gpu != slot

        def write(obj: Obj) -> None:
            obj["status"].setdefault("conditions", []).append(
                {"type": DEVICE_HEALTHY, "status": "False", "reason": "Xid79", "message": ""}
            )

        w.kube.edit(f"{RESOURCES}/{resource_name(slot)}", write)
        taints = await w.wait(lambda: taints_of(w, slot), "the slot tainted")
        assert taints[0]["value"] == "Xid79"
        await asyncio.sleep(0.2)
        assert w.fabric.detaches == []  # its pod still runs
        w.release("c1")
        await w.wait(lambda: w.fabric.devices[gpu].state == DeviceState.FREE, "the GPU detached")
        assert w.events("UnhealthyDetach")
