"""Vendor-driver mode's controller (`--vendor-driver`): the hand-off from our attach to the vendor's
DRA driver, event-driven. The decisions are `agent.model.vendoring`'s.

The scaler and the composer attach the GPU for a claim as in our own mode; the scaler does not set
`FabricDeviceReady` (`VendorScaler`): our kubelet plugin does not run, the vendor's prepares the
GPU. This controller watches the vendor's node-local ResourceSlices (an informer on `spec.driver=
<vendor>`), our ComposableResources and the claims; the moment the attached GPU shows in the
vendor's slice of the claim's node (its `uuid` attribute equals the resource's
`status.device_id`), it sets `FabricDeviceReschedule=True` in the claim's entry for our device,
exactly once (the condition in the claim is the record, so a new leader does not write it again),
with a `Rescheduled` Event. The scheduler then drops the allocation and allocates again; within
the node it prefers devices without binding conditions, i.e. the vendor's.

CoHDI does the same by polling every 30-60 s and by restarting the vendor's plugin pod so that it
re-enumerates; here a watch event drives it, and the plugin is left alone (it must notice a
hot-plugged GPU by itself, or be restarted by its own operator).

It also tells the publisher which vendor devices are our GPUs (`Publisher.aliases`), so a claim
holding the vendor's device holds our GPU and scale-down never takes it.

A GPU attached for the claim's node that the vendor offers on another node (a Node mapped to the
wrong machine) is never handed over there; the claim waits for its deadline, and one Warning Event
`GPUOnOtherNode` on the claim names the node it showed on and points at the Nodes' providerIDs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from agent import logs
from agent.controllers import metrics
from agent.controllers.publishing import Publisher
from agent.controllers.queueing import KeyedQueue
from agent.controllers.scaling import Scaler, set_claim_condition
from agent.kube.client import Kube, Obj
from agent.kube.eventing import Recorder
from agent.kube.resources import CLAIM_ANNOTATION, resource_name
from agent.kube.watching import Event, Informer
from agent.model import claims as claimmodel
from agent.model import names
from agent.model import scaling as scalemodel
from agent.model import vendoring as decide
from agent.model.objects import mine

logger = logging.getLogger(__name__)

ClaimKey = tuple[str, str]


class VendorScaler(Scaler):
    """The scaler of vendor mode: everything as in our own mode (pin, ComposableResource,
    deadline, failure, scale-down) except that it never sets `FabricDeviceReady` — the claim is
    handed to the vendor's device by `Vendoring` instead. Its `driver` is the vendor's (the
    claims' results name it); `label_as` gives it our own `--driver`, whose label
    (`cohdi.io/driver`) our resources carry."""

    def label_as(self, driver: str) -> None:
        self.driver_label = names.label_value(driver)

    async def _ready(self, claim: Obj, b: claimmodel.Binding, device: str) -> None:
        """Attached and ready on the node: `Vendoring` hands the claim over once the vendor
        offers the GPU; here only the claim's deadline is kept (`decide.handed_over_or_late`)."""
        resource = self.resources.get("", resource_name(device))
        d = decide.handed_over_or_late(
            self.claims.get(b.namespace, b.claim) or claim,
            b,
            vendor=self.driver,
            device=device,
            made_for_claim=resource is not None
            and scalemodel.made_for(resource, scalemodel.claim_ref(b)),
            now=self.wall(),
            deadline=self.deadline,
        )
        if d.step == scalemodel.BindStep.FAIL:
            await self._fail(claim, b, device, d)
        elif d.after:
            self.queue.enqueue_after((b.namespace, b.claim), d.after)


class Vendoring:
    def __init__(
        self,
        kube: Kube,
        *,
        vendor: str,
        driver: str,
        claims: Informer,
        resources: Informer,
        vendor_slices: Informer,
        publisher: Publisher,
        recorder: Recorder,
        workers: int = 16,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.kube = kube
        self.vendor = vendor
        self.driver_label = names.label_value(driver)
        self.claims = claims
        self.resources = resources
        self.vendor_slices = vendor_slices
        self.publisher = publisher
        self.recorder = recorder
        self.wall = wall
        self.index: decide.VendorIndex = {}
        #: (claim uid, pool, device) this term set FabricDeviceReschedule on (until the informer
        #: shows it in the claim)
        self._done: set[tuple[str, str, str]] = set()
        #: claims with one of our pool devices waiting
        self._waiting: set[ClaimKey] = set()
        #: (claim uid, device, nodes) whose GPU was told to be on another node (once each)
        self._told_elsewhere: set[tuple[str, str, tuple[str, ...]]] = set()
        #: reschedules written (tests and the log read it)
        self.written = 0
        self.queue: KeyedQueue[ClaimKey] = KeyedQueue(
            "vendoring", metrics.timed("vendoring", self.handle), workers=workers
        )
        metrics.QUEUES.track(self.queue)
        claims.add_handler(self._on_claim)
        resources.add_handler(self._on_resource)
        vendor_slices.add_handler(self._on_slice)

    # --- events ----------------------------------------------------------------------------------

    def _on_claim(self, event: Event) -> None:
        meta = event.obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        if event.type == "DELETED" or not claimmodel.bindings(event.obj, self.vendor):
            self._waiting.discard(key)
            return
        self._waiting.add(key)
        self.queue.enqueue(key)

    def _on_resource(self, event: Event) -> None:
        ref = (event.obj["metadata"].get("annotations") or {}).get(CLAIM_ANNOTATION, "")
        if "/" in ref:
            ns, name = ref.split("/", 1)
            self.queue.enqueue((ns, name))
        self._refresh(slices=False)

    def _on_slice(self, _event: Event) -> None:
        self._refresh()
        for key in self._waiting:
            self.queue.enqueue(key)

    def _refresh(self, *, slices: bool = True) -> None:
        """The vendor's devices (re-read from the slices' store when `slices`) and which of them
        are our GPUs."""
        if slices:
            self.index = decide.vendor_index(self.vendor_slices.store.values(), self.vendor)
        ours = [o for o in self.resources.store.values() if mine(o, self.driver_label)]
        self.publisher.aliases = decide.aliases(self.index, ours, self.publisher.aliases)

    async def run(self) -> None:
        await self.claims.synced.wait()
        await self.resources.synced.wait()
        await self.vendor_slices.synced.wait()
        await self.publisher.synced.wait()
        self._refresh()
        await self.queue.run()

    # --- the hand-off ----------------------------------------------------------------------------

    async def handle(self, key: ClaimKey) -> None:
        claim = self.claims.get(*key)
        if claim is None:
            return
        for b in claimmodel.bindings(claim, self.vendor):
            if b.failed or (b.uid, b.pool, b.device) in self._done:
                continue
            device = self.publisher.device_id_of(b.pool, b.device)
            resource = self.resources.get("", resource_name(device)) if device else None
            if resource is not None and not mine(resource, self.driver_label):
                resource = None
            d = decide.decide(claim, b, vendor=self.vendor, resource=resource, index=self.index)
            if d.step == decide.Step.RESCHEDULE:
                await self._reschedule(claim, b, device or "", d)
            elif d.elsewhere and resource is not None:
                self._tell_elsewhere(claim, b, resource, d.elsewhere)

    def _tell_elsewhere(
        self, claim: Obj, b: claimmodel.Binding, resource: Obj, nodes: tuple[str, ...]
    ) -> None:
        """One Warning Event (per claim, device and nodes) when the GPU attached for the claim's
        node shows on another node: the claim cannot get it there, and the likely cause is a
        Node mapped to the wrong machine."""
        key = (b.uid, b.device, nodes)
        if key in self._told_elsewhere:
            return
        self._told_elsewhere.add(key)
        gpu = decide.gpu_uuid(resource)
        machine = str((resource.get("status") or {}).get("machine") or "its machine")
        message = (
            f"{gpu}, attached to {machine} for node {b.node}, is offered by {self.vendor} on "
            f"{', '.join(nodes)}, not on {b.node}: check the Nodes' spec.providerID (or machine "
            "label), which say which machine each node is"
        )
        logger.warning("claim %s/%s: %s", b.namespace, b.claim, message)
        self.recorder.emit(claim, "GPUOnOtherNode", message, warning=True)

    async def _reschedule(
        self, claim: Obj, b: claimmodel.Binding, device: str, d: decide.Decision
    ) -> None:
        message = (
            f"{device} is attached to {b.node} and offered by {self.vendor} there ({d.why}): "
            "allocate again"
        )
        if not await self._set_condition(b, message):
            return
        self._done.add((b.uid, b.pool, b.device))
        self.written += 1
        logger.info(
            "claim %s/%s: %s on %s handed to %s (FabricDeviceReschedule=True)",
            b.namespace,
            b.claim,
            device,
            b.node,
            self.vendor,
            extra=logs.fields(
                decision="reschedule",
                claim=f"{b.namespace}/{b.claim}",
                device=device,
                node=b.node,
            ),
        )
        self.recorder.emit(claim, "Rescheduled", message + "; FabricDeviceReschedule=True")

    async def _set_condition(self, b: claimmodel.Binding, message: str) -> bool:
        """FabricDeviceReschedule=True in exactly our (driver, pool, device) entry; False when the
        claim or that allocation is gone, or the condition is there already (someone else wrote
        it: it is never written twice)."""
        return await set_claim_condition(
            self.kube,
            self.claims,
            b,
            driver=self.vendor,
            ctype=decide.RESCHEDULE,
            reason="AttachedToNode",
            message=message,
            wall=self.wall,
            unless=lambda claim: decide.rescheduled(claim, self.vendor, b.pool, b.device),
            missing_ok=True,
        )
