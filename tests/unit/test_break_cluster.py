"""Defects found by trying to break the cluster role (issues 9-11), as fast reproductions on the
in-memory API server and fabric of `tests/unit/test_cluster_role_fake.py`. Each was first seen
against real processes (`cohdi-agent run --roles cluster` on the local control plane, the fabric
emulator); each failed before its fix and now guards it.
"""

from __future__ import annotations

import asyncio

import pytest

from agent import errors, settings
from agent.controllers import running
from agent.kube.resources import REQUESTS, RESOURCES, resource_name
from agent.model import composing as composemodel
from agent.model import names
from agent.model import pool as poolmodel
from agent.model import requests as rq
from agent.model.fabric import DeviceId, FabricId, Machine, MachineId, PoolDevice
from agent.model.objects import DRIVER_LABEL
from tests.unit import test_cluster_role_fake as fake
from tests.unit.test_cluster_role_fake import (
    A100,
    NODES,
    FakeFabric,
    World,
    scale_up,
    world,
)

# In-memory worlds only: graces, settle periods and backoff pass in virtual time.
pytestmark = pytest.mark.virtualtime


def _hand_written(w: World, name: str, spec: dict[str, object]) -> None:
    w.kube.add(
        RESOURCES,
        {
            "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
            "kind": "ComposableResource",
            "metadata": {"name": name},
            "spec": {"type": "gpu", "model": A100, **spec},
        },
    )


def _status(w: World, name: str) -> dict[str, object]:
    return dict((w.resource(name) or {}).get("status") or {})


async def test_claim_on_a_deleted_node_does_not_loop_reattach_and_release() -> None:
    """Seen on `./dev demo --keep`: a pod bound to gpu-server-0 with its GPU attached; the node's
    agent stopped and the Node deleted (the pod and its claim stay, as they do until the pod GC
    runs); after --node-gone-grace the cluster log repeats 'claim default/nd1 holds ... which is
    not attached there: attaching it again' / 'node gpu-server-0 is gone (for 130 s): releasing'
    and the API server receives ~1 200 Events in 10 s."""
    async with world(node_gone_grace=0.2) as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        w.kube.remove(f"{NODES}/node-0")  # the node is deleted; its pod and claim remain
        await w.wait(lambda: w.events("NodeGone"), "the live resource released after the grace")
        await w.wait(lambda: w.fabric.attached_to("gpu-0") is None, "gpu-0 detached")
        await asyncio.sleep(1.0)  # let the controllers settle
        # what should happen: the device stays detached (there is no node to attach it to), and
        # nothing is recreated for a node that does not exist
        reattaches = len(w.events("Reattach"))
        released = len(w.events("NodeGone"))
        print("Reattach events:", reattaches, "NodeGone events:", released)
        assert reattaches <= 1
        assert released <= 2


class _StrictFabric(FakeFabric):
    """Like the real clients: a device the fabric does not have is `DeviceNotFound` (404)."""

    async def attach(self, device: DeviceId, machine: MachineId, *, model: str = "") -> PoolDevice:
        if device not in self.devices:
            raise errors.DeviceNotFound(f"GET .../ResourceBlocks/{device}: 404")
        return await super().attach(device, machine, model=model)

    async def detach(self, device: DeviceId) -> PoolDevice:
        if device not in self.devices:
            raise errors.DeviceNotFound(f"GET .../ResourceBlocks/{device}: 404")
        return await super().detach(device)


