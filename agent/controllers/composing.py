"""The composer (CoHDI's Composable Resource Operator, event-driven): drives each
ComposableResource through none → Attaching → Online → (deleted: Detaching → gone), or Failed,
by calling the fabric. Parallel across resources, serial per resource (keyed queue); every step is
idempotent and starts from the fabric's truth (the fabric clients read before they write), so a
restart in any state converges without attaching twice.

Attach confirmation on the node side is the node role's job: it writes `NodeReady` into the
resource's conditions, which the scaler waits for. Before a detach of a device the node has
reported, the composer waits for the node's `NodeReleased` (no process, no open handle, removed
from the PCI tree) unless `force_detach` is set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from agent import errors
from agent.controllers import metrics
from agent.controllers.publishing import Publisher
from agent.controllers.queueing import KeyedQueue
from agent.fabric.protocol import FabricManager
from agent.kube.client import MERGE_PATCH, Kube, Obj
from agent.kube.eventing import Recorder
from agent.kube.resources import (
    NODE_READY,
    NODE_RELEASED,
    RESOURCES,
    condition,
    deleting,
    spec,
    state,
)
from agent.kube.watching import Event, Informer
from agent.manifests import crds
from agent.model.fabric import DeviceId, DeviceState, MachineId

logger = logging.getLogger(__name__)


class Composer:
    def __init__(
        self,
        kube: Kube,
        *,
        fabric: FabricManager,
        resources: Informer,
        publisher: Publisher,
        recorder: Recorder,
        workers: int = 64,
    ) -> None:
        self.kube = kube
        self.fabric = fabric
        self.resources = resources
        self.publisher = publisher
        self.recorder = recorder
        self.queue: KeyedQueue[str] = KeyedQueue("composer", self.handle, workers=workers)
        self._chosen: set[str] = set()
        #: uids of resources this leader attached: the events of our own status writes
        #: ("Attaching" arriving after the attach finished) must not start a second attach.
        self._attached: set[str] = set()
        resources.add_handler(self._on_event)

    def _on_event(self, event: Event) -> None:
        self.queue.enqueue(event.obj["metadata"]["name"])

    async def run(self) -> None:
        # Act only with the whole picture: resources listed, and the fabric read and published
        # (a new leader must not judge a node "not on the fabric" before it has asked the fabric).
        await self.resources.synced.wait()
        await self.publisher.synced.wait()
        await self.queue.run()

    async def _status(self, name: str, **fields: Any) -> None:
        await self.kube.patch(
            f"{RESOURCES}/{name}/status", {"status": fields}, content_type=MERGE_PATCH
        )

    async def handle(self, name: str) -> None:
        cr = self.resources.get("", name)
        if cr is None:
            return
        if deleting(cr):
            await self._remove(cr)
            return
        finalizers = cr["metadata"].get("finalizers") or []
        if crds.FINALIZER not in finalizers:
            await self.kube.patch(
                f"{RESOURCES}/{name}",
                {
                    "metadata": {
                        "finalizers": [*finalizers, crds.FINALIZER],
                        "resourceVersion": cr["metadata"]["resourceVersion"],
                    }
                },
            )
            return  # the update event brings us back
        if state(cr) in ("", "Attaching") and cr["metadata"].get("uid") not in self._attached:
            await self._attach(cr)

    async def _attach(self, cr: Obj) -> None:
        marking: asyncio.Task[None] | None = None
        if state(cr) == "":
            # Record "Attaching" while the fabric works: the write and the attach overlap, and
            # every later status write waits for it, so the states land in order.
            marking = asyncio.create_task(
                self._status(cr["metadata"]["name"], state="Attaching", error="")
            )
        try:
            await self._attach_device(cr, marking)
        finally:
            if marking is not None and not marking.done():
                await marking

    async def _attach_device(self, cr: Obj, marking: asyncio.Task[None] | None) -> None:
        name = cr["metadata"]["name"]
        s = spec(cr)
        machine = self.publisher.machine_of_node(s["target_node"])
        if machine is None:
            await self._fail(
                cr,
                "NodeNotOnFabric",
                f"node {s['target_node']} is not wired to any fabric this agent manages",
                marking,
            )
            return
        device = s.get("fabric_device") or (cr.get("status") or {}).get("cdi_device_id") or ""
        if not device:
            # A request-made resource names only a model: choose a free device, and record the
            # choice before attaching, so a restart attaches that same device, not another one.
            device = self._choose(s["model"], machine)
            if device is None:
                await self._fail(
                    cr,
                    "NoFreeDevice",
                    f"no free {s['model']} on the fabric of {s['target_node']}",
                    marking,
                )
                return
            await self._status(name, cdi_device_id=device)
            self.publisher.withhold(device)  # not offered to the scheduler while it attaches
        started = time.monotonic()
        try:
            dev = await self.fabric.attach(DeviceId(device), MachineId(machine), model=s["model"])
        except (
            errors.DeviceBusy,
            errors.DeviceFailed,
            errors.DeviceNotFound,
            errors.FabricRejected,
        ) as exc:
            await self._fail(cr, type(exc).__name__, str(exc), marking)
            return
        if not s.get("fabric_device"):
            self.publisher.release(device)
        if marking is not None:
            await marking
        self._attached.add(cr["metadata"].get("uid", ""))
        metrics.ATTACH_SECONDS.observe(time.monotonic() - started)
        metrics.DECISIONS.labels("attached").inc()
        self.publisher.device_changed(dev)
        await self._status(
            name,
            state="Online",
            error="",
            cdi_device_id=dev.id,
            device_id=dev.serial,
            machine=machine,
            pci_address=dev.pci_address,
        )
        self.recorder.emit(
            cr,
            "Attached",
            f"{dev.id} attached to {s['target_node']} ({machine}) "
            f"in {time.monotonic() - started:.3f} s",
        )

    def _choose(self, model: str, machine: str) -> str | None:
        inv = self.publisher.inventory
        if inv is None:
            return None
        fabric = next((m.fabric for m in inv.machines if m.id == machine), None)
        taken = (
            self._chosen
            | {
                (o.get("status") or {}).get("cdi_device_id") or spec(o).get("fabric_device")
                for o in self.resources.store.values()
            }
            | self.publisher.pinned
            | self.publisher.withheld
        )
        for dev in sorted(inv.devices, key=lambda d: d.id):
            if (
                dev.model == model
                and dev.fabric == fabric
                and dev.state == DeviceState.FREE
                and dev.id not in taken
            ):
                self._chosen.add(dev.id)
                return dev.id
        return None

    async def _fail(
        self, cr: Obj, reason: str, message: str, marking: asyncio.Task[None] | None = None
    ) -> None:
        if marking is not None:
            await marking  # "Failed" must land after "Attaching"
        metrics.FAILURES.labels(reason).inc()
        logger.warning("composable resource %s failed: %s", cr["metadata"]["name"], message)
        await self._status(
            cr["metadata"]["name"], state="Failed", reason=reason, message=message, error=message
        )
        self.recorder.emit(cr, reason, message, warning=True)

    async def _remove(self, cr: Obj) -> None:
        name = cr["metadata"]["name"]
        self._attached.discard(cr["metadata"].get("uid", ""))
        finalizers = cr["metadata"].get("finalizers") or []
        if crds.FINALIZER not in finalizers:
            return
        s, st = spec(cr), cr.get("status") or {}
        if state(cr) != "Detaching":
            await self._status(name, state="Detaching")
        device = st.get("cdi_device_id") or s.get("fabric_device") or ""
        if (
            condition(cr, NODE_READY)
            and not condition(cr, NODE_RELEASED)
            and not s.get("force_detach")
        ):
            logger.info(
                "waiting for node %s to release %s before detaching", s.get("target_node"), device
            )
            return  # the node's NodeReleased update brings us back
        if device:
            dev = await self.fabric.detach(DeviceId(device))
            self.publisher.device_changed(dev)
            self.recorder.emit(cr, "Detached", f"{device} detached from {s.get('target_node')}")
            metrics.DECISIONS.labels("detached").inc()
        await self.kube.patch(
            f"{RESOURCES}/{name}",
            {
                "metadata": {
                    "finalizers": [f for f in finalizers if f != crds.FINALIZER],
                    "resourceVersion": cr["metadata"]["resourceVersion"],
                }
            },
        )
