"""CoHDI's ComposabilityRequest, unchanged, reconciled into attached devices; invalid ones are
rejected by the CRD schema with the server's message."""

from __future__ import annotations

import asyncio

import pytest
import yaml

from agent import errors
from agent.kube.resources import REQUESTS, RESOURCES
from agent.model.fabric import DeviceState
from tests.cluster.conftest import A100, World
from tests.waiting import until

pytestmark = pytest.mark.controlplane

# As a CoHDI user writes it (CoHDI's own ComposabilityRequest fields), nothing of ours in it.
MANIFEST = """
apiVersion: cro.hpsys.ibm.ie.com/v1alpha1
kind: ComposabilityRequest
metadata:
  name: {name}
spec:
  resource:
    type: gpu
    model: {model}
    size: 2
    force_detach: false
    allocation_policy: samenode
    target_node: {node}
    other_spec:
      milli_cpu: 0
      memory: 0
      ephemeral_storage: 0
      allowed_pod_number: 0
"""


@pytest.mark.parametrize("world", [{"nodes": 2, "gpus": 4}], indirect=True)
async def test_cohdi_request_is_reconciled_and_cleaned_up(world: World) -> None:
    role = await world.start_role()
    await asyncio.wait_for(role.publisher.synced.wait(), 30)
    name = f"req-{world.suffix}"
    node = world.nodes[1]
    await world.kube.create(
        REQUESTS, yaml.safe_load(MANIFEST.format(name=name, model=A100, node=node))
    )

    async def running() -> dict | None:  # type: ignore[type-arg]
        req = await world.kube.get(f"{REQUESTS}/{name}")
        return req if (req.get("status") or {}).get("state") == "Running" else None

    req = await until(running, what="the request to be Running", timeout=30)
    members = req["status"]["resources"]
    assert len(members) == 2
    assert {m["node_name"] for m in members.values()} == {node}
    assert all(m["state"] == "Online" and m["cdi_device_id"] for m in members.values())
    attached = {
        d.spec.id: d.machine
        for d in world.emulator.state.devices.values()
        if d.state == DeviceState.ATTACHED
    }
    assert attached == {m["cdi_device_id"]: world.machine_of(node) for m in members.values()}
    assert req["status"]["scalarResource"]["model"] == A100

    await world.kube.delete(f"{REQUESTS}/{name}")

    async def gone() -> bool:
        try:
            await world.kube.get(f"{REQUESTS}/{name}")
        except errors.KubeNotFound:
            return all(d.state == DeviceState.FREE for d in world.emulator.state.devices.values())
        return False

    await until(gone, what="the request, its resources and attachments to be gone", timeout=30)
    left = [
        o for o in (await world.kube.get(RESOURCES))["items"] if o["spec"]["target_node"] == node
    ]
    assert left == []


@pytest.mark.parametrize("world", [{"nodes": 1, "gpus": 1}], indirect=True)
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"size": -1},
            "spec.resource.size: Invalid value: -1: "
            "spec.resource.size in body should be greater than or equal to 0",
        ),
        (
            {"type": "fpga"},
            'spec.resource.type: Unsupported value: "fpga": supported values: "gpu", "cxlmemory"',
        ),
        (
            {"model": ""},
            'spec.resource.model: Invalid value: "": '
            "spec.resource.model in body should be at least 1 chars long",
        ),
        ({"allocation_policy": "anywhere"}, "spec.resource.allocation_policy: Unsupported value"),
    ],
)
async def test_invalid_requests_are_rejected_by_the_schema(
    world: World, change: dict, message: str
) -> None:  # type: ignore[type-arg]
    doc = yaml.safe_load(
        MANIFEST.format(name=f"bad-{world.suffix}", model=A100, node=world.nodes[0])
    )
    doc["spec"]["resource"].update(change)
    with pytest.raises(errors.KubeInvalid) as info:
        await world.kube.create(REQUESTS, doc)
    assert message in str(info.value)
