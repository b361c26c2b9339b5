"""The scaler (CoHDI's Dynamic Device Scaler, event-driven): a thin loop that observes claims,
ComposableResources, Nodes and the fabric, asks `agent.model.scaling` what to do, and does it.

Scale up: a claim allocated to one of our pool devices whose binding conditions are unmet → the
node from `allocation.nodeSelector` → the device pinned in the slices → a ComposableResource for
(device, node) → when the node reports `NodeReady` → `FabricDeviceReady=True` in the claim's
`status.devices[]` entry for exactly that (driver, pool, device), written read-modify-write on the
resourceVersion (other drivers' entries untouched). The scheduler then binds in the same cycle.

Failure: the resource failed, or the claim's deadline (well before the scheduler's binding timeout)
passed → `FabricDeviceFailed=True`, the device withheld from the slices, the resource deleted if
it was made for this claim (the composer detaches whatever was half-attached). The scheduler
deallocates and tries another device.

Scale down, and why it cannot take a GPU from a pod: an attached device no claim holds, idle for
longer than the grace, on a node above its minimum, is (1) withheld from the slices and the write
acknowledged by the API server; (2) left to settle for `--scale-down-settle` seconds, during which
any claim event naming it aborts the scale-down — this covers the scheduler's lag: it allocates
from its own informer's copy of the slices and writes the claim's allocation in its binding cycle,
so an allocation made from the old slices reaches the API server within that window; (3) checked
against a fresh LIST of claims from the API server (not our informer, which may lag), and only
then (4) its resource is deleted; the composer then waits for the node's safe removal
(`NodeReleased`: no process, no open handle) before the fabric detach. Should an allocation still
slip past all of that, the device's claim is found holding a device not on its node and the device
is attached again (`model.scaling.stranded`), so the pod starts late instead of never.

Per-node maxima are enforced by labelling full nodes, which the free devices' node selectors
exclude, so a claim is never pinned to a node that cannot take it.

Device health (`agent.model.health`): the node's `DeviceHealthy` condition on a GPU's resource
and the fabric's `PoolDevice.health` make a GPU unhealthy; it is published with a
`cohdi.io/unhealthy` DRA device taint (withheld instead when the API server drops taints), a claim
still waiting for it fails with `DeviceUnhealthy`, and it is swapped out: detached at once
through the scale-down's steps when no claim holds it, else when its claim lets go
(`UnhealthyDetach` Event). The taint lifts once every source has been clear for `--health-grace`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable

from agent import errors, logs
from agent.controllers import metrics
from agent.controllers.freshness import FreshClaims
from agent.controllers.publishing import NODES, Publisher
from agent.controllers.queueing import KeyedQueue
from agent.kube.client import Kube, Obj, path_of
from agent.kube.eventing import Recorder
from agent.kube.resources import CLAIM_ANNOTATION, RESOURCES, deleting, resource_name
from agent.kube.watching import Event, Informer
from agent.manifests import crds
from agent.model import claims as claimmodel
from agent.model import composing as composemodel
from agent.model import health as healthmodel
from agent.model import names
from agent.model import pool as poolmodel
from agent.model import requests as requestmodel
from agent.model import scaling as decide
from agent.model.fabric import DeviceState, Inventory
from agent.model.objects import (
    DRIVER_LABEL,
    attached_device,
    devices_of,
    fabric_device,
    mine,
    state,
    target_node,
)

logger = logging.getLogger(__name__)

MAX_LABEL = decide.MAX_LABEL
MIN_LABEL = decide.MIN_LABEL

ClaimKey = tuple[str, str]


#: On a ComposableResource the scaler made for a GPU it found attached with no owner.
ADOPTED_ANNOTATION = "cohdi.io/adopted"
#: On a model-only ComposableResource the scaler made to keep warm capacity on a node.
WARM_ANNOTATION = "cohdi.io/warm"
#: A node's own number of idle GPUs per model to keep attached (overrides --warm-devices).
WARM_LABEL = "cohdi.io/warm-devices"


def spec_model(obj: Obj) -> str:
    return str((obj.get("spec") or {}).get("model") or "")


#: The longest a scale-down waits for its withholding to be written before it gives up (and
#: retries later): without that write the scheduler may still be offering the device.
FLUSH_TIMEOUT = 30.0


def claims_path(namespace: str) -> str:
    return path_of(
        group="resource.k8s.io", version="v1", plural="resourceclaims", namespace=namespace
    )


class Scaler:
    def __init__(
        self,
        kube: Kube,
        *,
        driver: str,
        claims: Informer,
        resources: Informer,
        nodes: Informer,
        publisher: Publisher,
        recorder: Recorder,
        deadline: float,
        idle_grace: float,
        settle: float = 5.0,
        orphan_grace: float = 10.0,
        warm: int = 0,
        fresh: FreshClaims | None = None,
        workers: int = 64,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        health_grace: float = 60.0,
        health_evict: bool = False,
    ) -> None:
        self.kube = kube
        self.driver = driver
        self.claims = claims
        self.resources = resources
        self.nodes = nodes
        self.publisher = publisher
        self.recorder = recorder
        self.deadline = deadline
        self.idle_grace = idle_grace
        self.settle = settle
        self.driver_label = names.label_value(driver)
        self.orphan_grace = orphan_grace
        self.warm = warm
        self.fresh = fresh or FreshClaims(kube, mono=mono)
        self.wall = wall
        self.mono = mono
        self.queue: KeyedQueue[ClaimKey] = KeyedQueue(
            "scaler", metrics.timed("scaler", self.handle), workers=workers
        )
        self.idle: KeyedQueue[str] = KeyedQueue(
            "scale-down", metrics.timed("scale-down", self.check_idle), workers=8
        )
        self.labels: KeyedQueue[str] = KeyedQueue(
            "node-labels", metrics.timed("node-labels", self._sync_full_label), workers=4
        )
        self.orphans: KeyedQueue[str] = KeyedQueue(
            "orphans", metrics.timed("orphans", self._check_orphan), workers=2
        )
        self.moves: KeyedQueue[str] = KeyedQueue(
            "node-pool-moves", metrics.timed("node-pool-moves", self._check_move), workers=8
        )
        self.warmth: KeyedQueue[str] = KeyedQueue(
            "warm-capacity", metrics.timed("warm-capacity", self._keep_warm), workers=4
        )
        self.sick: KeyedQueue[str] = KeyedQueue(
            "device-health", metrics.timed("device-health", self._check_health), workers=8
        )
        metrics.QUEUES.track(
            self.queue, self.idle, self.labels, self.orphans, self.moves, self.warmth, self.sick
        )
        self.health_grace = health_grace
        self.health_evict = health_evict
        #: device -> the node's last word on it (kept after its resource is gone: a detached GPU
        #: has no node to speak for it)
        self._node_words: dict[str, healthmodel.Word] = {}
        #: device -> uid of the resource its node's last word was read from ("" recovered)
        self._node_word_from: dict[str, str] = {}
        #: device -> the Node its node-reported unhealthy word is kept on (`_keep_word`)
        self._kept_on: dict[str, str] = {}
        #: device -> the fabric's word, for devices the fabric reports unhealthy
        self._fabric_words: dict[str, healthmodel.Word] = {}
        #: device -> its health while unhealthy or recovering (agent.model.health)
        self.health: dict[str, healthmodel.Health] = {}
        #: device -> monotonic time it was first seen attached with no resource naming it
        self._orphan_since: dict[str, float] = {}
        #: device id -> monotonic time it was last held by a claim
        self.last_used: dict[str, float] = {}
        self._held: dict[ClaimKey, set[tuple[str, str]]] = {}
        #: (claim, pool, device name) -> when the anonymous slot it holds was first found not
        #: offered (wall seconds; `agent.model.scaling.SLOT_VANISH_GRACE`)
        self._vanished: dict[tuple[ClaimKey, str, str], float] = {}
        #: The node each allocated claim is pinned to, and the claims pinned to each node: a
        #: Node that comes back requeues its own claims without a scan of every claim (5,000
        #: Nodes listed at start times 2,000 claims was 12 % of the leader's CPU).
        self._claim_node: dict[ClaimKey, str] = {}
        self._pinned_to: dict[str, set[ClaimKey]] = {}
        #: Nodes carrying the warm-capacity label (kept from Node events, not scanned per claim).
        self._warm_labelled: set[str] = set()
        #: resources we created that our informer has not shown yet: name -> node
        self._created: dict[str, str] = {}
        #: devices being scaled down -> set when a claim names one meanwhile (abort)
        self._draining: dict[str, asyncio.Event] = {}
        #: (claim key, device) pairs we warned about (a held device attached elsewhere)
        self._warned: set[tuple[ClaimKey, str]] = set()
        claims.add_handler(self._on_claim)
        resources.add_handler(self._on_resource)
        nodes.add_handler(self._on_node_event)
        publisher.on_inventory.append(self._on_inventory)
        publisher.on_inventory.append(self._on_fabric_health)
        publisher.slices.add_handler(self._recover_taint)
        nodes.add_handler(self._recover_kept_word)

    # --- events ----------------------------------------------------------------------------------

    def _on_claim(self, event: Event) -> None:
        meta = event.obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        now_held = (
            set()
            if event.type == "DELETED"
            else claimmodel.allocated_devices(event.obj, self.driver)
        )
        before = self._held.get(key, set())
        now = self.mono()
        for pool, name in before - now_held:  # released: start the idle clock
            device = self.publisher.device_id_of(pool, name)
            if device:
                self.publisher.unpin(device)
                self.last_used[device] = now
                self.idle.enqueue_after(device, self.idle_grace)
                if self.health:
                    # unhealthy: swapped out now that it is free (a slot: the GPU behind it)
                    cr = self._resource_of(device)
                    for gpu in ({device} | devices_of(cr)) if cr else {device}:
                        if gpu in self.health:
                            self.sick.enqueue(gpu)
                self.moves.enqueue(device)  # idle now: to its node's pool
        for pool, name in now_held:
            device = self.publisher.device_id_of(pool, name)
            if device:
                self.last_used[device] = now
                if device in self._draining:
                    self._draining[device].set()  # the scheduler took it: abort the scale-down
        old_node = self._claim_node.pop(key, "")
        if old_node:
            self._pinned_to.get(old_node, set()).discard(key)
            if not self._pinned_to.get(old_node):
                self._pinned_to.pop(old_node, None)
        new_node = (
            ""
            if event.type == "DELETED"
            else claimmodel.node_of((event.obj.get("status") or {}).get("allocation") or {})
        )
        if new_node:
            self._claim_node[key] = new_node
            self._pinned_to.setdefault(new_node, set()).add(key)
        if now_held != before:
            self._warm_nodes_changed({old_node, new_node} - {""})
        if now_held:
            self._held[key] = now_held
        else:
            self._held.pop(key, None)
        if event.type != "DELETED":
            self.queue.enqueue(key)
        else:
            self._warned = {w for w in self._warned if w[0] != key}

    def _on_resource(self, event: Event) -> None:
        obj = event.obj
        name = obj["metadata"]["name"]
        self._created.pop(name, None)
        self._on_node_health(event)
        ref = (obj["metadata"].get("annotations") or {}).get(CLAIM_ANNOTATION, "")
        if "/" in ref:
            ns, claim = ref.split("/", 1)
            self.queue.enqueue((ns, claim))
        device = fabric_device(obj)
        if event.type == "DELETED" and device:
            # A claim may hold it still (a scale-down that lost a race): look at those claims.
            for key in self._holders(device):
                self.queue.enqueue(key)
        elif device and requestmodel.owner_of(obj) is None:
            self.idle.enqueue_after(device, self.idle_grace)
        if event.type != "DELETED":
            for dev in devices_of(obj):
                self.moves.enqueue(dev)
        if target_node(obj):
            self.labels.enqueue(target_node(obj))
            self.warmth.enqueue(target_node(obj))

    def _on_node_event(self, event: Event) -> None:
        """A node's labels (warm capacity, limits) may have changed, or a Node came back: look
        at its warm capacity and at the claims pinned to it (a returning node gets its GPUs)."""
        node = event.obj["metadata"]["name"]
        if event.type != "DELETED" and (event.obj["metadata"].get("labels") or {}).get(WARM_LABEL):
            self._warm_labelled.add(node)
        else:
            self._warm_labelled.discard(node)
        self.warmth.enqueue(node)
        self.labels.enqueue(node)
        if event.type == "ADDED":
            for key in sorted(self._pinned_to.get(node, ())):
                self.queue.enqueue(key)

    def _holders(self, device: str) -> list[ClaimKey]:
        return [
            key
            for key, held in self._held.items()
            if any(self.publisher.device_id_of(p, n) == device for p, n in held)
        ]

    async def run(self) -> None:
        await self.claims.synced.wait()
        await self.resources.synced.wait()
        await self.publisher.synced.wait()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.queue.run())
            tg.create_task(self.idle.run())
            tg.create_task(self.labels.run())
            tg.create_task(self.orphans.run())
            tg.create_task(self.moves.run())
            tg.create_task(self.warmth.run())
            tg.create_task(self.sick.run())
            self._warm_nodes_changed()
            for device in list(self.health):
                self.sick.enqueue(device)

    # --- scale up --------------------------------------------------------------------------------

    async def handle(self, key: ClaimKey) -> None:
        claim = self.claims.get(*key)
        if claim is None:
            for gone in [v for v in self._vanished if v[0] == key]:
                del self._vanished[gone]
            return
        for b in claimmodel.bindings(claim, self.driver):
            if b.ready or b.failed:
                continue
            await self._bind(claim, b)
        await self._check_held(key, claim)

    async def _bind(self, claim: Obj, b: claimmodel.Binding) -> None:
        key = (b.namespace, b.claim)
        device = self.publisher.device_id_of(b.pool, b.device)
        vanished_for = None
        if device is not None:
            self.publisher.pin(device)
            self._vanished.pop((key, b.pool, b.device), None)
        elif self.publisher.was_slot(b.pool, b.device):
            since = self._vanished.setdefault((key, b.pool, b.device), self.wall())
            vanished_for = self.wall() - since
        resource = self.resources.get("", resource_name(device)) if device else None
        if resource is not None and not mine(resource, self.driver_label):
            resource = None  # another deployment's: its device ids are not ours
        d = decide.decide_bind(
            b,
            device=device,
            inventory_known=self.publisher.inventory is not None,
            resource=resource,
            room_on_node=self._room_on(b.node),
            now=self.wall(),
            deadline=self.deadline,
            unhealthy=self._unhealthy_behind(device, resource),
            slot_vanished_for=vanished_for,
        )
        if d.step != decide.BindStep.WAIT:
            self._vanished.pop((key, b.pool, b.device), None)
        if d.step == decide.BindStep.WAIT:
            self.queue.enqueue_after(key, d.after)
        elif d.step == decide.BindStep.CREATE:
            assert device is not None
            await self._create_resource(claim, device, b.node, decide.claim_ref(b))
            self.queue.enqueue_after(key, d.after)  # the deadline check
        elif d.step == decide.BindStep.READY:
            assert device is not None
            await self._ready(claim, b, device)
        else:
            await self._fail(claim, b, device, d)

    async def _create_resource(self, claim: Obj, device: str, node: str, ref: str) -> None:
        dev = self.publisher.device(device)
        name = resource_name(device)
        body = {
            "apiVersion": f"{crds.GROUP}/{crds.VERSION}",
            "kind": "ComposableResource",
            "metadata": {
                "name": name,
                "annotations": {CLAIM_ANNOTATION: ref},
                "labels": {
                    poolmodel.FABRIC_LABEL: poolmodel.fabric_label(dev.fabric if dev else ""),
                    DRIVER_LABEL: self.driver_label,
                },
                # born with the composer's finalizer: one write (and one event round trip) less
                "finalizers": [crds.FINALIZER],
            },
            "spec": {
                "type": "gpu",
                "model": dev.model if dev else "",
                "target_node": node,
                "fabric_device": device,
            },
        }
        try:
            await self.kube.create(RESOURCES, body)
        except errors.KubeAlreadyExists:
            return
        if self.resources.get("", name) is None:
            self._created[name] = node  # counted against the node's maximum until we see it
        metrics.DECISIONS.labels("attach-requested").inc()
        logger.info(
            "claim %s: attach of %s to %s requested (%s)",
            ref,
            device,
            node,
            name,
            extra=logs.fields(
                decision="attach-requested",
                claim=ref,
                pod=_pods(claim),
                resource=name,
                device=device,
                model=dev.model if dev else "",
                node=node,
                fabric=dev.fabric if dev else "",
            ),
        )

    async def _ready(self, claim: Obj, b: claimmodel.Binding, device: str) -> None:
        if await self._set_condition(
            b, poolmodel.READY, "Attached", f"{device} is attached and ready on {b.node}"
        ):
            self.publisher.unpin(device)
            metrics.DECISIONS.labels("ready").inc()
            took = max(0.0, self.wall() - b.allocated_at) if b.allocated_at else None
            if took is not None:
                metrics.READY_SECONDS.observe(took)
            logger.info(
                "claim %s/%s: %s ready on %s (FabricDeviceReady=True)",
                b.namespace,
                b.claim,
                device,
                b.node,
                extra=logs.fields(
                    decision="ready",
                    claim=f"{b.namespace}/{b.claim}",
                    pod=_pods(claim),
                    device=device,
                    node=b.node,
                    duration=took,
                ),
            )
            self.recorder.emit(
                claim, "DeviceReady", f"{device} ready on {b.node}: FabricDeviceReady=True"
            )

    async def _fail(
        self, claim: Obj, b: claimmodel.Binding, device: str | None, d: decide.BindDecision
    ) -> None:
        metrics.FAILURES.labels(d.reason).inc()
        logger.warning(
            "claim %s/%s: %s: %s",
            b.namespace,
            b.claim,
            d.reason,
            d.message,
            extra=logs.fields(
                decision="failed",
                claim=f"{b.namespace}/{b.claim}",
                pod=_pods(claim),
                device=device,
                node=b.node,
                reason=d.reason,
            ),
        )
        if device:
            self.publisher.unpin(device)
            self.publisher.withhold(device, reason="failed")
        if not await self._set_condition(b, poolmodel.FAILED, d.reason, d.message):
            return  # the allocation is gone already
        self.recorder.emit(claim, d.reason, d.message + "; FabricDeviceFailed=True", warning=True)
        if d.delete_resource and device:
            with contextlib.suppress(errors.KubeNotFound):
                await self.kube.delete(f"{RESOURCES}/{resource_name(device)}")

    async def _set_condition(
        self, b: claimmodel.Binding, ctype: str, reason: str, message: str
    ) -> bool:
        return await set_claim_condition(
            self.kube,
            self.claims,
            b,
            driver=self.driver,
            ctype=ctype,
            reason=reason,
            message=message,
            wall=self.wall,
        )

    # --- claims holding a device that is not on their node ---------------------------------------

    async def _check_held(self, key: ClaimKey, claim: Obj) -> None:
        inventory = self.publisher.view
        if inventory is None:
            return
        by_device: dict[str, Obj] = {}
        for o in self.resources.store.values():
            for dev in devices_of(o):
                by_device[dev] = o
        found = decide.stranded(
            claim,
            driver=self.driver,
            device_of=self.publisher.device_index(),
            inventory=inventory,
            machine_of_node={n: m for m, n in self.publisher.node_of_machine().items()},
            resources=by_device,
        )
        for s in found:
            if resource_name(s.device) in self._created:
                continue
            if self.nodes.get("", s.node) is None:
                continue  # its Node is gone: nothing can use the device there (no re-attach)
            if s.elsewhere:
                if (key, s.device) not in self._warned:
                    self._warned.add((key, s.device))
                    self.recorder.emit(
                        claim,
                        "DeviceOnOtherNode",
                        f"this claim holds {s.device} on {s.node}, but the fabric has it "
                        "attached to another machine; the pod cannot start there",
                        warning=True,
                    )
                continue
            logger.warning(
                "claim %s/%s holds %s on %s, which is not attached there: attaching it again",
                *key,
                s.device,
                s.node,
                extra=logs.fields(
                    decision="reattach", claim=f"{key[0]}/{key[1]}", device=s.device, node=s.node
                ),
            )
            metrics.DECISIONS.labels("reattach").inc()
            self.recorder.emit(
                claim,
                "Reattach",
                f"{s.device} is not attached to {s.node} although this claim holds it: "
                "attaching it again",
                warning=True,
            )
            await self._create_resource(claim, s.device, s.node, f"{key[0]}/{key[1]}")

    # --- orphans: attached GPUs no resource owns -------------------------------------------------

    def _owned(self) -> set[str]:
        owned = {d for o in self.resources.store.values() for d in devices_of(o)}
        return owned

    def _on_inventory(self, inventory: Inventory | None) -> None:
        if inventory is None or not self.resources.synced.is_set():
            return
        found = set(decide.orphans(inventory, self._owned()))
        now = self.mono()
        for device in found:
            if device not in self._orphan_since:
                self._orphan_since[device] = now
                self.orphans.enqueue_after(device, self.orphan_grace)
        for device in set(self._orphan_since) - found:
            del self._orphan_since[device]

    async def _check_orphan(self, device: str) -> None:
        """A device attached with no resource for `orphan_grace` (long past any write in flight)
        is adopted: a ComposableResource is made for it on its machine's node, and from then on
        it is scaled down like any idle device (after the idle grace, if no claim holds it)."""
        inventory = self.publisher.inventory
        since = self._orphan_since.get(device)
        if (
            inventory is None
            or since is None
            or resource_name(device) in self._created
            or device not in decide.orphans(inventory, self._owned())
        ):
            self._orphan_since.pop(device, None)
            return
        waited = self.mono() - since
        if waited < self.orphan_grace:
            self.orphans.enqueue_after(device, self.orphan_grace - waited)
            return
        dev = inventory.device(device)
        node = self.publisher.node_of_machine().get(str(dev.machine)) if dev else None
        if dev is None or node is None:
            logger.warning(
                "%s is attached to machine %s, which is no node of this cluster: left alone",
                device,
                dev.machine if dev else "?",
            )
            return
        name = resource_name(device)
        body = {
            "apiVersion": f"{crds.GROUP}/{crds.VERSION}",
            "kind": "ComposableResource",
            "metadata": {
                "name": name,
                "annotations": {ADOPTED_ANNOTATION: "orphan"},
                "labels": {
                    poolmodel.FABRIC_LABEL: poolmodel.fabric_label(dev.fabric),
                    DRIVER_LABEL: self.driver_label,
                },
                "finalizers": [crds.FINALIZER],
            },
            "spec": {
                "type": "gpu",
                "model": dev.model,
                "target_node": node,
                "fabric_device": device,
            },
        }
        try:
            created = await self.kube.create(RESOURCES, body)
        except errors.KubeAlreadyExists:
            return
        self._orphan_since.pop(device, None)
        self._created[name] = node
        self.last_used[device] = self.mono()  # a full idle grace from now
        self.idle.enqueue_after(device, self.idle_grace)
        message = (
            f"{device} was attached to {node} with no ComposableResource owning it (attached "
            f"outside the agent, or an answer was lost) for {waited:.0f} s: adopted; it is "
            f"detached after {self.idle_grace:.0f} s if no claim takes it"
        )
        logger.warning(
            message,
            extra=logs.fields(decision="orphan-adopted", resource=name, device=device, node=node),
        )
        metrics.DECISIONS.labels("orphan-adopted").inc()
        self.recorder.emit(created, "OrphanAdopted", message, warning=True)

    # --- limits ----------------------------------------------------------------------------------

    def _on_node(self, node: str) -> int:
        live = {
            o["metadata"]["name"]
            for o in self.resources.store.values()
            if target_node(o) == node and not deleting(o)
        }
        return len(live | {n for n, target in self._created.items() if target == node})

    def _room_on(self, node: str) -> bool:
        cap = decide.node_limit(self.nodes.get("", node), MAX_LABEL)
        return cap is None or self._on_node(node) < cap

    async def _sync_full_label(self, node: str) -> None:
        obj = self.nodes.get("", node)
        value = decide.full_label(obj, self._on_node(node), poolmodel.FULL_LABEL)
        if value is False:
            return
        await self.kube.patch(
            f"{NODES}/{node}", {"metadata": {"labels": {poolmodel.FULL_LABEL: value}}}
        )
        logger.info(
            "node %s: %s=%s", node, poolmodel.FULL_LABEL, value, extra=logs.fields(node=node)
        )

    # --- node-local pools: idle attached GPUs where the scheduler takes them first ----------------

    async def _check_move(self, device: str) -> None:
        """Move an idle attached GPU from the fabric pool to its node's pool. Its identity changes
        (the pool is part of it), so the move is a scale-down's first three steps: unpublished,
        written, left to settle (a claim naming it aborts), a fresh LIST shows no claim holds the
        old identity — only then is it offered under the new one. At no instant are both
        identities offered, and a claim never holds one while the other is offered."""
        view = self.publisher.view  # as published: a GPU behind a slot moves as its slot
        dev = view.device(device) if view is not None else None
        machine_node = self.publisher.node_of_machine()
        attached_on = (
            machine_node.get(dev.machine or "")
            if dev is not None and dev.state == DeviceState.ATTACHED
            else None
        )
        held = self._held_devices()
        cr = self._resource_of(device)
        step = decide.decide_move(
            attached_on=attached_on,
            placed_on=self.publisher.placed_on(device),
            held=device in held,
            busy=device in self._draining or device in self.publisher.withheld,
            owned=cr is not None and not deleting(cr) and state(cr) == "Online",
        )
        if step != decide.MoveStep.MOVE:
            return
        assert attached_on is not None
        abort = self._draining[device] = asyncio.Event()
        placed = False
        self.publisher.withhold(device, reason="moving")
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT):
                await self.publisher.flush()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settle):
                    await abort.wait()
            if abort.is_set():
                return
            if device in self._held_devices(await self.fresh.since(self.mono())):
                return
            self.publisher.place(device, attached_on)
            placed = True
            metrics.DECISIONS.labels("node-pool").inc()
            logger.info(
                "%s offered from %s's own pool",
                device,
                attached_on,
                extra=logs.fields(decision="node-pool", device=device, node=attached_on),
            )
        finally:
            self._draining.pop(device, None)
            self.publisher.release(device, reason="moving")
            if not placed:
                self.moves.enqueue_after(device, self.settle)  # look again later

    # --- warm capacity ---------------------------------------------------------------------------

    def _warm_nodes_changed(self, nodes: set[str] | None = None) -> None:
        """Look at warm capacity again on `nodes` (a claim there took or gave back a GPU), or on
        every node wired to a fabric; nothing when warm capacity is off everywhere."""
        if not (self.warm or self._warm_labelled):
            return
        for node in self.publisher.node_of_machine().values() if nodes is None else nodes:
            self.warmth.enqueue(node)

    async def _keep_warm(self, node: str) -> None:
        """Keep `warm` idle GPUs of each model attached on `node`: model-only resources
        (annotated warm) that the composer attaches and offers from the node's own pool."""
        warm = self._warm_for(node)
        inventory = self.publisher.inventory
        machine = self.publisher.machine_of_node(node)
        if not warm or inventory is None or machine is None:
            return
        fabric = next((m.fabric for m in inventory.machines if m.id == machine), None)
        models = sorted({d.model for d in inventory.devices if d.fabric == fabric and d.model})
        held = self._held_devices()
        taken = composemodel.taken_devices(
            self.resources.store.values(),
            also=set(self.publisher.pinned) | set(self.publisher.withheld),
        )
        for model in models:
            coming = [
                o
                for o in self.resources.store.values()
                if (o["metadata"].get("annotations") or {}).get(WARM_ANNOTATION)
                and target_node(o) == node
                and spec_model(o) == model
                and not deleting(o)
                and state(o) in ("", "Attaching")
            ]
            pending = [n for n, t in self._created.items() if t == node and n.startswith("warm-")]
            free = composemodel.free_count(inventory, model=model, machine=machine, taken=taken)
            need = decide.warm_shortfall(
                warm=warm,
                idle=len(self._idle_alike(node, model, held)),
                coming=len(coming) + len(pending),
                free=free,
            )
            for _ in range(need):
                await self._create_warm(node, model)

    async def _create_warm(self, node: str, model: str) -> None:
        body = {
            "apiVersion": f"{crds.GROUP}/{crds.VERSION}",
            "kind": "ComposableResource",
            "metadata": {
                "generateName": names.dns_subdomain(f"warm-{node}-{model}", limit=240) + "-",
                "annotations": {WARM_ANNOTATION: "true"},
                "labels": {DRIVER_LABEL: self.driver_label},
                "finalizers": [crds.FINALIZER],
            },
            "spec": {"type": "gpu", "model": model, "target_node": node},
        }
        created = await self.kube.create(RESOURCES, body)
        name = created["metadata"]["name"]
        if self.resources.get("", name) is None:
            self._created[name] = node
        metrics.DECISIONS.labels("warm").inc()
        logger.info(
            "warm capacity: attaching a %s to %s (%s)",
            model,
            node,
            name,
            extra=logs.fields(decision="warm", resource=name, model=model, node=node),
        )

    # --- scale down ------------------------------------------------------------------------------

    def _held_devices(self, claims: list[Obj] | None = None) -> set[str]:
        return decide.held_devices(
            self.claims.store.values() if claims is None else claims,
            self.driver,
            self.publisher.device_index(),
        )

    def _resource_of(self, device: str) -> Obj | None:
        """The live resource that owns `device` (by the name it was made under, or any that
        names it: model-only, warm, adopted)."""
        cr = self.resources.get("", resource_name(device))
        if cr is not None and mine(cr, self.driver_label):
            return cr
        named = [
            o
            for o in self.resources.store.values()
            if device in devices_of(o) and mine(o, self.driver_label)
        ]
        return composemodel.owner_of(device, named)

    def _idle_alike(self, node: str, model: str, held: set[str]) -> list[str]:
        """Attached devices of `model` on `node` owned by a live Online resource, held by no
        claim, not kept by a request: the node's idle capacity of that model."""
        out = []
        for o in self.resources.store.values():
            dev = attached_device(o)
            if (
                target_node(o) == node
                and spec_model(o) == model
                and state(o) == "Online"
                and not deleting(o)
                and requestmodel.owner_of(o) is None
                and dev not in held
                and fabric_device(o) not in held
            ):
                out.append(dev)
        return out

    def _warm_for(self, node: str) -> int:
        label = decide.node_limit(self.nodes.get("", node), WARM_LABEL)
        return self.warm if label is None else label

    async def check_idle(self, device: str) -> None:
        cr = self._resource_of(device)
        node = target_node(cr) if cr else ""
        held = self._held_devices()
        model = spec_model(cr) if cr else ""
        d = decide.decide_idle(
            cr,
            held=device in held or (cr is not None and fabric_device(cr) in held),
            request_owned=cr is not None and requestmodel.owner_of(cr) is not None,
            idle_since=self.last_used.get(device),
            now=self.mono(),
            grace=self.idle_grace,
            on_node=self._on_node(node) if node else 0,
            floor=decide.node_limit(self.nodes.get("", node), MIN_LABEL) or 0,
            idle_alike=len(self._idle_alike(node, model, held)) if node else 0,
            warm=self._warm_for(node) if node else 0,
        )
        if d.step == decide.IdleStep.LATER:
            self.idle.enqueue_after(device, d.after)
        elif d.step == decide.IdleStep.DRAIN:
            assert cr is not None
            await self._drain(device, cr, d.idle_for)

    async def _drain(self, device: str, cr: Obj, idle_for: float, *, unhealthy: str = "") -> None:
        """Scale-down's steps (see the module docstring); `unhealthy`: the reason the GPU is
        swapped out rather than idle."""
        node = target_node(cr)
        if device in self._draining:
            # a move or another drain of it is settling: look again
            (self.sick if unhealthy else self.idle).enqueue_after(device, self.settle)
            return
        abort = self._draining[device] = asyncio.Event()
        deleted = False
        self.publisher.withhold(device, reason="scale-down")
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT):
                await self.publisher.flush()  # (1) the slices no longer offer it
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settle):
                    await abort.wait()  # (2) a claim named it while the scheduler caught up
            if abort.is_set():
                return
            started = self.mono()
            fresh = await self.fresh.since(started)
            if device in self._held_devices(fresh) or fabric_device(cr) in self._held_devices(
                fresh
            ):  # (3) the API server says it is taken
                return
            if unhealthy:
                message = (
                    f"{device} on {node} is unhealthy ({unhealthy}) and no claim holds it: "
                    "detaching it; it stays out of the free pool until it is healthy again"
                )
                kind, reason = "unhealthy-detach", "UnhealthyDetach"
            else:
                message = f"{device} idle for {idle_for:.0f} s on {node}: detaching"
                kind, reason = "scale-down", "ScaleDown"
            logger.info(
                "%s: %s",
                kind,
                message,
                extra=logs.fields(
                    decision=kind,
                    resource=cr["metadata"]["name"],
                    device=device,
                    node=node,
                    reason=unhealthy or None,
                ),
            )
            metrics.DECISIONS.labels(kind).inc()
            self.recorder.emit(cr, reason, message, warning=bool(unhealthy))
            with contextlib.suppress(errors.KubeNotFound):
                await self.kube.delete(f"{RESOURCES}/{cr['metadata']['name']}")  # (4)
            deleted = True
        finally:
            self._draining.pop(device, None)
            if not deleted:
                self.publisher.release(device, reason="scale-down")

    # --- device health: taints and the swap ------------------------------------------------------

    def unhealthy_reason(self, device: str) -> str:
        """Why `device` is unhealthy now ("" when it is healthy or recovering)."""
        h = self.health.get(device)
        return h.reason if h is not None and not h.recovering else ""

    def _unhealthy_behind(self, device: str | None, resource: Obj | None) -> str:
        """Why the GPU a claim's device names is unhealthy: the device itself, or the GPU that
        arrived through it (a slot's resource records it)."""
        if not device:
            return ""
        gpu = attached_device(resource) if resource is not None else device
        return self.unhealthy_reason(device) or self.unhealthy_reason(gpu)

    def _on_node_health(self, event: Event) -> None:
        """A resource's `DeviceHealthy` condition (the node's word on its GPU) changed."""
        if event.type == "DELETED" or not mine(event.obj, self.driver_label):
            return
        word = healthmodel.node_word(event.obj)
        device = healthmodel.spoken_for(event.obj)
        last = self._node_words.get(device)
        if word is None and last is not None and not last.healthy:
            # the GPU on another node (attached again): that node's silence is its word
            said_by = self._node_word_from.get(device, "")
            word = healthmodel.fresh_node_word(event.obj, said_by=said_by)
        if word is None or not device or last == word:
            return
        self._node_words[device] = word
        self._node_word_from[device] = str(event.obj["metadata"].get("uid") or "")
        if not word.healthy and not self.publisher.synced.is_set() and device not in self.health:
            # before a new leader's first write: tainted in it (the health queue runs later)
            self.health[device] = healthmodel.Health(
                healthmodel.Source.NODE, word.reason, word.message, added=self.wall()
            )
            self.publisher.set_taints(
                device, healthmodel.taints(self.health[device], evict=self.health_evict)
            )
        self.sick.enqueue(device)

    def _on_fabric_health(self, inventory: Inventory | None) -> None:
        """The fabric's word on each device, from every inventory read."""
        if inventory is None:
            return
        sick: dict[str, healthmodel.Word] = {}
        for dev in inventory.devices:
            word = healthmodel.fabric_word(dev)
            if word is not None and not word.healthy:
                sick[str(dev.id)] = word
        for device in set(sick) | set(self._fabric_words):
            if sick.get(device) != self._fabric_words.get(device):
                self.sick.enqueue(device)
        self._fabric_words = sick

    def _recover_taint(self, event: Event) -> None:
        """A new leader reads its predecessor's taints before its first write: a GPU a node
        found broken and that was detached has no node to say so again."""
        if self.publisher.synced.is_set() or event.type == "DELETED":
            return
        spec = event.obj.get("spec") or {}
        if spec.get("driver") != self.driver:
            return
        for entry in spec.get("devices") or []:
            raw = (entry.get("attributes") or {}).get(poolmodel.DEVICE_ID_ATTRIBUTE) or {}
            device = str(raw.get("string") or "")
            for taint in entry.get("taints") or []:
                word = healthmodel.recovered_word(taint)
                if device and word is not None and device not in self._node_words:
                    self._node_words[device] = word
                    self.health[device] = healthmodel.Health(
                        healthmodel.Source.NODE,
                        word.reason,
                        word.message,
                        added=_epoch(str(taint.get("timeAdded") or "")) or self.wall(),
                    )
                    self.publisher.set_taints(
                        device, healthmodel.taints(self.health[device], evict=self.health_evict)
                    )

    async def _check_health(self, device: str) -> None:
        """Recompute one device's health; publish its taint; swap it out if no claim holds it."""
        inventory = self.publisher.inventory
        dev = inventory.device(device) if inventory is not None else None
        words = {
            healthmodel.Source.NODE: self._node_words.get(device),
            healthmodel.Source.FABRIC: healthmodel.fabric_word(dev),
        }
        prev = self.health.get(device)
        now = self.mono()
        h = healthmodel.step(prev, words, now=now, wall=self.wall(), grace=self.health_grace)
        if h is None:
            self.health.pop(device, None)
            if self._node_words.get(device) == healthmodel.Word(True):
                del self._node_words[device]  # nothing to remember
        else:
            self.health[device] = h
        cr = self._resource_of(device)
        if not await self._keep_word(device, cr):
            self.sick.enqueue_after(device, KEEP_RETRY)
            if h is None:
                return  # the taint lifts only once the kept word is gone
        self._publish_health(device, prev, h, cr)
        if h is not None and prev is None:
            # a claim still waiting for it fails (DeviceUnhealthy), under whichever identity it
            # holds the GPU (a slot: the GPU behind it)
            for identity in {device} | ({fabric_device(cr)} if cr is not None else set()):
                for key in self._holders(identity):
                    self.queue.enqueue(key)
        wait = healthmodel.lifts_in(h, now=now, grace=self.health_grace)
        if wait is not None:
            self.sick.enqueue_after(device, wait)
        held = self._held_devices()
        step = healthmodel.decide_swap(
            h is not None and not h.recovering,
            resource=cr,
            held=device in held or (cr is not None and fabric_device(cr) in held),
        )
        if step == healthmodel.SwapStep.DETACH:
            assert cr is not None
            assert h is not None
            await self._drain(device, cr, 0.0, unhealthy=h.reason)

    async def _keep_word(self, device: str, cr: Obj | None) -> bool:
        """Keep the node's unhealthy word on a GPU as an annotation on the Node that said it
        (`healthmodel.kept_key`), and drop it once the node's word is no longer unhealthy. The
        slices cannot keep it everywhere: a GPU being swapped out is withheld, then detaching,
        so it is in no slice, and its resource is gone; a leader dying then left its successor
        nothing, and the broken GPU was offered untainted. False when a needed write failed for
        now (a transient error, logged: the caller looks again later and lifts no taint
        meanwhile); one refused for good (403, 422) is logged and given up, so that a refusal
        never holds a taint forever."""
        word = self._node_words.get(device)
        sick = word is not None and not word.healthy
        kept = self._kept_on.get(device)
        key = healthmodel.kept_key(self.driver_label, device)
        h = self.health.get(device)
        if sick and kept is None and h is not None and cr is not None and target_node(cr):
            assert word is not None
            node, value = (
                target_node(cr),
                healthmodel.kept_value(self.driver_label, device, word, h.added),
            )
        elif not sick and kept is not None:
            node, value = kept, None
        else:
            return True
        try:
            await self.kube.patch(f"{NODES}/{node}", {"metadata": {"annotations": {key: value}}})
        except errors.KubeNotFound:
            pass  # the Node is gone: nothing to keep it on, nothing to undo
        except errors.AgentError as exc:
            logger.warning(
                "%s: cannot %s the node's word on Node %s%s: %s",
                device,
                "keep" if value is not None else "remove",
                node,
                "" if exc.transient else " (given up)",
                exc,
            )
            if exc.transient:
                return False
        if value is None:
            self._kept_on.pop(device, None)
        else:
            self._kept_on[device] = node
        return True

    def _recover_kept_word(self, event: Event) -> None:
        """A new leader reads the node-reported words its predecessor kept on the Nodes before
        its first write (the publisher waits for the Nodes): a GPU swapped out meanwhile has
        no resource and no slice entry to say it."""
        if self.publisher.synced.is_set() or event.type == "DELETED":
            return
        node = event.obj["metadata"]["name"]
        for key, value in (event.obj["metadata"].get("annotations") or {}).items():
            kept = healthmodel.kept_word(key, str(value), driver_label=self.driver_label)
            if kept is None:
                continue
            device, word, stamp = kept
            self._kept_on[device] = node
            if device in self._node_words:
                continue
            self._node_words[device] = word
            self._node_word_from[device] = ""
            self.health[device] = healthmodel.Health(
                healthmodel.Source.NODE,
                word.reason,
                word.message,
                added=_epoch(stamp) or self.wall(),
            )
            self.publisher.set_taints(
                device, healthmodel.taints(self.health[device], evict=self.health_evict)
            )

    def _publish_health(
        self,
        device: str,
        prev: healthmodel.Health | None,
        h: healthmodel.Health | None,
        cr: Obj | None,
    ) -> None:
        """The taint in the slices, the metrics, a log line and an Event for a change."""
        before = bool(self.publisher.taints.get(device))
        taints = healthmodel.taints(h, evict=self.health_evict)
        self.publisher.set_taints(device, taints)
        metrics.unhealthy_devices(
            (str(x.source), x.reason) for x in self.health.values() if not x.recovering
        )
        node = target_node(cr) if cr is not None else ""
        if taints and not before:
            assert h is not None
            metrics.TAINTS.labels("added").inc()
            message = (
                f"{device} is unhealthy ({_why(h)}, said by the {h.source}): "
                f"tainted {healthmodel.TAINT_KEY}={taints[0]['value']}:{taints[0]['effect']}"
            )
            logger.warning(
                message,
                extra=logs.fields(
                    decision="tainted", device=device, node=node or None, reason=h.reason
                ),
            )
            if cr is not None:
                self.recorder.emit(cr, "DeviceUnhealthy", message, warning=True)
        elif before and not taints:
            metrics.TAINTS.labels("removed").inc()
            message = (
                f"{device} has been healthy for {self.health_grace:.0f} s: its "
                f"{healthmodel.TAINT_KEY} taint is lifted"
            )
            logger.info(message, extra=logs.fields(decision="untainted", device=device))
            if cr is not None:
                self.recorder.emit(cr, "DeviceHealthy", message)
        elif h is not None and prev is not None and h.reason != prev.reason and cr is not None:
            self.recorder.emit(
                cr,
                "DeviceUnhealthy",
                f"{device} is unhealthy ({_why(h)})",
                warning=True,
            )


