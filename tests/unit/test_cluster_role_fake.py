"""The whole cluster role (publisher, scaler, composer, requester, informers) on the in-memory API
server (`agent.testing.fakekube`) and an in-memory fabric: every branch of the controllers that
the real control plane takes minutes to reach, in well under a second each. The test plays the
scheduler (it writes claim allocations as kube-scheduler does) and, through
`agent.testing.nodereport.NodeDouble`, the node role.

What only the real API proves (its validation, the scheduler's allocation and binding) stays in
tests/cluster/."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent import errors, settings
from agent.controllers import running
from agent.fabric.link import FabricLink
from agent.kube.resources import CLAIM_ANNOTATION, FINALIZER, RESOURCES, resource_name
from agent.model import pool as poolmodel
from agent.model import slots as slotmodel
from agent.model.fabric import (
    DeviceId,
    DeviceState,
    FabricId,
    Inventory,
    Machine,
    MachineId,
    PoolDevice,
)
from agent.model.objects import Obj
from agent.testing.fakekube import FakeKube
from agent.testing.nodereport import NodeDouble
from tests import virtualtime
from tests.waiting import until

# In-memory worlds only: graces, settle periods and backoff pass in virtual time.
pytestmark = pytest.mark.virtualtime

DRIVER = "fake.cohdi.io"
FABRIC = "fab"
POOL = poolmodel.pool_name(FabricId(FABRIC))
A100 = "A100"
CLAIMS = "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims"
SLICES = "/apis/resource.k8s.io/v1/resourceslices"
NODES = "/api/v1/nodes"


# --- an in-memory fabric -------------------------------------------------------------------------


class FakeFabric:
    """Machines and devices in a dict; attach/detach idempotent like the real clients (read,
    then act only if needed); a failure per device can be injected."""

    backend = "fake"

    def __init__(self, machines: list[str], gpus: int, *, anonymous: bool = False) -> None:
        #: like the FTI API: free devices are reported as a count (anonymous slots), an attach
        #: through a slot takes the lowest free GPU of the model
        self.anonymous = anonymous
        #: the next attach is carried out and its answer lost (FabricUnavailable)
        self.lose_answer = 0
        self.link = FabricLink("fake://fabric")
        self.machines = tuple(Machine(MachineId(f"m-{n}"), n, FabricId(FABRIC)) for n in machines)
        self.devices: dict[str, PoolDevice] = {
            f"gpu-{i}": PoolDevice(
                DeviceId(f"gpu-{i}"), FabricId(FABRIC), A100, DeviceState.FREE, gpu_uuid=f"GPU-{i}"
            )
            for i in range(gpus)
        }
        self.attaches: list[tuple[str, str]] = []
        self.detaches: list[str] = []
        #: seconds between a change and the watch's next inventory (a polling backend's lag)
        self.watch_lag = 0.0
        #: seconds between an attach taking effect and its answer reaching the caller (reads
        #: meanwhile list the GPU attached)
        self.answer_lag = 0.0
        self.fail_attach: dict[str, errors.AgentError] = {}
        self._changed = asyncio.Event()
        self._version = 0

    def set(self, device: str, state: DeviceState, machine: str | None = None) -> None:
        old = self.devices[device]
        self.devices[device] = PoolDevice(
            old.id,
            old.fabric,
            old.model,
            state,
            gpu_uuid=old.gpu_uuid,
            machine=MachineId(machine) if machine else None,
            pci_address="0000:41:00.0" if machine else "",
        )
        self._version += 1
        self._changed.set()

    def attached_to(self, device: str) -> str | None:
        dev = self.devices[device]
        return dev.machine if dev.state == DeviceState.ATTACHED else None

    async def inventory(self) -> Inventory:
        devices = list(self.devices.values())
        if self.anonymous:
            free = [d for d in devices if d.state == DeviceState.FREE]
            devices = [d for d in devices if d.state != DeviceState.FREE]
            devices += slotmodel.placeholders(FABRIC, A100, len(free))
        return Inventory(self.machines, tuple(devices), version=str(self._version))

    async def attach(self, device: DeviceId, machine: MachineId, *, model: str = "") -> PoolDevice:
        self.attaches.append((device, machine))
        if slotmodel.is_slot(device):
            free = sorted(d for d, dev in self.devices.items() if dev.state == DeviceState.FREE)
            if not free:
                raise errors.FabricRejected(f"no free {model} left")
            device = DeviceId(free[0])
        if device in self.fail_attach:
            if isinstance(self.fail_attach[device], errors.DeviceFailed):
                self.set(device, DeviceState.FAILED)  # as a fabric reports a broken device
            raise self.fail_attach[device]
        dev = self.devices[device]
        if dev.state == DeviceState.ATTACHED and dev.machine != machine:
            raise errors.DeviceBusy(f"{device} is attached to {dev.machine}")
        if dev.state != DeviceState.ATTACHED:
            self.set(device, DeviceState.ATTACHED, machine)
        if self.answer_lag:
            await asyncio.sleep(self.answer_lag)
        if self.lose_answer:
            self.lose_answer -= 1
            raise errors.FabricUnavailable(f"attach of {device}: connection reset (answer lost)")
        return self.devices[device]

    async def detach(self, device: DeviceId) -> PoolDevice:
        self.detaches.append(device)
        if self.devices[device].state not in (DeviceState.FREE, DeviceState.FAILED):
            self.set(device, DeviceState.FREE)
        dev = self.devices[device]
        if self.anonymous and dev.state == DeviceState.FREE:
            # like the FTI client: back in the free count, no identity of its own any more
            return dataclasses.replace(dev, anonymous=True)
        return dev

    async def watch(self) -> AsyncIterator[Inventory]:
        while True:
            self._changed.clear()
            self.link.reached()
            yield await self.inventory()
            await self._changed.wait()
            if self.watch_lag:  # a polling fabric sees a change this much later
                await asyncio.sleep(self.watch_lag)

    async def close(self) -> None:
        return None


# --- the world -----------------------------------------------------------------------------------


@dataclass
class World:
    kube: FakeKube
    fabric: FakeFabric
    role: running.ClusterRole
    nodes: list[str]
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    #: the clocks of the loop the world runs on (epoch seconds, monotonic seconds): virtual ones
    #: on tests/virtualtime.py's loop
    wall: Callable[[], float] = time.time
    mono: Callable[[], float] = time.monotonic

    def claim_path(self, name: str) -> str:
        return f"{CLAIMS}/{name}"

    def claim(self, name: str) -> Obj:
        obj = self.kube.get_obj(self.claim_path(name))
        assert obj is not None
        return obj

    def resource(self, name: str) -> Obj | None:
        return self.kube.get_obj(f"{RESOURCES}/{name}")

    def device_name(self, device: str) -> str:
        return poolmodel.device_name(DeviceId(device))

    def offered(self) -> dict[str, dict[str, Any]]:
        """Device name -> its slice entry, over all our slices."""
        out = {}
        for s in self.kube.objects("resourceslices"):
            if s["spec"]["driver"] == DRIVER:
                for d in s["spec"].get("devices") or []:
                    out[d["name"]] = d
        return out

    def allocate_in(self, claim: str, pool: str, device: str, node: str) -> None:
        """The scheduler's allocation of `device` from the node-local `pool` (no conditions)."""
        self.allocate(claim, device, node, conditions=False, pool=pool)

    def device_of_name(self, name: str) -> str:
        return next(d for d in self.fabric.devices if self.device_name(d) == name)

    def allocate(
        self, claim: str, device: str, node: str, *, conditions: bool = True, pool: str = POOL
    ) -> None:
        """What kube-scheduler writes: the allocation (pinned to `node`) and reservedFor."""
        now = dt.datetime.fromtimestamp(self.wall(), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        def change(obj: Obj) -> None:
            result: dict[str, Any] = {
                "request": "gpu",
                "driver": DRIVER,
                "pool": pool,
                "device": self.device_name(device),
            }
            if conditions:
                result["bindingConditions"] = [poolmodel.READY]
                result["bindingFailureConditions"] = [poolmodel.FAILED]
            obj["status"] = {
                "allocation": {
                    "devices": {"results": [result]},
                    "nodeSelector": {
                        "nodeSelectorTerms": [
                            {
                                "matchFields": [
                                    {"key": "metadata.name", "operator": "In", "values": [node]}
                                ]
                            }
                        ]
                    },
                    "allocationTimestamp": now,
                },
                "reservedFor": [{"resource": "pods", "name": claim, "uid": "pod-" + claim}],
            }

        self.kube.edit(self.claim_path(claim), change)

    def release(self, claim: str) -> None:
        """The pod ended: the claim is deallocated and deleted."""
        self.kube.edit(self.claim_path(claim), lambda o: o.pop("status", None))
        self.kube.remove(self.claim_path(claim))

    def new_claim(self, name: str) -> None:
        self.kube.add(
            CLAIMS,
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "ResourceClaim",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"devices": {"requests": []}},
            },
        )

    def condition(self, claim: str, ctype: str) -> dict[str, Any] | None:
        for entry in (self.claim(claim).get("status") or {}).get("devices") or []:
            for c in entry.get("conditions") or []:
                if c["type"] == ctype and c["status"] == "True":
                    return dict(c)
        return None

    def events(self, reason: str) -> list[Obj]:
        """One entry per occurrence: an aggregated Event (`count` n) is there n times."""
        return [
            e
            for e in self.kube.objects("events")
            if e.get("reason") == reason
            for _ in range(int(e.get("count") or 1))
        ]

    async def wait(self, probe: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:  # noqa: ASYNC109
        async def check() -> Any:
            return probe()

        return await until(check, what=what, timeout=timeout, interval=0.02)


def make_node(kube: FakeKube, name: str, labels: dict[str, str] | None = None) -> None:
    kube.add(
        NODES,
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels or {}}},
    )