async def test_deleting_a_resource_whose_device_does_not_exist_finishes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seen on the real control plane: `kubectl apply` a ComposableResource with
    `fabric_device: no-such-gpu` → Failed DeviceNotFound (right); `kubectl delete` it → state
    Detaching for good, 'composer: cr-c: DeviceNotFound ... (not retried until it changes)'."""
    monkeypatch.setattr(fake, "FakeFabric", _StrictFabric)
    async with world() as w:
        _hand_written(w, "ghost", {"target_node": "node-0", "fabric_device": "no-such-gpu"})
        await w.wait(lambda: _status(w, "ghost").get("reason") == "DeviceNotFound", "Failed")
        w.kube.remove(f"{RESOURCES}/ghost")  # sets deletionTimestamp: our finalizer holds it
        await w.wait(lambda: w.resource("ghost") is None, "the resource gone", timeout=5)


async def test_resource_naming_a_device_of_another_model_is_refused() -> None:
    """Seen on `./dev demo --keep`: `spec: {model: NVIDIA-H100-PCIE-80GB, fabric_device:
    fabric0-gpu-0005}` (an A100) → Online, printed as an H100 by `kubectl get`."""
    async with world() as w:
        _hand_written(
            w, "wrong-model", {"model": "H100", "target_node": "node-0", "fabric_device": "gpu-1"}
        )
        await w.wait(
            lambda: _status(w, "wrong-model").get("state") in ("Online", "Failed"), "a verdict"
        )
        assert _status(w, "wrong-model").get("state") == "Failed"
        assert w.fabric.attached_to("gpu-1") is None


class _UpperCaseHosts(FakeFabric):
    """A fabric whose machines carry the host name in upper case (Redfish `HostName` as the BMC
    reports it); kubelet registers the node under the lower-case host name."""

    def __init__(self, machines: list[str], gpus: int, *, anonymous: bool = False) -> None:
        super().__init__(machines, gpus, anonymous=anonymous)
        self.machines = tuple(
            Machine(MachineId(f"m-{n}"), n.upper(), FabricId("fab"), node_name=n.upper())
            for n in machines
        )


async def test_machine_host_name_in_upper_case_still_matches_its_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fake, "FakeFabric", _UpperCaseHosts)  # the world's fabric, from the start
    async with world(gpus=2) as w:
        assert isinstance(w.fabric, _UpperCaseHosts)
        await w.wait(
            lambda: (
                (w.kube.get_obj(f"{NODES}/node-0") or {})["metadata"]
                .get("labels", {})
                .get(poolmodel.FABRIC_LABEL)
            ),
            "node-0 labelled with its fabric",
            timeout=3,
        )


def test_request_of_an_unsupported_type_is_refused() -> None:
    """Seen on `./dev demo --keep`: `spec.resource: {type: cxlmemory, model:
    NVIDIA-A100-PCIE-40GB, size: 1}` → `Running`, member `r-cxl-0` Online with an A100."""
    resource = {"type": "cxlmemory", "model": A100, "size": 1, "target_node": "n1"}
    req = rq.Request(
        name="r-cxl",
        uid="uid-1",
        generation=1,
        want=rq.Want.of(resource),
        resource=resource,
        status={},
    )
    fabric = rq.Fabric({"n1": "f1"}, {("f1", A100): 4}, {("f1", A100): 4})
    d = rq.decide(req, [], fabric, rq.Limits(), now=1_000_000.0)
    assert d.create == ()
    conditions = {c["type"]: c for c in (d.status or {}).get("conditions") or []}
    assert conditions.get("Refused", {}).get("status") == "True"


async def test_a_second_deployment_with_another_driver_leaves_our_resources_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seen on the real control plane: `cohdi-agent run --driver other.cohdi.io --lease-name
    brk-other` against a second emulator (one machine, no Node of this cluster) beside the
    deployment of brk.cohdi.io; a claim for brk.cohdi.io → its resource gpu-fab-gpu-0000 is set
    'Failed: node brk-1 is not wired to any fabric this agent manages' by the other deployment,
    the claim fails, is re-allocated, fails again; the pod binds only once the other is stopped.
    (Our attach is made to take 0.5 s, as the emulator's does, so that the other deployment's
    composer sees the resource before ours has written Online: otherwise which one wins varies.)"""
    monkeypatch.setattr(fake, "FakeFabric", _SlowAttach)
    async with world() as w:
        other = running.build(
            w.kube,  # type: ignore[arg-type]
            FakeFabric(["elsewhere"], 0),  # type: ignore[arg-type]
            settings.Settings(cluster=settings.ClusterSettings(driver="other.cohdi.io")),
            identity="other",
            wall=w.wall,
            mono=w.mono,
        )
        w.tasks.append(asyncio.create_task(other.run()))
        await asyncio.sleep(0.2)  # the other deployment is up and synced
        w.new_claim("c1")
        w.allocate("c1", "gpu-1", "node-0")
        await w.wait(
            lambda: w.condition("c1", poolmodel.READY) or w.condition("c1", poolmodel.FAILED),
            "a verdict on c1",
        )
        assert w.condition("c1", poolmodel.FAILED) is None, _status(w, resource_name("gpu-1"))
        assert w.condition("c1", poolmodel.READY)


