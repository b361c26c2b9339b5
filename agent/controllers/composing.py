"""The composer (CoHDI's Composable Resource Operator, event-driven): drives each
ComposableResource through none → Attaching → Online → (deleted: Detaching → gone), or Failed,
by calling the fabric. Parallel across resources, serial per resource (keyed queue); every step is
idempotent and starts from the fabric's truth (the fabric clients read before they write), so a
restart in any state converges without attaching twice. The decisions are
`agent.model.composing`'s; this module observes and acts.

One owner per GPU: before attaching, the resource must own its device (`check_owner`): a second
resource naming a device another live resource owns is `Failed` with reason `DeviceOwned` and a
Warning Event, and deleting it never touches the fabric (the fabric clients take "already attached
to this machine" as success, so the check must be here).

Attach confirmation on the node side is the node role's job: it writes `NodeReady` into the
resource's conditions, which the scaler waits for. Before a detach of a device the node has
reported, the composer waits for the node's `NodeReleased` (no process, no open handle, removed
from the PCI tree) unless `force_detach` is set — or the Node object has been gone for
`--node-gone-grace` (it cannot answer any more: detached with a Warning Event).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from agent import errors, logs
from agent.controllers import metrics
from agent.controllers.freshness import FreshClaims
from agent.controllers.publishing import Publisher
from agent.controllers.queueing import KeyedQueue
from agent.fabric.protocol import FabricManager
from agent.kube.client import MERGE_PATCH, Kube, Obj
from agent.kube.eventing import Recorder
from agent.kube.resources import RESOURCES, deleting, spec, state
from agent.kube.watching import Event, Informer
from agent.manifests import crds
from agent.model import claims as claimmodel
from agent.model import composing as decide
from agent.model import names
from agent.model import pool as poolmodel
from agent.model import scaling as scalemodel
from agent.model import slots as slotmodel
from agent.model.fabric import DeviceId, DeviceState, Inventory, MachineId, PoolDevice
from agent.model.objects import (
    DRIVER_LABEL,
    attached_device,
    deleted_at,
    devices_of,
    fabric_device,
    name_of,
    target_node,
)
from agent.model.requests import SUPPORTED_TYPES

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
        node_gone_grace: float = 60.0,
        mono: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        driver: str = "",
        fresh: FreshClaims | None = None,
        choose_settle: float = 0.0,
    ) -> None:
        self.kube = kube
        #: Fresh claims LISTs (shared with the scaler) and how long a device chosen for a
        #: model-only resource stays withheld before that LIST: kube-scheduler may be writing
        #: an allocation it made from the slice it saw before the withhold.
        self.fresh = fresh or FreshClaims(kube, mono=mono)
        self.choose_settle = choose_settle
        self.fabric = fabric
        self.resources = resources
        self.publisher = publisher
        self.recorder = recorder
        self.node_gone_grace = node_gone_grace
        self.mono = mono
        self.wall = wall
        self.driver_label = names.label_value(driver) if driver else ""
        self.queue: KeyedQueue[str] = KeyedQueue(
            "composer", metrics.timed("composer", self.handle), workers=workers
        )
        metrics.QUEUES.track(self.queue)
        #: resource name -> device chosen for it and not yet seen in its status by our informer
        self._choosing: dict[str, str] = {}
        #: uids of resources this leader attached and recorded Online: the events of our own
        #: earlier status writes ("Attaching" arriving after Online was written) must not start a
        #: second attach. Added only after the Online write succeeded.
        self._attached: set[str] = set()
        #: device -> the resource this term started attaching it for (until that one is gone)
        self._claimed: dict[str, str] = {}
        #: (machine, model) -> serialises attaches through anonymous slots
        self._slot_locks: dict[tuple[str, str], asyncio.Lock] = {}
        #: resource name -> the highest resourceVersion our own writes returned
        self._written: dict[str, int] = {}
        #: node name -> monotonic time we first saw its Node object missing
        self._node_missing: dict[str, float] = {}
        #: uids of deleting resources whose device this term detached (its Event, count and
        #: log line done): a retry after a failed finalizer write (a 409 when the node wrote
        #: meanwhile) only removes the finalizer, it does not detach, announce or count again
        self._detached: set[str] = set()
        #: uid -> monotonic time an unlabelled resource we cannot serve was first seen
        self._unclaimed: dict[str, float] = {}
        #: uid -> wall time this composer first saw an adopted resource deleting (`_deleting_for`)
        self._deleting_seen: dict[str, float] = {}
        resources.add_handler(self._on_event)
        publisher.on_inventory.append(self._on_inventory)
        publisher.nodes.add_handler(self._on_node)

    def _on_event(self, event: Event) -> None:
        obj = event.obj
        name = name_of(obj)
        device = fabric_device(obj)
        if event.type == "DELETED" or (device and self._choosing.get(name) == device):
            self._choosing.pop(name, None)
        if event.type == "DELETED":
            self._attached.discard(obj["metadata"].get("uid", ""))
            self._detached.discard(obj["metadata"].get("uid", ""))
            self._unclaimed.pop(obj["metadata"].get("uid", ""), None)
            self._deleting_seen.pop(obj["metadata"].get("uid", ""), None)
            self._written.pop(name, None)
            for dev in devices_of(obj):
                if self._claimed.get(dev) == name:
                    del self._claimed[dev]
            if device:  # its device may be free for a resource that found none
                self._on_inventory(None)
        self.queue.enqueue(name)
        if device:  # the others naming the same device may now own it, or be refused
            for other in self.resources.store.values():
                if fabric_device(other) == device and name_of(other) != name:
                    self.queue.enqueue(name_of(other))

    def _on_node(self, event: Event) -> None:
        if event.type != "DELETED":
            return
        node = event.obj["metadata"]["name"]
        for obj in self.resources.store.values():
            if target_node(obj) == node:
                self.queue.enqueue(name_of(obj))

    def _on_inventory(self, _inventory: Inventory | None) -> None:
        # Capacity may have freed up: retry the resources that found no free device.
        for obj in self.resources.store.values():
            st = obj.get("status") or {}
            if state(obj) == "Failed" and st.get("reason") == decide.NO_FREE_DEVICE:
                self.queue.enqueue(name_of(obj))

    async def run(self) -> None:
        # Act only with the whole picture: resources listed, and the fabric read and published
        # (a new leader must not judge a node "not on the fabric" before it has asked the fabric).
        await self.resources.synced.wait()
        await self.publisher.synced.wait()
        await self.queue.run()

    async def _status(self, name: str, **fields: Any) -> Obj:
        """Merge `fields` into the resource's status; returns the stored object."""
        written = await self.kube.patch(
            f"{RESOURCES}/{name}/status", {"status": fields}, content_type=MERGE_PATCH
        )
        self._wrote(written)
        return written

    def _wrote(self, obj: Obj) -> None:
        rv = str(obj.get("metadata", {}).get("resourceVersion", ""))
        if rv.isdigit():
            name = name_of(obj)
            self._written[name] = max(self._written.get(name, 0), int(rv))

    def _stale(self, obj: Obj) -> bool:
        """Our informer's copy is older than a write of ours: act on the newer state, whose
        event is on its way (acting on the old one would attach or detach a second time)."""
        rv = str(obj["metadata"].get("resourceVersion", ""))
        mine = self._written.get(name_of(obj))
        return mine is not None and rv.isdigit() and int(rv) < mine

    async def handle(self, name: str) -> None:
        cr = self.resources.get("", name)
        if cr is None or self._stale(cr):
            return
        if self.driver_label and not await self._ours(cr):
            return
        if deleting(cr):
            await self._remove(cr)
            return
        finalizers = cr["metadata"].get("finalizers") or []
        if crds.FINALIZER not in finalizers:
            self._wrote(
                await self.kube.patch(
                    f"{RESOURCES}/{name}",
                    {
                        "metadata": {
                            "finalizers": [*finalizers, crds.FINALIZER],
                            "resourceVersion": cr["metadata"]["resourceVersion"],
                        }
                    },
                )
            )
            return  # the update event brings us back
        if await self._node_gone(cr):
            return
        if state(cr) == "Failed" and (cr.get("status") or {}).get("reason") == (
            decide.NO_FREE_DEVICE
        ):
            await self._retry_no_free_device(cr)
            return
        if state(cr) in ("", "Attaching") and cr["metadata"].get("uid") not in self._attached:
            await self._attach(cr)

    async def _ours(self, cr: Obj) -> bool:
        """May this deployment act on `cr` now (`decide.adoption`)? Another deployment's: never.
        One nobody labelled (CoHDI's operator's, or hand-written) whose node is on our fabric, or
        that names one of our devices: labelled ours first (the update event brings it back), so
        that no other deployment acts on it; one we cannot serve: left to the others for
        `UNCLAIMED_GRACE` seconds."""
        name = name_of(cr)
        uid = str(cr["metadata"].get("uid", ""))
        serves = self.publisher.machine_of_node(target_node(cr)) is not None or any(
            self.publisher.device(d) is not None for d in devices_of(cr)
        )
        first = self._unclaimed.setdefault(uid, self.mono())
        verdict, after = decide.adoption(
            cr,
            self.driver_label,
            serves=serves,
            unclaimed_for=self.mono() - first,
            grace=decide.UNCLAIMED_GRACE,
        )
        if verdict is not decide.Adoption.WAIT:
            self._unclaimed.pop(uid, None)
        if verdict is decide.Adoption.FOREIGN:
            return False  # another deployment's (another --driver): never ours to touch
        if verdict is decide.Adoption.WAIT:
            self.queue.enqueue_after(name, after)
            return False
        if verdict is decide.Adoption.LABEL:
            try:
                self._wrote(
                    await self.kube.patch(
                        f"{RESOURCES}/{name}",
                        {
                            "metadata": {
                                "labels": {DRIVER_LABEL: self.driver_label},
                                "annotations": {decide.ADOPTED_ANNOTATION: state(cr) or "new"},
                                "resourceVersion": cr["metadata"]["resourceVersion"],
                            }
                        },
                    )
                )
            except errors.KubeNotFound:
                return False
            except errors.KubeConflict:
                self.queue.enqueue_after(name, 0.1)  # changed meanwhile (another took it?)
                return False
            logger.info(
                "%s: adopted (no deployment's label; %s %s is on our fabric): labelled %s=%s",
                name,
                state(cr) or "new",
                fabric_device(cr) or target_node(cr),
                DRIVER_LABEL,
                self.driver_label,
                extra=logs.fields(resource=name, node=target_node(cr), device=fabric_device(cr)),
            )
            return False  # the update event brings us back
        return True

    async def _node_gone(self, cr: Obj) -> bool:
        """A live resource whose Node has been gone for `--node-gone-grace` is deleted (with a
        Warning Event): nothing can use its device there any more, and the removal path detaches
        it without waiting for a node that cannot answer."""
        node = target_node(cr)
        if not node or self.publisher.nodes.get("", node) is not None:
            self._node_missing.pop(node, None)
            return False
        if not self.publisher.nodes.synced.is_set():
            return False
        since = self._node_missing.setdefault(node, self.mono())
        gone_for = self.mono() - since
        if gone_for < self.node_gone_grace:
            self.queue.enqueue_after(name_of(cr), self.node_gone_grace - gone_for)
            return False
        device = fabric_device(cr) or "its device"
        message = f"node {node} is gone (for {gone_for:.0f} s): releasing {device}"
        logger.warning(
            "%s: %s",
            name_of(cr),
            message,
            extra=logs.fields(
                decision="node-gone", resource=name_of(cr), device=fabric_device(cr), node=node
            ),
        )
        metrics.FAILURES.labels("NodeGone").inc()
        metrics.DECISIONS.labels("node-gone").inc()
        self.recorder.emit(cr, "NodeGone", message, warning=True)
        with contextlib.suppress(errors.KubeNotFound):
            await self.kube.delete(f"{RESOURCES}/{name_of(cr)}")
        return True

    async def _attach_slot(self, name: str, slot: str, machine: str, model: str) -> PoolDevice:
        """Attach through an anonymous slot (the fabric picks the GPU). Serialised per (machine,
        model), and preceded by a fresh read of the fabric: a GPU of the model on the machine
        that no resource names is the one an earlier attach through this slot brought, whose
        answer was lost — adopt it instead of attaching a second one."""
        lock = self._slot_locks.setdefault((machine, model), asyncio.Lock())
        async with lock:
            inventory = await self.fabric.inventory()
            owned = decide.taken_devices(self.resources.store.values(), also=set(self._claimed))
            found = slotmodel.unowned_arrivals(inventory, machine=machine, model=model, owned=owned)
            if found:
                # A GPU attached behind our back is unnamed too, and offered on its node under
                # its own id: a claim may hold it with no resource yet (no binding conditions).
                # Such a GPU is that claim's, never this slot's.
                held = await self._names_claims_hold()
                found = [d for d in found if poolmodel.device_name(d.id) not in held]
            if found:
                dev = found[0]
                logger.warning(
                    "%s: %s of %s is on %s and no resource names it (an attach answer was "
                    "lost?): adopting it for slot %s",
                    name,
                    dev.id,
                    model,
                    machine,
                    slot,
                    extra=logs.fields(
                        decision="adopted",
                        resource=name,
                        device=dev.id,
                        model=model,
                        machine=machine,
                    ),
                )
                metrics.DECISIONS.labels("adopted").inc()
            else:
                dev = await self.fabric.attach(DeviceId(slot), MachineId(machine), model=model)
            self._claimed[dev.id] = name
            return dev

    async def _names_claims_hold(self) -> set[str]:
        """The device names (`agent.model.pool.device_name`) of our driver that any claim holds,
        from a LIST no older than now (`FreshClaims`). Raises what the read raises (the
        attempt is retried)."""
        claims = await self.fresh.since(self.mono())
        driver = self.publisher.driver
        return {name for c in claims for _, name in claimmodel.allocated_devices(c, driver)}

    def _refusal(self, cr: Obj, device: str) -> tuple[str, str] | None:
        """Why this resource cannot be composed at all, or None: a type other than GPUs, or a
        named device of another model than the resource asks for."""
        s = spec(cr)
        if (s.get("type") or "gpu") not in SUPPORTED_TYPES:
            return "UnsupportedType", (
                f"type {s.get('type')!r} is not composed by this agent (it composes gpu)"
            )
        dev = self.publisher.device(device) if device else None
        if dev is not None and s.get("model") and dev.model and dev.model != s["model"]:
            return "ModelMismatch", f"{device} is a {dev.model}, not the {s['model']} asked for"
        return None

    def _fabric_machine(self, device: str) -> str | None:
        """The machine the fabric (as last read) has `device` attached or attaching to."""
        dev = self.publisher.fabric_device(device) if device else None
        if dev is None or dev.state == DeviceState.FREE:
            return None
        return dev.machine

    async def _retry_no_free_device(self, cr: Obj) -> None:
        s = spec(cr)
        machine = self.publisher.machine_of_node(s.get("target_node", ""))
        if machine is None:
            return
        taken = self._taken()
        if decide.free_count(
            self.publisher.inventory, model=s.get("model", ""), machine=machine, taken=taken
        ):
            logger.info(
                "%s: a free %s is available now; attaching",
                name_of(cr),
                s.get("model"),
                extra=logs.fields(resource=name_of(cr), model=s.get("model")),
            )
            await self._attach(cr)

    def _taken(self) -> set[str]:
        return decide.taken_devices(
            self.resources.store.values(),
            also=set(self._choosing.values()) | self.publisher.pinned | self.publisher.withheld,
        )

    async def _attach(self, cr: Obj) -> None:
        name = name_of(cr)
        verdict, owner = decide.check_owner(
            cr, self.resources.store.values(), claimed=self._claimed
        )
        if verdict == decide.OwnerCheck.WAIT:
            self.queue.enqueue_after(name, 0.5)  # the owner is detaching it; then it is ours
            return
        if verdict == decide.OwnerCheck.REFUSE:
            assert owner is not None
            await self._fail(
                cr,
                decide.DEVICE_OWNED,
                f"{fabric_device(cr)} is owned by ComposableResource {name_of(owner)} "
                f"(on {target_node(owner)}); this resource will not attach or detach it",
            )
            return
        marking: asyncio.Task[Obj] | None = None
        if state(cr) != "Attaching":
            # Record "Attaching" while the fabric works: the write and the attach overlap, and
            # every later status write waits for it, so the states land in order.
            marking = asyncio.create_task(self._status(name, state="Attaching", error=""))
        try:
            await self._attach_device(cr, marking)
        finally:
            if marking is not None and not marking.done():
                await marking

    async def _attach_device(self, cr: Obj, marking: asyncio.Task[Obj] | None) -> None:
        name = name_of(cr)
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
        device = fabric_device(cr)
        refusal = self._refusal(cr, device)
        if refusal is not None:
            await self._fail(cr, *refusal, marking)
            return
        chosen = ""
        if not device and decide.reclaimed_device(cr):
            # CoHDI's orphan-reclaim resource: its GPU (already on the machine), not a new one
            device = chosen = decide.reclaimed_device(cr)
            self._choosing[name] = device
            self.publisher.withhold(device, reason="choosing")
        if not device:
            # A request-made resource names only a model: choose a free device, and record the
            # choice before attaching, so a restart attaches that same device, not another one.
            found = decide.choose_device(
                self.publisher.inventory, model=s["model"], machine=machine, taken=self._taken()
            )
            if found is None:
                await self._fail(
                    cr,
                    decide.NO_FREE_DEVICE,
                    f"no free {s['model']} on the fabric of {s['target_node']}",
                    marking,
                )
                return
            device = chosen = found
            self._choosing[name] = device
            self.publisher.withhold(device, reason="choosing")  # not offered while it attaches
            if not await self._still_unclaimed(device):
                # the scheduler gave it to a claim from the slice it still saw: that claim's
                # (its attach follows), and this resource chooses again
                self._choosing.pop(name, None)
                self.publisher.release(device, reason="choosing")
                logger.info(
                    "%s: %s was allocated to a claim while chosen; choosing another",
                    name,
                    device,
                    extra=logs.fields(resource=name, device=device),
                )
                self.queue.enqueue(name)
                return
        try:
            if chosen:
                await self._status(name, cdi_device_id=device)
            await self._attach_and_record(cr, device, machine, marking)
        except BaseException:
            if chosen and self._choosing.get(name) == chosen:
                # the choice was not recorded (or the attach failed before anything happened):
                # free it for others; a recorded one is found again from the status
                self._choosing.pop(name, None)
            raise
        finally:
            if chosen:
                self.publisher.release(device, reason="choosing")

    async def _still_unclaimed(self, device: str) -> bool:
        """After `device` was withheld for a model-only choice: the slice write awaited, left to
        settle `choose_settle` seconds, then a fresh LIST of claims — True when no claim holds
        it. Only then is it safe to attach it to this resource's node (else a claim pinned to
        another node would get a GPU attached elsewhere: DeviceOnOtherNode, a second scheduling
        cycle). A LIST that fails counts as held (the attempt is retried)."""
        if self.choose_settle <= 0:
            return True
        try:
            async with asyncio.timeout(30):
                await self.publisher.flush()
            await asyncio.sleep(self.choose_settle)
            claims = await self.fresh.since(self.mono())
        except (errors.AgentError, TimeoutError) as exc:
            logger.info("fresh claims read for %s failed (%s); trying again", device, exc)
            return False
        held = scalemodel.held_devices(claims, self.publisher.driver, self.publisher.device_index())
        return device not in held

    async def _attach_and_record(
        self, cr: Obj, device: str, machine: str, marking: asyncio.Task[Obj] | None
    ) -> None:
        name = name_of(cr)
        s = spec(cr)
        # From here on this resource owns the device, whatever the informer shows yet: a second
        # resource racing for it is refused (model.composing.owner_of).
        self._claimed.setdefault(device, name)
        started = self.mono()
        try:
            if slotmodel.is_slot(device):
                dev = await self._attach_slot(name, device, machine, s["model"])
            else:
                dev = await self.fabric.attach(
                    DeviceId(device), MachineId(machine), model=s["model"]
                )
        except (
            errors.DeviceBusy,
            errors.DeviceFailed,
            errors.DeviceNotFound,
            errors.FabricRejected,
        ) as exc:
            await self._fail(cr, type(exc).__name__, str(exc), marking)
            return
        if marking is not None:
            await marking
        took = self.mono() - started
        if slotmodel.is_slot(device) and s.get("fabric_device") == device:
            # the GPU that came through the slot is offered under the slot's name only, from now
            self.publisher.arrived(device, str(dev.id))
        if not s.get("fabric_device"):
            # A model-only resource (a request's member, warm capacity): the GPU was never
            # offered under any identity while chosen, so it can go straight to its node's own
            # pool (where the scheduler takes it first) — placed before it is published attached.
            self.publisher.place(str(dev.id), s["target_node"])
        self.publisher.device_changed(dev)
        await self._status(
            name,
            state="Online",
            error="",
            reason="",
            message="",
            cdi_device_id=dev.id,
            device_id=dev.gpu_uuid,
            machine=machine,
            pci_address=dev.pci_address,
        )
        self._attached.add(cr["metadata"].get("uid", ""))  # only once Online is recorded
        metrics.ATTACH_SECONDS.observe(took)
        metrics.DECISIONS.labels("attached").inc()
        logger.info(
            "%s: %s attached to %s (%s) in %.3f s",
            name,
            dev.id,
            s["target_node"],
            machine,
            took,
            extra=logs.fields(
                decision="attached",
                resource=name,
                device=dev.id,
                model=s["model"],
                node=s["target_node"],
                machine=machine,
                fabric=dev.fabric,
                duration=took,
            ),
        )
        # No Event here: on the normal path the claim's `DeviceReady` Event says it to the person
        # who asked, the resource's status holds machine, PCI address and state, and the line
        # above and the attach histogram give the time. One Event less per claim keeps the API
        # work per claim within one request of the bare chain (bench/).

    async def _fail(
        self, cr: Obj, reason: str, message: str, marking: asyncio.Task[Obj] | None = None
    ) -> None:
        if marking is not None:
            await marking  # "Failed" must land after "Attaching"
        metrics.FAILURES.labels(reason).inc()
        metrics.DECISIONS.labels("failed").inc()
        logger.warning(
            "composable resource %s failed: %s",
            name_of(cr),
            message,
            extra=logs.fields(
                decision="failed",
                resource=name_of(cr),
                device=fabric_device(cr),
                node=target_node(cr),
                reason=reason,
            ),
        )
        await self._status(
            name_of(cr), state="Failed", reason=reason, message=message, error=message
        )
        self.recorder.emit(cr, reason, message, warning=True)

    def _deleting_for(self, cr: Obj) -> float:
        """Seconds the resource has been deleting, as `decide.decide_remove` counts them: since its
        deletionTimestamp; for one adopted with its GPU on the node, since this composer first
        saw it deleting (CoHDI may have deleted it long before our node role could answer)."""
        since = deleted_at(cr)
        if decide.adopted_in_use(cr):
            uid = str(cr["metadata"].get("uid", ""))
            since = max(since, self._deleting_seen.setdefault(uid, self.wall()))
        return self.wall() - since

    async def _remove(self, cr: Obj) -> None:
        name = name_of(cr)
        finalizers = cr["metadata"].get("finalizers") or []
        if crds.FINALIZER not in finalizers:
            return
        node = target_node(cr)
        node_exists = self.publisher.nodes.get("", node) is not None
        if node_exists:
            self._node_missing.pop(node, None)
        else:
            self._node_missing.setdefault(node, self.mono())
        d = decide.decide_remove(
            cr,
            self.resources.store.values(),
            node_exists=node_exists,
            node_missing_since=self._node_missing.get(node),
            now=self.mono(),
            node_gone_grace=self.node_gone_grace,
            deleting_for=self._deleting_for(cr),
            claimed=self._claimed,
            fabric_machine=self._fabric_machine(attached_device(cr)),
            own_machine=self.publisher.machine_of_node(node),
        )
        device = attached_device(cr)
        version = cr["metadata"]["resourceVersion"]
        if d.step != decide.RemoveStep.DROP and device:
            # No new claim may be given it from now on (a scale-down withheld it already).
            self.publisher.withhold(device, reason="detaching")
        fields = logs.fields(resource=name, device=device, node=node)
        uid = cr["metadata"].get("uid", "")
        if uid in self._detached:
            pass  # detached already; only the finalizer write failed: do that again, only that
        elif d.step == decide.RemoveStep.DROP:
            logger.info("%s: removed without touching the fabric: %s", name, d.why, extra=fields)
        else:
            if state(cr) != "Detaching":
                written = await self._status(name, state="Detaching")
                version = written["metadata"]["resourceVersion"]  # our own write: not a conflict
                if d.step == decide.RemoveStep.WAIT_RELEASE:  # once, as the state changes
                    logger.info(
                        "waiting for node %s to release %s before detaching",
                        node,
                        device,
                        extra=fields,
                    )
            if d.step == decide.RemoveStep.WAIT_RELEASE:
                if d.after:  # and if its agent stays silent, we look again after the grace
                    self.queue.enqueue_after(name, d.after)
                return  # the node's NodeReleased update brings us back
            if d.step == decide.RemoveStep.WAIT_NODE_GONE:
                self.queue.enqueue_after(name, d.after)
                return
            if d.why:  # detaching without the node's release
                metrics.FAILURES.labels("NodeGone").inc()
                logger.warning("%s: %s", name, d.why, extra=fields)
                self.recorder.emit(cr, "NodeGone", f"{device}: {d.why}", warning=True)
            started = self.mono()
            try:
                dev: PoolDevice | None = await self.fabric.detach(DeviceId(device))
            except errors.DeviceNotFound as exc:
                # not on the fabric (any more): there is nothing to detach; the resource goes
                logger.warning("%s: %s; nothing to detach", name, exc, extra=fields)
                dev = None
            took = self.mono() - started
            self._detached.add(uid)
            if dev is not None:
                self.publisher.device_changed(dev)
            self.recorder.emit(cr, "Detached", f"{device} detached from {node}")
            metrics.DETACH_SECONDS.observe(took)
            metrics.DECISIONS.labels("detached").inc()
            logger.info(
                "%s: %s detached from %s in %.3f s",
                name,
                device,
                node,
                took,
                extra=fields | logs.fields(decision="detached", duration=took),
            )
        self._wrote(
            await self.kube.patch(
                f"{RESOURCES}/{name}",
                {
                    "metadata": {
                        "finalizers": [f for f in finalizers if f != crds.FINALIZER],
                        "resourceVersion": version,
                    }
                },
            )
        )