@contextlib.asynccontextmanager
async def world(
    *,
    gpus: int = 4,
    nodes: int = 2,
    node_labels: dict[str, str] | None = None,
    double: bool = True,
    anonymous: bool = False,
    **cluster: Any,
) -> AsyncIterator[World]:
    wall, mono = virtualtime.clocks()
    kube = FakeKube(bookmark_interval=60, wall=wall)
    kube.selectable("composableresources", "spec.target_node")
    names = [f"node-{i}" for i in range(nodes)]
    for n in names:
        make_node(kube, n, node_labels)
    fabric = FakeFabric(names, gpus, anonymous=anonymous)
    cluster.setdefault("idle_grace", 300.0)
    cluster.setdefault("scale_down_settle", 0.05)
    cfg = settings.Settings(cluster=settings.ClusterSettings(driver=DRIVER, **cluster))
    role = running.build(kube, fabric, cfg, identity="test", wall=wall, mono=mono)  # type: ignore[arg-type]
    w = World(kube, fabric, role, names, wall=wall, mono=mono)
    w.tasks.append(asyncio.create_task(role.run()))
    if double:
        w.tasks.append(asyncio.create_task(NodeDouble(kube, set(names)).run()))
    try:
        await w.wait(lambda: len(w.offered()) == gpus, "the pool published")
        yield w
    finally:
        for t in w.tasks:
            t.cancel()
        await asyncio.gather(*w.tasks, return_exceptions=True)