class _SlowAttach(FakeFabric):
    async def attach(self, device: DeviceId, machine: MachineId, *, model: str = "") -> PoolDevice:
        await asyncio.sleep(0.5)
        return await super().attach(device, machine, model=model)


async def test_a_warm_devices_label_put_on_a_node_is_acted_on() -> None:
    """Seen on `./dev demo --keep`: `kubectl label node gpu-server-3 cohdi.io/warm-devices=100`
    → nothing for 35 s; the next unrelated claim event → 13 warm resources at once."""
    async with world(gpus=4) as w:
        w.kube.edit(
            f"{NODES}/node-0",
            lambda o: o["metadata"].setdefault("labels", {}).update({"cohdi.io/warm-devices": "1"}),
        )
        await w.wait(
            lambda: any(
                (o.get("spec") or {}).get("target_node") == "node-0"
                for o in w.kube.objects("composableresources")
            ),
            "a warm resource for node-0",
            timeout=5,
        )


async def test_a_node_that_comes_back_gets_its_claims_devices_again() -> None:
    """Seen on the real control plane (cluster role at 1ad0b0b, --node-gone-grace 5): a pod bound
    to brk-0, `kubectl delete node brk-0` → its GPU released after 5 s (right, and no loop any
    more); the Node made again → nothing for 45 s; `kubectl annotate resourceclaim ndy poke=1` →
    'claim default/ndy holds fab-gpu-0000 on brk-0, which is not attached there: attaching it
    again' at once."""
    async with world(node_gone_grace=0.2) as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        w.kube.remove(f"{NODES}/node-0")
        await w.wait(lambda: w.fabric.attached_to("gpu-0") is None, "gpu-0 released")
        await w.wait(lambda: w.resource(resource_name("gpu-0")) is None, "its resource gone")
        await asyncio.sleep(0.5)  # quiet: no event of the release is still on its way
        fake.make_node(w.kube, "node-0")  # the node registers again; the claim still holds gpu-0
        await w.wait(
            lambda: w.fabric.attached_to("gpu-0") == "m-node-0", "gpu-0 attached again", timeout=5
        )


async def test_a_second_deployment_leaves_our_requests_alone() -> None:
    """Seen on the real control plane at 1ad0b0b (after resources were scoped by driver): the
    deployment of brk.cohdi.io and one of other.cohdi.io (a second emulator, no Node of this
    cluster); `ComposabilityRequest mreq {model: A100, size: 2, target_node: brk-0}` → members
    Online, but the request's state alternates Running / 'Failed node brk-0 is not wired to a
    fabric this agent manages', resourceVersion 27336 → 30772 in 18 s, Events NoNode x1189 and
    Running x1157 in 25 s; it stops the moment the other deployment stops."""
    async with world() as w:
        other = running.build(
            w.kube,  # type: ignore[arg-type]
            FakeFabric(["elsewhere"], 0),  # type: ignore[arg-type]
            settings.Settings(cluster=settings.ClusterSettings(driver="other.cohdi.io")),
            identity="other",
            wall=w.wall,
            mono=w.mono,
        )
        w.tasks.append(asyncio.create_task(other.run()))
        await asyncio.sleep(0.2)
        w.kube.add(
            REQUESTS,
            {
                "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
                "kind": "ComposabilityRequest",
                "metadata": {"name": "mreq"},
                "spec": {
                    "resource": {"type": "gpu", "model": A100, "size": 1, "target_node": "node-0"}
                },
            },
        )

        def state() -> str:
            obj = w.kube.get_obj(f"{REQUESTS}/mreq") or {}
            return str((obj.get("status") or {}).get("state") or "")

        await w.wait(lambda: state() == "Running", "mreq running")
        await asyncio.sleep(0.5)
        assert state() == "Running"
        assert not w.events("NoNode")


