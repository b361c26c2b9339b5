"""The scaler (CoHDI's Dynamic Device Scaler, event-driven and on the happy path).

Scale up: a claim allocated to one of our pool devices whose binding conditions are unmet → the
node from `allocation.nodeSelector` → the device pinned in the slices → a ComposableResource for
(device, node) → when the node reports `NodeReady` → `FabricDeviceReady=True` in the claim's
`status.devices[]` entry for exactly that (driver, pool, device), written read-modify-write on the
resourceVersion (other drivers' entries untouched). The scheduler then binds in the same cycle.

Failure: the resource failed, or the claim's deadline (well before the scheduler's binding timeout)
passed → `FabricDeviceFailed=True`, the device withheld from the slices, the resource deleted (the
composer detaches whatever was half-attached). The scheduler deallocates and tries another device.

Scale down: an attached device no claim holds, for longer than the idle grace, on a node above its
minimum, is withheld from the slices, re-checked against the claims, then its resource deleted (the
composer detaches it). Per-node maxima are enforced by labelling full nodes, which the free
devices' node selectors exclude, so a claim is never pinned to a node that cannot take it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Final

from agent import errors
from agent.controllers import metrics
from agent.controllers.publishing import NODES, Publisher
from agent.controllers.queueing import KeyedQueue
from agent.kube.client import Kube, Obj, path_of
from agent.kube.eventing import Recorder
from agent.kube.resources import (
    CLAIM_ANNOTATION,
    NODE_READY,
    RESOURCES,
    condition,
    deleting,
    resource_name,
    spec,
    state,
)
from agent.kube.watching import Event, Informer
from agent.manifests import crds
from agent.model import claims as claimmodel
from agent.model import pool as poolmodel

logger = logging.getLogger(__name__)

MAX_LABEL: Final = "cohdi.io/max-devices"
MIN_LABEL: Final = "cohdi.io/min-devices"

ClaimKey = tuple[str, str]


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
        workers: int = 64,
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
        self.queue: KeyedQueue[ClaimKey] = KeyedQueue("scaler", self.handle, workers=workers)
        self.idle: KeyedQueue[str] = KeyedQueue("scale-down", self.check_idle, workers=8)
        #: device id -> monotonic time it was last held by a claim
        self.last_used: dict[str, float] = {}
        self._held: dict[ClaimKey, set[tuple[str, str]]] = {}
        claims.add_handler(self._on_claim)
        resources.add_handler(self._on_resource)

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
        for pool, name in before - now_held:  # released: start the idle clock
            device = self.publisher.device_id_of(pool, name)
            if device:
                self.last_used[device] = time.monotonic()
                self.idle.enqueue_after(device, self.idle_grace)
        for pool, name in now_held:
            device = self.publisher.device_id_of(pool, name)
            if device:
                self.last_used[device] = time.monotonic()
        if now_held:
            self._held[key] = now_held
        else:
            self._held.pop(key, None)
        if event.type != "DELETED":
            self.queue.enqueue(key)

    def _on_resource(self, event: Event) -> None:
        obj = event.obj
        ref = (obj["metadata"].get("annotations") or {}).get(CLAIM_ANNOTATION, "")
        if "/" in ref:
            ns, name = ref.split("/", 1)
            self.queue.enqueue((ns, name))
        if event.type != "DELETED" and state(obj) == "Online" and not deleting(obj):
            device = (obj.get("status") or {}).get("cdi_device_id") or spec(obj).get(
                "fabric_device"
            )
            if device and not obj["metadata"].get("labels", {}).get(crds.MANAGED_BY):
                self.idle.enqueue_after(device, self.idle_grace)
        self._update_full_labels(spec(obj).get("target_node", ""))

    async def run(self) -> None:
        await self.claims.synced.wait()
        await self.resources.synced.wait()
        await self.publisher.synced.wait()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.queue.run())
            tg.create_task(self.idle.run())

    # --- scale up --------------------------------------------------------------------------------

    async def handle(self, key: ClaimKey) -> None:
        claim = self.claims.get(*key)
        if claim is None:
            return
        for b in claimmodel.bindings(claim, self.driver):
            if b.ready or b.failed:
                continue
            await self._bind(claim, b)

    async def _bind(self, claim: Obj, b: claimmodel.Binding) -> None:
        device = self.publisher.device_id_of(b.pool, b.device)
        if device is None:
            if self.publisher.inventory is None:
                self.queue.enqueue_after(
                    (b.namespace, b.claim), 0.2
                )  # not synced with the fabric yet
                return
            await self._fail(
                claim,
                b,
                None,
                "UnknownDevice",
                f"device {b.pool}/{b.device} is not in the fabric's inventory any more",
            )
            return
        self.publisher.pin(device)
        name = resource_name(device)
        cr = self.resources.get("", name)
        remaining = (
            b.allocated_at + self.deadline - time.time() if b.allocated_at else self.deadline
        )
        if cr is not None and deleting(cr):
            self.queue.enqueue_after((b.namespace, b.claim), 0.2)
            return
        if cr is not None and spec(cr).get("target_node") != b.node:
            await self._fail(
                claim,
                b,
                device,
                "DeviceOnOtherNode",
                f"{device} is composed to {spec(cr).get('target_node')}, not {b.node}",
            )
            return
        if cr is not None and state(cr) == "Failed":
            st = cr.get("status") or {}
            await self._fail(
                claim,
                b,
                device,
                st.get("reason") or "AttachFailed",
                st.get("message") or "the fabric could not attach the device",
                cr=cr,
            )
            return
        if cr is not None and state(cr) == "Online" and condition(cr, NODE_READY):
            await self._ready(claim, b, device)
            return
        if remaining <= 0:
            await self._fail(
                claim,
                b,
                device,
                "AttachDeadline",
                f"{device} was not ready on {b.node} within {self.deadline:.0f} s of allocation",
                cr=cr,
            )
            return
        if cr is None:
            if not self._room_on(b.node):
                await self._fail(
                    claim, b, device, "NodeDeviceLimit", f"node {b.node} is at its device maximum"
                )
                return
            await self._create_resource(claim, b, device, name)
        self.queue.enqueue_after((b.namespace, b.claim), remaining)  # the deadline check

    async def _create_resource(
        self, claim: Obj, b: claimmodel.Binding, device: str, name: str
    ) -> None:
        dev = self.publisher.device(device)
        body = {
            "apiVersion": f"{crds.GROUP}/{crds.VERSION}",
            "kind": "ComposableResource",
            "metadata": {
                "name": name,
                "annotations": {CLAIM_ANNOTATION: f"{b.namespace}/{b.claim}"},
                "labels": {
                    poolmodel.FABRIC_LABEL: poolmodel.fabric_label(dev.fabric if dev else b.pool)
                },
                # born with the composer's finalizer: one write (and one event round trip) less
                "finalizers": [crds.FINALIZER],
            },
            "spec": {
                "type": "gpu",
                "model": dev.model if dev else "",
                "target_node": b.node,
                "fabric_device": device,
            },
        }
        try:
            created = await self.kube.create(RESOURCES, body)
        except errors.KubeAlreadyExists:
            return
        self.resources.store[("", name)] = created
        metrics.DECISIONS.labels("attach-requested").inc()
        self.recorder.emit(
            claim, "AttachRequested", f"attaching {device} to {b.node} for this claim"
        )

    async def _ready(self, claim: Obj, b: claimmodel.Binding, device: str) -> None:
        if await self._set_condition(
            b, poolmodel.READY, "Attached", f"{device} is attached and ready on {b.node}"
        ):
            self.publisher.unpin(device)
            metrics.DECISIONS.labels("ready").inc()
            if b.allocated_at:
                metrics.READY_SECONDS.observe(max(0.0, time.time() - b.allocated_at))
            self.recorder.emit(
                claim, "DeviceReady", f"{device} ready on {b.node}: FabricDeviceReady=True"
            )

    async def _fail(
        self,
        claim: Obj,
        b: claimmodel.Binding,
        device: str | None,
        reason: str,
        message: str,
        *,
        cr: Obj | None = None,
    ) -> None:
        metrics.FAILURES.labels(reason).inc()
        logger.warning("claim %s/%s: %s: %s", b.namespace, b.claim, reason, message)
        if device:
            self.publisher.unpin(device)
            self.publisher.withhold(device)
        await self._set_condition(b, poolmodel.FAILED, reason, message)
        self.recorder.emit(claim, reason, message + "; FabricDeviceFailed=True", warning=True)
        if cr is not None or device is not None:
            with contextlib.suppress(errors.KubeNotFound):
                await self.kube.delete(f"{RESOURCES}/{resource_name(device or '')}")

    async def _set_condition(
        self, b: claimmodel.Binding, ctype: str, reason: str, message: str
    ) -> bool:
        path = f"{claims_path(b.namespace)}/{b.claim}"
        for attempt in range(8):
            # First from the informer (usually current: saves a GET); after a conflict, fresh.
            cached = self.claims.get(b.namespace, b.claim) if attempt == 0 else None
            claim = cached if cached is not None else await self.kube.get(path)
            if claim["metadata"].get("uid") != b.uid:
                return False
            updated = claimmodel.with_condition(
                claim,
                driver=self.driver,
                pool=b.pool,
                device=b.device,
                ctype=ctype,
                reason=reason,
                message=message,
            )
            if updated is None:
                return False  # deallocated meanwhile
            try:
                await self.kube.replace(f"{path}/status", updated)
                return True
            except errors.KubeConflict:
                continue
        raise errors.KubeConflict(f"claim {b.namespace}/{b.claim}: status kept changing under us")

    # --- limits ----------------------------------------------------------------------------------

    def _on_node(self, node: str) -> list[Obj]:
        return [
            o
            for o in self.resources.store.values()
            if spec(o).get("target_node") == node and not deleting(o)
        ]

    def _limit(self, node: str, label: str) -> int | None:
        obj = self.nodes.get("", node)
        raw = (obj or {}).get("metadata", {}).get("labels", {}).get(label)
        try:
            return int(raw) if raw is not None else None
        except ValueError:
            return None

    def _room_on(self, node: str) -> bool:
        cap = self._limit(node, MAX_LABEL)
        return cap is None or len(self._on_node(node)) < cap

    def _update_full_labels(self, node: str) -> None:
        if not node:
            return
        cap = self._limit(node, MAX_LABEL)
        full = cap is not None and len(self._on_node(node)) >= cap
        obj = self.nodes.get("", node)
        labelled = (obj or {}).get("metadata", {}).get("labels", {}).get(
            poolmodel.FULL_LABEL
        ) == "true"
        if obj is not None and full != labelled:
            asyncio.get_running_loop().create_task(self._label(node, "true" if full else None))

    async def _label(self, node: str, value: str | None) -> None:
        try:
            await self.kube.patch(
                f"{NODES}/{node}", {"metadata": {"labels": {poolmodel.FULL_LABEL: value}}}
            )
        except errors.AgentError as exc:
            logger.warning("could not label node %s: %s", node, exc)

    # --- scale down ------------------------------------------------------------------------------

    def _held_devices(self) -> set[str]:
        held = set()
        for claim in self.claims.store.values():
            for pool, name in claimmodel.allocated_devices(claim, self.driver):
                device = self.publisher.device_id_of(pool, name)
                if device:
                    held.add(device)
        return held

    async def check_idle(self, device: str) -> None:
        cr = self.resources.get("", resource_name(device))
        if cr is None or deleting(cr) or state(cr) != "Online":
            return
        if cr["metadata"].get("labels", {}).get(crds.MANAGED_BY):
            return  # kept by a ComposabilityRequest
        if device in self._held_devices():
            return
        idle_for = time.monotonic() - self.last_used.get(device, time.monotonic() - self.idle_grace)
        if idle_for < self.idle_grace:
            self.idle.enqueue_after(device, self.idle_grace - idle_for)
            return
        node = spec(cr).get("target_node", "")
        floor = self._limit(node, MIN_LABEL) or 0
        if len(self._on_node(node)) <= floor:
            return
        self.publisher.withhold(device)
        await self.publisher.flush()
        if device in self._held_devices():  # the scheduler took it while we decided
            self.publisher.release(device)
            return
        logger.info("scale-down: %s idle for %.0f s on %s", device, idle_for, node)
        metrics.DECISIONS.labels("scale-down").inc()
        self.recorder.emit(
            cr, "ScaleDown", f"{device} idle for {idle_for:.0f} s on {node}: detaching"
        )
        with contextlib.suppress(errors.KubeNotFound):
            await self.kube.delete(f"{RESOURCES}/{resource_name(device)}")