async def scale_up(w: World, claim: str, device: str, node: str) -> None:
    w.new_claim(claim)
    w.allocate(claim, device, node)
    await w.wait(lambda: w.condition(claim, poolmodel.READY), f"{claim} ready")


# --- scale up and its failures -------------------------------------------------------------------


async def test_scale_up_attaches_and_sets_fabric_device_ready() -> None:
    async with world() as w:
        await scale_up(w, "c1", "gpu-1", "node-0")
        assert w.fabric.attached_to("gpu-1") == "m-node-0"
        assert w.fabric.attaches == [("gpu-1", "m-node-0")]
        cr = w.resource(resource_name("gpu-1"))
        assert cr is not None
        assert cr["metadata"]["annotations"][CLAIM_ANNOTATION] == "default/c1"
        assert cr["status"]["state"] == "Online"
        # attached and held: offered with nodeName, no binding conditions
        entry = await w.wait(
            lambda: (
                w.offered()[w.device_name("gpu-1")].get("nodeName")
                and w.offered()[w.device_name("gpu-1")]
            ),
            "gpu-1 offered as attached",
        )
        assert entry["nodeName"] == "node-0"
        assert "bindingConditions" not in entry
        assert [e["reason"] for e in w.events("DeviceReady")] == ["DeviceReady"]
        assert w.events("AttachRequested") == []  # one Event per claim on the normal path


