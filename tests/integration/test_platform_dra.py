"""The platform our design stands on, proven against the real kube-apiserver and kube-scheduler
with no agent code: a pool device with `bindsToNode` + binding conditions is allocated and pinned to
one node, the pod waits in PreBind, and is bound once `FabricDeviceReady=True` appears in the
claim's `status.devices[]`; `FabricDeviceFailed=True` makes the scheduler drop the allocation.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import pytest

from agent.kube.client import Kube, Obj, path_of
from agent.kube.watching import Event, Informer
from tests.waiting import until

pytestmark = [pytest.mark.controlplane, pytest.mark.all_kube_versions]

DRIVER = "platform.cohdi.io"
NS = "default"
FABRIC_LABEL = "cohdi.io/fabric"
SLICES = path_of(group="resource.k8s.io", version="v1", plural="resourceslices")
CLASSES = path_of(group="resource.k8s.io", version="v1", plural="deviceclasses")
CLAIMS = path_of(group="resource.k8s.io", version="v1", plural="resourceclaims", namespace=NS)
PODS = path_of(group="", version="v1", plural="pods", namespace=NS)
NODES = path_of(group="", version="v1", plural="nodes")


async def make_node(kube: Kube, name: str, fabric: str) -> None:
    await kube.create(
        NODES,
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {FABRIC_LABEL: fabric}},
        },
    )
    # NB: the TaintNodesByCondition admission plugin gives every new Node a not-ready taint, which
    # the node lifecycle controller (not running here) would lift once the kubelet reports Ready.
    await kube.patch(f"{NODES}/{name}", {"spec": {"taints": None}})
    capacity = {"pods": "110", "cpu": "8", "memory": "32Gi"}
    await kube.patch(
        f"{NODES}/{name}/status",
        {
            "status": {
                "capacity": capacity,
                "allocatable": capacity,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "played by the test",
                        "lastHeartbeatTime": _now(),
                        "lastTransitionTime": _now(),
                    }
                ],
            }
        },
    )


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pool_slice(name: str, pool: str, fabric: str, local_node: str) -> Obj:
    """One free fabric device (binding conditions, node selector on the fabric label) and one
    device already attached to `local_node` (nodeName, usable at once), in one pool."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name},
        "spec": {
            "driver": DRIVER,
            "pool": {"name": pool, "generation": 1, "resourceSliceCount": 1},
            "perDeviceNodeSelection": True,
            "devices": [
                {
                    "name": "gpu-free",
                    "attributes": {"productName": {"string": "A100"}},
                    "bindsToNode": True,
                    "bindingConditions": ["FabricDeviceReady"],
                    "bindingFailureConditions": ["FabricDeviceFailed"],
                    "nodeSelector": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": FABRIC_LABEL, "operator": "In", "values": [fabric]}
                                ]
                            }
                        ]
                    },
                },
                {
                    "name": "gpu-attached",
                    "attributes": {"productName": {"string": "H100"}},
                    "nodeName": local_node,
                },
            ],
        },
    }


