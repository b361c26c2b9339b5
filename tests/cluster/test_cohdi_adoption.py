"""Switching a CoHDI site to cohdi-agent: the ComposabilityRequest and ComposableResources CoHDI's
composable-resource-operator wrote (its names, field values, labels and finalizer; state Online,
the GPU attached in the emulator) survive the agent's start as they are — adopted, with not one
fabric call that changes state — and a later delete detaches the GPU as ours would be.

Shapes, from the operator's source (composable-resource-operator `api/v1alpha1`,
`internal/controller`): the request `composability-<random>` (the scaler's generateName) with
`spec.resource {type, model, size, target_node, allocation_policy, force_detach}` and status
`{state: Running, resources: {<member>: {state, device_id, cdi_device_id, node_name}},
scalarResource}`; its members `gpu-<uuid4>` labelled `app.kubernetes.io/managed-by=<request>`,
with `spec {type, model, target_node, force_detach}` and status `{state: Online, device_id: <GPU
UUID = FM res_serial_num>, cdi_device_id: <FM res_uuid>}`; both with the finalizer
`com.ie.ibm.hpsys/finalizer`. The FTI backend is CoHDI's fabric-manager API."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from agent.kube.resources import FINALIZER, REQUESTS, RESOURCES
from agent.model.fabric import DeviceState
from agent.model.objects import DRIVER_LABEL
from tests.cluster.conftest import A100, World
from tests.waiting import until

pytestmark = [pytest.mark.controlplane, pytest.mark.parametrize("backend", ["fti"], indirect=True)]

API = "cro.hpsys.ibm.ie.com/v1alpha1"


def fabric_changes(w: World) -> list[tuple[str, str]]:
    """Every request to the emulator that can change state (not a read, not a token)."""
    return [
        (method, path)
        for method, path in w.emulator.state.requests
        if method != "GET" and "openid-connect/token" not in path
    ]


async def cohdi_site(w: World, node: str, gpus: list[str]) -> tuple[str, list[str]]:
    """CoHDI's objects for `gpus` (emulator device ids) attached to `node`: a request of that
    size and one member each, as its operator leaves them once Running. Returns the names."""
    for dev in gpus:
        w.emulator.state.preset(dev, DeviceState.ATTACHED, w.machine_of(node))
    request = f"composability-{uuid.uuid4().hex[:5]}"
    resource = {
        "type": "gpu",
        "model": A100,
        "size": len(gpus),
        "target_node": node,
        "allocation_policy": "samenode",
        "force_detach": False,
    }
    await w.kube.create(
        REQUESTS,
        {
            "apiVersion": API,
            "kind": "ComposabilityRequest",
            "metadata": {"name": request, "finalizers": [FINALIZER]},
            "spec": {"resource": resource},
        },
    )
    members: dict[str, dict[str, str]] = {}
    for dev in gpus:
        name = f"gpu-{uuid.uuid4()}"
        serial = w.emulator.state.devices[dev].spec.serial
        await w.kube.create(
            RESOURCES,
            {
                "apiVersion": API,
                "kind": "ComposableResource",
                "metadata": {
                    "name": name,
                    "labels": {"app.kubernetes.io/managed-by": request},
                    "finalizers": [FINALIZER],
                },
                "spec": {"type": "gpu", "model": A100, "target_node": node, "force_detach": False},
            },
        )
        await w.kube.patch(
            f"{RESOURCES}/{name}/status",
            {"status": {"state": "Online", "device_id": serial, "cdi_device_id": dev}},
            content_type="application/merge-patch+json",
        )
        members[name] = {
            "state": "Online",
            "device_id": serial,
            "cdi_device_id": dev,
            "node_name": node,
        }
    await w.kube.patch(
        f"{REQUESTS}/{request}/status",
        {"status": {"state": "Running", "resources": members, "scalarResource": resource}},
        content_type="application/merge-patch+json",
    )
    return request, list(members)


@pytest.mark.parametrize("world", [{"nodes": 2, "gpus": 6}], indirect=True)
async def test_cohdis_objects_survive_the_start_and_detach_on_delete(world: World) -> None:
    node = world.nodes[0]
    devices = sorted(world.emulator.state.devices)[:2]
    request, members = await cohdi_site(world, node, devices)
    role = await world.start_role()
    await asyncio.wait_for(role.publisher.synced.wait(), 30)

    async def adopted() -> bool:
        req = await world.kube.get(f"{REQUESTS}/{request}")
        if (req["metadata"].get("labels") or {}).get(DRIVER_LABEL) is None:
            return False
        if (req.get("status") or {}).get("state") != "Running":
            return False
        for name in members:
            obj = await world.kube.get(f"{RESOURCES}/{name}")
            refs = obj["metadata"].get("ownerReferences") or []
            if not refs or (obj["metadata"].get("labels") or {}).get(DRIVER_LABEL) is None:
                return False
        return True

    await until(adopted, what="the request and its members adopted", timeout=60)
    await asyncio.sleep(3.0)  # every controller has had its look at them
    on_node = [
        o
        for o in (await world.kube.get(RESOURCES))["items"]
        if o["spec"]["target_node"] in world.nodes
    ]
    changes = fabric_changes(world)
    print(
        f"after the start: {len(on_node)} resources (CoHDI's {len(members)}), "
        f"state-changing fabric calls: {len(changes)}, attach requests: "
        f"{world.emulator.state.attach_requests}"
    )
    assert sorted(o["metadata"]["name"] for o in on_node) == sorted(members), "none made, none gone"
    assert all(o["status"]["state"] == "Online" for o in on_node)
    assert changes == []
    assert world.emulator.state.attach_requests == 0
    for dev in devices:
        assert world.emulator.state.devices[dev].state == DeviceState.ATTACHED
        assert world.emulator.state.devices[dev].machine == world.machine_of(node)

    await world.kube.delete(f"{REQUESTS}/{request}")

    async def gone() -> bool:
        left = (await world.kube.get(REQUESTS))["items"]
        return all(r["metadata"]["name"] != request for r in left)

    await until(gone, what="the request and its members gone", timeout=60)
    freed = [world.emulator.state.devices[d].state for d in devices]
    detaches = [(m, p) for m, p in fabric_changes(world) if m == "DELETE"]
    print(f"after the delete: devices {[str(s) for s in freed]}, detach calls {len(detaches)}")
    assert freed == [DeviceState.FREE, DeviceState.FREE]
    assert len(detaches) == len(devices)
    assert world.emulator.state.attach_requests == 0