async def test_failed_attach_fails_the_claim_withholds_the_device_and_deletes_its_resource() -> (
    None
):
    async with world() as w:
        w.fabric.fail_attach["gpu-2"] = errors.DeviceFailed("gpu-2: the link is down")
        w.new_claim("c1")
        w.allocate("c1", "gpu-2", "node-0")
        failed = await w.wait(lambda: w.condition("c1", poolmodel.FAILED), "FabricDeviceFailed")
        assert failed["reason"] == "DeviceFailed"
        await w.wait(lambda: w.resource(resource_name("gpu-2")) is None, "the resource deleted")
        await w.wait(lambda: w.device_name("gpu-2") not in w.offered(), "gpu-2 withheld")
        assert w.fabric.attached_to("gpu-2") is None
        assert w.fabric.attaches == [("gpu-2", "m-node-0")]  # once: our own events never repeat it
        assert len(w.events("DeviceFailed")) == 2  # one on the resource, one on the claim


async def test_unknown_device_fails_the_claim() -> None:
    async with world() as w:
        w.new_claim("c1")
        w.allocate("c1", "gpu-99", "node-0")
        failed = await w.wait(lambda: w.condition("c1", poolmodel.FAILED), "FabricDeviceFailed")
        assert failed["reason"] == "UnknownDevice"
        assert w.fabric.attaches == []


async def test_deadline_fails_a_claim_the_node_never_reports() -> None:
    async with world(double=False, claim_deadline=1.0) as w:
        w.new_claim("c1")
        w.allocate("c1", "gpu-0", "node-0")
        failed = await w.wait(lambda: w.condition("c1", poolmodel.FAILED), "deadline")
        assert failed["reason"] == "AttachDeadline"
        # the resource was made for this claim: deleted, and the composer detaches the device
        await w.wait(lambda: w.resource(resource_name("gpu-0")) is None, "resource deleted")
        await w.wait(lambda: w.fabric.attached_to("gpu-0") is None, "gpu-0 detached")


async def test_device_on_other_node_fails_the_claim_but_never_touches_the_other_resource() -> None:
    async with world() as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        # a second claim allocated the same device pinned to another node (a stale scheduler view)
        w.new_claim("c2")
        w.allocate("c2", "gpu-0", "node-1")
        failed = await w.wait(lambda: w.condition("c2", poolmodel.FAILED), "c2 failed")
        assert failed["reason"] == "DeviceOnOtherNode"
        await asyncio.sleep(0.2)
        cr = w.resource(resource_name("gpu-0"))
        assert cr is not None
        assert "deletionTimestamp" not in cr["metadata"]
        assert w.fabric.attached_to("gpu-0") == "m-node-0"


async def test_node_at_its_maximum_refuses_and_is_labelled_full() -> None:
    async with world(node_labels={"cohdi.io/max-devices": "1"}) as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        await w.wait(
            lambda: (
                w.kube.get_obj(f"{NODES}/node-0")["metadata"]["labels"].get(  # type: ignore[index]
                    poolmodel.FULL_LABEL
                )
                == "true"
            ),
            "node-0 labelled full",
        )
        w.new_claim("c2")
        w.allocate("c2", "gpu-1", "node-0")
        failed = await w.wait(lambda: w.condition("c2", poolmodel.FAILED), "c2 failed")
        assert failed["reason"] == "NodeDeviceLimit"
        assert ("gpu-1", "m-node-0") not in w.fabric.attaches


# --- one owner per GPU ---------------------------------------------------------------------------


async def test_second_resource_naming_an_owned_device_is_refused_and_detaches_nothing() -> None:
    async with world() as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        w.kube.add(
            RESOURCES,
            {
                "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
                "kind": "ComposableResource",
                "metadata": {"name": "intruder"},
                "spec": {
                    "type": "gpu",
                    "model": A100,
                    "target_node": "node-0",
                    "fabric_device": "gpu-0",
                },
            },
        )
        refused = await w.wait(
            lambda: (w.resource("intruder") or {}).get("status", {}).get("reason") == "DeviceOwned",
            "intruder refused",
        )
        assert refused
        intruder = w.resource("intruder")
        assert intruder is not None
        assert intruder["status"]["state"] == "Failed"
        assert not any(
            c["type"] == "NodeReady" and c["status"] == "True"
            for c in intruder["status"].get("conditions") or []
        )
        assert w.events("DeviceOwned")
        w.kube.remove(f"{RESOURCES}/intruder")
        await w.wait(lambda: w.resource("intruder") is None, "intruder gone")
        assert w.fabric.detaches == []
        assert w.fabric.attached_to("gpu-0") == "m-node-0"


# --- scale down ----------------------------------------------------------------------------------