#: Seconds before a device whose kept word could not be written or removed is looked at again.
KEEP_RETRY = 5.0


def _why(h: healthmodel.Health) -> str:
    """`<reason>: <message>`, or the reason alone when there is no message."""
    return f"{h.reason}: {h.message}" if h.message else h.reason


def _epoch(stamp: str) -> float:
    """An RFC 3339 time (`2026-01-02T03:04:05Z`) as epoch seconds; 0 when absent or malformed."""
    try:
        return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _pods(claim: Obj) -> str:
    """The pods a claim is reserved for (`status.reservedFor`), comma-separated, for logs."""
    return ",".join(
        str(r.get("name"))
        for r in (claim.get("status") or {}).get("reservedFor") or []
        if r.get("resource") == "pods" and r.get("name")
    )


__all__ = ["MAX_LABEL", "MIN_LABEL", "Scaler", "claims_path"]


async def set_claim_condition(
    kube: Kube,
    claims: Informer,
    b: claimmodel.Binding,
    *,
    driver: str,
    ctype: str,
    reason: str,
    message: str,
    wall: Callable[[], float],
    unless: Callable[[Obj], bool] | None = None,
    missing_ok: bool = False,
) -> bool:
    """`ctype`=True in exactly the (driver, pool, device) entry of `b`'s claim: read-modify-write
    on the resourceVersion, the first read from the informer (usually current: saves a GET),
    after a conflict a fresh GET. False when the claim was replaced (another uid), the
    allocation is gone, `unless(claim)` holds, or (with `missing_ok`) the claim is gone. Raises
    `KubeConflict` after 8 conflicts in a row, `KubeNotFound` for a missing claim otherwise."""
    path = f"{claims_path(b.namespace)}/{b.claim}"
    for attempt in range(8):
        cached = claims.get(b.namespace, b.claim) if attempt == 0 else None
        try:
            claim = cached if cached is not None else await kube.get(path)
        except errors.KubeNotFound:
            if missing_ok:
                return False
            raise
        if claim["metadata"].get("uid") != b.uid or (unless is not None and unless(claim)):
            return False
        updated = claimmodel.with_condition(
            claim,
            driver=driver,
            pool=b.pool,
            device=b.device,
            ctype=ctype,
            reason=reason,
            message=message,
            now=wall(),
        )
        if updated is None:
            return False  # deallocated meanwhile
        try:
            await kube.replace(f"{path}/status", updated)
            return True
        except errors.KubeConflict:
            continue
    raise errors.KubeConflict(f"claim {b.namespace}/{b.claim}: status kept changing under us")