async def test_a_second_deployment_leaves_an_unlabelled_resource_on_our_node_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seen on the real control plane at 39d3219: two deployments (brk.cohdi.io, other.cohdi.io
    on a second emulator); `ComposableResource handw {model: A100, target_node: brk-0}` → the
    other logs 'composable resource handw failed: node brk-0 is not wired to any fabric this
    agent manages' and writes Failed; ours retries it to Online; on its delete the other logs
    '... 404 ...; nothing to detach' / 'fab-gpu-0000 detached from brk-0 in 0.002 s' and removes
    the finalizer; ours then gets 404 writing it. (Our attach takes 0.5 s, as the emulator's
    does, so that the other composer sees the resource before ours has written Online.)"""
    monkeypatch.setattr(fake, "FakeFabric", _SlowAttach)
    async with world() as w:
        other = running.build(
            w.kube,  # type: ignore[arg-type]
            FakeFabric(["elsewhere"], 0),  # type: ignore[arg-type]
            settings.Settings(cluster=settings.ClusterSettings(driver="other.cohdi.io")),
            identity="other",
            wall=w.wall,
            mono=w.mono,
        )
        w.tasks.append(asyncio.create_task(other.run()))
        await asyncio.sleep(0.2)
        _hand_written(w, "handw", {"target_node": "node-0"})
        await w.wait(lambda: _status(w, "handw").get("state") == "Online", "handw online")
        await asyncio.sleep(0.3)
        assert not w.events("NodeNotOnFabric")
        # adopted: labelled ours, so the other deployment keeps off it from now on
        labels = (w.resource("handw") or {})["metadata"].get("labels") or {}
        assert labels.get(DRIVER_LABEL) == names.label_value(fake.DRIVER)
        device = str(_status(w, "handw")["cdi_device_id"])
        w.kube.remove(f"{RESOURCES}/handw")
        await w.wait(lambda: w.resource("handw") is None, "handw gone")
        assert w.fabric.detaches == [device], "detached by the deployment that attached it"
        assert w.fabric.attached_to(device) is None


async def test_an_unlabelled_resource_no_deployment_can_serve_is_refused_after_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lone deployment still says why it does not act on a resource for a node that is not on
    its fabric, once no other deployment has taken it for the grace; and it does not label it (a
    deployment that comes later may)."""
    monkeypatch.setattr(composemodel, "UNCLAIMED_GRACE", 0.3)
    async with world() as w:
        _hand_written(w, "far", {"target_node": "node-9"})
        await asyncio.sleep(0.15)
        assert not _status(w, "far"), "within the grace: left for another deployment"
        await w.wait(lambda: _status(w, "far").get("reason") == "NodeNotOnFabric", "refused")
        labels = (w.resource("far") or {})["metadata"].get("labels") or {}
        assert DRIVER_LABEL not in labels


async def test_an_unlabelled_request_on_our_node_is_labelled_ours() -> None:
    async with world() as w:
        w.kube.add(
            REQUESTS,
            {
                "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
                "kind": "ComposabilityRequest",
                "metadata": {"name": "mine"},
                "spec": {
                    "resource": {"type": "gpu", "model": A100, "size": 1, "target_node": "node-1"}
                },
            },
        )

        def labels() -> dict[str, str]:
            obj = w.kube.get_obj(f"{REQUESTS}/mine") or {}
            return dict(obj.get("metadata", {}).get("labels") or {})

        await w.wait(lambda: labels().get(DRIVER_LABEL), "the request labelled")
        assert labels()[DRIVER_LABEL] == names.label_value(fake.DRIVER)