async def test_idle_device_is_scaled_down_after_the_grace() -> None:
    async with world(idle_grace=0.2) as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        w.release("c1")
        await w.wait(lambda: w.resource(resource_name("gpu-0")) is None, "resource gone")
        assert w.fabric.attached_to("gpu-0") is None
        await w.wait(
            lambda: "bindsToNode" in w.offered().get(w.device_name("gpu-0"), {}),
            "gpu-0 offered free again",
        )
        assert w.events("ScaleDown")
        assert w.events("Detached")


async def test_scale_down_aborts_when_a_claim_takes_the_device_while_it_settles() -> None:
    async with world(idle_grace=0.1, scale_down_settle=2.0) as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        w.release("c1")
        # withheld for the scale-down: no longer offered
        await w.wait(lambda: w.device_name("gpu-0") not in w.offered(), "gpu-0 withheld")
        # the scheduler allocated it from its older view of the slices meanwhile
        w.new_claim("c2")
        w.allocate("c2", "gpu-0", "node-0", conditions=False)
        await w.wait(
            lambda: w.offered().get(w.device_name("gpu-0"), {}).get("nodeName") == "node-0",
            "gpu-0 offered again, attached",
        )
        await asyncio.sleep(2.5)  # past the settle period
        assert w.fabric.detaches == []
        cr = w.resource(resource_name("gpu-0"))
        assert cr is not None
        assert "deletionTimestamp" not in cr["metadata"]


async def test_scale_down_trusts_a_fresh_read_over_its_informer() -> None:
    """The informer has not yet seen the allocation the API server already holds: the fresh
    LIST before the delete finds it."""
    async with world(idle_grace=300.0, scale_down_settle=0.05) as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        scaler = w.role.scaler
        w.release("c1")
        await w.wait(lambda: w.role.scaler.claims.get("default", "c1") is None, "c1 gone")
        # stop the claims informer from seeing anything new
        w.kube.hang("WATCH", "/apis/resource.k8s.io/v1/resourceclaims", seconds=30, times=100)
        w.kube.end_watches()
        await asyncio.sleep(0.1)
        w.new_claim("c2")
        w.allocate("c2", "gpu-0", "node-0", conditions=False)
        assert scaler.claims.get("default", "c2") is None  # the informer lags
        scaler.last_used["gpu-0"] = scaler.mono() - 1000
        await scaler.check_idle("gpu-0")
        assert w.fabric.detaches == []
        cr = w.resource(resource_name("gpu-0"))
        assert cr is not None
        assert "deletionTimestamp" not in cr["metadata"]
        assert "gpu-0" not in w.role.publisher.withheld  # released again


async def test_node_minimum_keeps_an_idle_device() -> None:
    async with world(idle_grace=0.1, node_labels={"cohdi.io/min-devices": "1"}) as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        w.release("c1")
        await asyncio.sleep(0.6)
        assert w.fabric.detaches == []


async def test_a_claim_holding_a_detached_device_gets_it_attached_again() -> None:
    """The last line of defence: whatever detached it, a claim that holds a device on its node
    gets it back there (the pod's prepare is retried by kubelet until it is)."""
    async with world() as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        # someone removes the resource behind our back and the device is detached
        name = resource_name("gpu-0")
        w.kube.edit(f"{RESOURCES}/{name}", lambda o: o["metadata"].pop("finalizers", None))
        w.kube.remove(f"{RESOURCES}/{name}")
        w.fabric.set("gpu-0", DeviceState.FREE)
        await w.wait(lambda: w.fabric.attached_to("gpu-0") == "m-node-0", "re-attached")
        assert w.events("Reattach")


# --- nodes that disappear ------------------------------------------------------------------------


async def test_resource_of_a_deleted_node_is_detached_after_the_grace() -> None:
    async with world(idle_grace=0.1, node_gone_grace=0.5, double=False) as w:
        w.new_claim("c1")
        w.allocate("c1", "gpu-0", "node-1")
        await w.wait(lambda: w.fabric.attached_to("gpu-0") == "m-node-1", "attached")
        # the node reported it once, then the node went away
        name = resource_name("gpu-0")
        w.kube.edit(
            f"{RESOURCES}/{name}",
            lambda o: o["status"].update(
                conditions=[{"type": "NodeReady", "status": "True", "reason": "t", "message": ""}]
            ),
        )
        await w.wait(lambda: w.condition("c1", poolmodel.READY), "ready")
        w.kube.remove(f"{NODES}/node-1")
        w.release("c1")
        await w.wait(lambda: w.fabric.attached_to("gpu-0") is None, "detached", timeout=10)
        await w.wait(lambda: w.resource(name) is None, "resource gone")
        assert w.events("NodeGone")