class World:
    """Objects of one test case, unique by suffix so cases share the session's cluster."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        s = uuid.uuid4().hex[:6]
        self.fabric = f"fab-{s}"
        self.nodes = [f"node-a-{s}", f"node-b-{s}"]
        self.device_class = f"gpu-{s}.{DRIVER}"
        self.pool = f"pool-{s}"
        self.claim = f"claim-{s}"
        self.pod = f"pod-{s}"

    async def build(self) -> None:
        for node in self.nodes:
            await make_node(self.kube, node, self.fabric)
        await self.kube.create(
            CLASSES,
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "DeviceClass",
                "metadata": {"name": self.device_class},
                "spec": {"selectors": [{"cel": {"expression": f'device.driver == "{DRIVER}"'}}]},
            },
        )
        stored = await self.kube.create(
            SLICES, pool_slice(f"slice-{self.pool}", self.pool, self.fabric, self.nodes[1])
        )
        free = stored["spec"]["devices"][0]
        assert stored["spec"]["perDeviceNodeSelection"] is True
        assert free["bindsToNode"] is True
        assert free["bindingConditions"] == ["FabricDeviceReady"]
        await self.kube.create(
            CLAIMS,
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "ResourceClaim",
                "metadata": {"name": self.claim},
                "spec": {
                    "devices": {
                        "requests": [
                            {
                                "name": "gpu",
                                "exactly": {
                                    "deviceClassName": self.device_class,
                                    # The A100 is only in the pool, so the scheduler must take
                                    # the free fabric device, not the attached H100.
                                    "selectors": [
                                        {
                                            "cel": {
                                                "expression": f'device.attributes["{DRIVER}"]'
                                                '.productName == "A100"'
                                            }
                                        }
                                    ],
                                },
                            }
                        ]
                    }
                },
            },
        )
        await self.kube.create(
            PODS,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": self.pod},
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "image": "busybox",
                            "resources": {"claims": [{"name": "gpu"}]},
                        }
                    ],
                    "resourceClaims": [{"name": "gpu", "resourceClaimName": self.claim}],
                },
            },
        )

    async def read_claim(self) -> Obj:
        return await self.kube.get(f"{CLAIMS}/{self.claim}")

    async def read_pod(self) -> Obj:
        return await self.kube.get(f"{PODS}/{self.pod}")

    async def allocated(self) -> Obj | None:
        claim = await self.read_claim()
        return claim if claim.get("status", {}).get("allocation") else None

    async def set_condition(self, claim: Obj, ctype: str, reason: str) -> None:
        """Read-modify-write of status.devices[] for exactly our (driver, pool, device)."""
        result = claim["status"]["allocation"]["devices"]["results"][0]
        entry = {
            "driver": result["driver"],
            "pool": result["pool"],
            "device": result["device"],
            "conditions": [
                {
                    "type": ctype,
                    "status": "True",
                    "reason": reason,
                    "message": "set by the platform test",
                    "lastTransitionTime": _now(),
                }
            ],
        }
        claim["status"]["devices"] = [*claim["status"].get("devices", []), entry]
        await self.kube.replace(f"{CLAIMS}/{self.claim}/status", claim)

    async def pod_events(self) -> list[dict[str, Any]]:
        events = await self.kube.get(
            f"/api/v1/namespaces/{NS}/events",
            fieldSelector=f"involvedObject.name={self.pod}",
        )
        return list(events["items"])

    async def teardown(self) -> None:
        for path in (
            f"{PODS}/{self.pod}",
            f"{CLAIMS}/{self.claim}",
            f"{SLICES}/slice-{self.pool}",
            f"{CLASSES}/{self.device_class}",
            *(f"{NODES}/{n}" for n in self.nodes),
        ):
            try:
                await self.kube.delete(path)
            except Exception as exc:  # best-effort cleanup: report and go on
                print(f"cleanup of {path}: {exc}")


def node_of(allocation: Obj) -> str:
    terms = allocation["nodeSelector"]["nodeSelectorTerms"]
    assert len(terms) == 1
    (field,) = terms[0]["matchFields"]
    assert field["key"] == "metadata.name"
    assert field["operator"] == "In"
    (node,) = field["values"]
    return str(node)


async def test_ready_condition_binds_pod_to_pinned_node(kube: Kube) -> None:
    world = World(kube)
    await world.build()
    try:
        claim = await until(world.allocated, what="the scheduler to allocate the claim")
        allocation = claim["status"]["allocation"]
        (result,) = allocation["devices"]["results"]
        assert (result["driver"], result["pool"], result["device"]) == (
            DRIVER,
            world.pool,
            "gpu-free",
        )
        assert result["bindingConditions"] == ["FabricDeviceReady"]
        assert result["bindingFailureConditions"] == ["FabricDeviceFailed"]
        assert "allocationTimestamp" in allocation
        target = node_of(allocation)
        assert target in world.nodes
        pod = await world.read_pod()
        assert [r["uid"] for r in claim["status"]["reservedFor"]] == [pod["metadata"]["uid"]]

        # The scheduler waits in PreBind: it says so, and does not bind.
        events = await until(
            lambda: _reasons(world, "BindingConditionsPending"),
            what="a BindingConditionsPending event on the pod",
        )
        assert any(target in e["message"] for e in events)
        assert not (await world.read_pod())["spec"].get("nodeName")

        await world.set_condition(claim, "FabricDeviceReady", "Attached")
        pod = await until(
            lambda: _bound(world), what="the pod to be bound after FabricDeviceReady", timeout=30
        )
        assert pod["spec"]["nodeName"] == target
        # The allocation survived: one scheduling cycle, no reschedule.
        final = await world.read_claim()
        assert node_of(final["status"]["allocation"]) == target
        assert (
            final["status"]["allocation"]["allocationTimestamp"]
            == allocation["allocationTimestamp"]
        )
    finally:
        await world.teardown()


async def test_failure_condition_clears_allocation(kube: Kube) -> None:
    world = World(kube)
    await world.build()
    history: list[bool] = []
    informer = Informer(kube, CLAIMS, field_selector=f"metadata.name={world.claim}")
    informer.add_handler(
        lambda e: (
            history.append(bool(e.obj.get("status", {}).get("allocation")))
            if e.type != "DELETED"
            else None
        )
    )
    watching = asyncio.create_task(informer.run())
    try:
        claim = await until(world.allocated, what="the scheduler to allocate the claim")
        await world.set_condition(claim, "FabricDeviceFailed", "AttachFailed")
        await until(
            lambda: _cleared_after_allocated(history),
            what="the scheduler to clear the allocation after FabricDeviceFailed",
        )
        assert not (await world.read_pod())["spec"].get("nodeName")
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await world.teardown()


async def _reasons(world: World, reason: str) -> list[dict[str, Any]]:
    return [e for e in await world.pod_events() if e["reason"] == reason]


async def _bound(world: World) -> Obj | None:
    pod = await world.read_pod()
    return pod if pod["spec"].get("nodeName") else None


async def _cleared_after_allocated(history: list[bool]) -> bool:
    return True in history and False in history[history.index(True) :]


_ = Event  # re-exported type used by handlers above