async def test_a_live_resource_of_a_deleted_node_is_released_after_the_grace() -> None:
    """A pre-warmed GPU (no claim, no scale-down) on a node that was deleted."""
    async with world(node_gone_grace=0.5, double=False) as w:
        model_only(w, "warm-0", "node-1")
        await w.wait(lambda: w.fabric.attached_to("gpu-0") == "m-node-1", "attached")
        w.kube.remove(f"{NODES}/node-1")
        await w.wait(lambda: w.resource("warm-0") is None, "warm-0 gone", timeout=10)
        assert w.fabric.attached_to("gpu-0") is None
        assert w.events("NodeGone")


async def test_a_silent_node_agent_does_not_hold_a_detach_forever() -> None:
    async with world(node_gone_grace=0.5, double=False) as w:
        w.new_claim("c1")
        w.allocate("c1", "gpu-0", "node-1")
        await w.wait(lambda: w.fabric.attached_to("gpu-0") == "m-node-1", "attached")
        name = resource_name("gpu-0")
        w.kube.edit(
            f"{RESOURCES}/{name}",
            lambda o: o["status"].update(
                conditions=[{"type": "NodeReady", "status": "True", "reason": "t", "message": ""}]
            ),
        )
        w.release("c1")
        w.kube.remove(f"{RESOURCES}/{name}")  # the node agent is dead: no NodeReleased comes
        await w.wait(lambda: w.resource(name) is None, "resource gone", timeout=10)
        assert w.fabric.attached_to("gpu-0") is None
        assert len(w.events("NodeGone")) == 1
        assert w.fabric.detaches == ["gpu-0"]  # once: the delete is handled exactly once


async def test_a_busy_node_is_waited_for() -> None:
    async with world(node_gone_grace=0.3, double=False) as w:
        w.new_claim("c1")
        w.allocate("c1", "gpu-0", "node-1")
        await w.wait(lambda: w.fabric.attached_to("gpu-0") == "m-node-1", "attached")
        name = resource_name("gpu-0")
        w.kube.edit(
            f"{RESOURCES}/{name}",
            lambda o: o["status"].update(
                conditions=[
                    {"type": "NodeReady", "status": "True", "reason": "t", "message": ""},
                    {"type": "NodeReleased", "status": "False", "reason": "Busy", "message": ""},
                ]
            ),
        )
        w.release("c1")
        w.kube.remove(f"{RESOURCES}/{name}")
        await asyncio.sleep(0.8)
        assert w.fabric.detaches == []  # the node answered "busy": it is alive, we wait


# --- model-only resources (requests) -------------------------------------------------------------


def model_only(w: World, name: str, node: str) -> None:
    w.kube.add(
        RESOURCES,
        {
            "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
            "kind": "ComposableResource",
            "metadata": {"name": name, "finalizers": [FINALIZER]},
            "spec": {"type": "gpu", "model": A100, "target_node": node},
        },
    )


async def test_no_free_device_is_retried_when_one_frees_up() -> None:
    async with world(gpus=1) as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        model_only(w, "warm-0", "node-1")
        await w.wait(
            lambda: (w.resource("warm-0") or {}).get("status", {}).get("reason") == "NoFreeDevice",
            "NoFreeDevice",
        )
        w.kube.edit(f"{CLAIMS}/c1", lambda o: o.pop("status", None))  # the pod ended
        w.release("c1")
        # the composer may only take gpu-0 once it is free; idle scale-down is 300 s, so free it
        # by deleting its resource as the scaler would
        w.kube.remove(f"{RESOURCES}/{resource_name('gpu-0')}")
        await w.wait(
            lambda: (w.resource("warm-0") or {}).get("status", {}).get("state") == "Online",
            "warm-0 online",
        )
        assert w.fabric.attached_to("gpu-0") == "m-node-1"


async def test_model_only_choices_never_take_a_device_twice() -> None:
    async with world(gpus=3) as w:
        for i in range(3):
            model_only(w, f"warm-{i}", "node-0")
        await w.wait(
            lambda: all(
                (w.resource(f"warm-{i}") or {}).get("status", {}).get("state") == "Online"
                for i in range(3)
            ),
            "all online",
        )
        chosen = [w.resource(f"warm-{i}")["status"]["cdi_device_id"] for i in range(3)]  # type: ignore[index]
        assert sorted(chosen) == ["gpu-0", "gpu-1", "gpu-2"]
        # 1 -> 0 -> 1: deleting one frees its device, and a new one gets it
        w.kube.remove(f"{RESOURCES}/warm-1")
        await w.wait(lambda: w.resource("warm-1") is None, "warm-1 gone")
        model_only(w, "warm-3", "node-0")
        await w.wait(
            lambda: (w.resource("warm-3") or {}).get("status", {}).get("state") == "Online",
            "warm-3 online",
        )


async def test_a_model_only_choice_the_scheduler_allocated_meanwhile_is_given_up() -> None:
    """Warm capacity (or a request member) picks a free device while kube-scheduler allocates the
    same device, from the slice it still saw, to a claim for another node: the composer looks
    again (a fresh LIST after the withhold has settled), leaves that device to the claim and
    takes another — instead of attaching it to its own node and failing the claim
    (DeviceOnOtherNode, a second scheduling cycle). Seen in the demo with warm capacity on."""
    async with world(gpus=2, scale_down_settle=0.5) as w:
        publisher = w.role.publisher
        withhold = publisher.withhold
        chosen: list[str] = []

        def the_scheduler_writes_meanwhile(device_id: str, *, reason: str) -> None:
            withhold(device_id, reason=reason)
            if reason == "choosing" and not chosen:
                chosen.append(device_id)  # the moment the composer has chosen it ...
                w.new_claim("c1")  # ... the scheduler's allocation of it lands
                w.allocate("c1", device_id, "node-1")

        publisher.withhold = the_scheduler_writes_meanwhile  # type: ignore[method-assign]
        model_only(w, "warm-0", "node-0")
        await w.wait(lambda: chosen, "the composer chose a device")
        (choosing,) = chosen
        await w.wait(lambda: w.condition("c1", poolmodel.READY), "c1 ready")
        await w.wait(
            lambda: (w.resource("warm-0") or {}).get("status", {}).get("state") == "Online",
            "warm-0 online",
        )
        assert w.fabric.attached_to(choosing) == "m-node-1"  # the claim's, on the claim's node
        other = w.resource("warm-0")["status"]["cdi_device_id"]  # type: ignore[index]
        assert other != choosing
        assert w.fabric.attached_to(other) == "m-node-0"
        assert not w.condition("c1", poolmodel.FAILED)


async def test_failed_model_only_attach_releases_its_withhold() -> None:
    async with world(gpus=2) as w:
        w.fabric.fail_attach["gpu-0"] = errors.DeviceFailed("gpu-0 broke")
        model_only(w, "warm-0", "node-0")
        await w.wait(
            lambda: (w.resource("warm-0") or {}).get("status", {}).get("state") == "Failed",
            "warm-0 failed",
        )
        assert "gpu-0" not in w.role.publisher.withheld


# --- the publisher rides out the API server ------------------------------------------------------


async def test_publisher_retries_failed_slice_writes() -> None:
    async with world(gpus=2) as w:
        w.kube.fail("PUT", SLICES, status=500, times=3)
        w.kube.fail("PUT", SLICES, status=409, times=1)
        w.fabric.set("gpu-1", DeviceState.FAILED)  # a change to publish
        await w.wait(lambda: w.device_name("gpu-1") not in w.offered(), "the change published")
        await w.wait(lambda: w.role.publisher.error == "", "publishing healthy again")


async def test_publisher_rides_out_a_stalled_api_server() -> None:
    async with world(gpus=2) as w:
        w.kube.request_timeout = 0.5
        w.kube.hang("PUT", SLICES, seconds=4, times=2)
        w.fabric.set("gpu-1", DeviceState.FAILED)
        await w.wait(lambda: w.device_name("gpu-1") not in w.offered(), "published", timeout=15)
        assert not any(t.done() for t in w.tasks)


@pytest.mark.parametrize("status", [403, 422])
async def test_publisher_keeps_retrying_permanent_errors(status: int) -> None:
    async with world(gpus=2) as w:
        w.kube.fail("PUT", SLICES, status=status, times=1)
        w.fabric.set("gpu-1", DeviceState.FAILED)
        await w.wait(lambda: w.device_name("gpu-1") not in w.offered(), "published", timeout=10)
