"""ComposabilityRequests (CoHDI's manual / pre-warm intent: "keep N GPUs of model M on node X")
reconciled into owned ComposableResources that name only a model; the composer picks and attaches
a device for each.

A thin observe / decide / act loop around `agent.model.requests.decide` (where ownership, bounds,
placement, failed members, conditions and Events are decided and documented):
- observe: the request, the resources it owns (the informer's, plus the ones this process created
  that the informer has not delivered yet), the nodes wired to a fabric and what the fabric can
  give (`Fabric.of` the publisher's inventory);
- act: finalizer, adoption of CoHDI's members, deletes, creates (in parallel, in chunks of
  `batch`), then the status, then the Events. Status and in-memory state are written only after
  the writes they record succeeded; nothing is written into an informer's cache.

States follow CoHDI: "" → NodeAllocating → Updating → Running; deletion Cleaning → gone; refused
requests are `Failed` with `error` and a `Refused` condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from agent import errors, logs
from agent.controllers import metrics
from agent.controllers.publishing import Publisher
from agent.controllers.queueing import KeyedQueue
from agent.kube.client import MERGE_PATCH, Kube, Obj
from agent.kube.eventing import Recorder
from agent.kube.resources import FINALIZER, GROUP, REQUESTS, RESOURCES, VERSION, deleting
from agent.kube.watching import Event, Informer
from agent.model import composing as composemodel
from agent.model import names
from agent.model import requests as model
from agent.model import scaling as scalemodel
from agent.model.objects import DRIVER_LABEL, devices_of, fabric_device, name_of, state

logger = logging.getLogger(__name__)

API_VERSION: Final = f"{GROUP}/{VERSION}"
#: Seconds a member this process created may stay unseen by the informer before it is no longer
#: counted (it was deleted by someone before the informer saw it).
PENDING_TTL: Final = 60.0

T = TypeVar("T")


@dataclass
class _Memory:
    """What this process knows about one request beyond the informers (lost on restart: every
    piece is either re-derived from the API or only delays a decision)."""

    #: members created but not yet delivered by the informer: name -> (object, monotonic time)
    pending: dict[str, tuple[Obj, float]] = field(default_factory=dict)
    #: members deleted but not yet seen deleting by the informer
    deleted: set[str] = field(default_factory=set)
    #: member name -> epoch seconds it was first seen Failed
    failed_since: dict[str, float] = field(default_factory=dict)
    #: members replaced since the request last ran
    replacements: int = 0
    #: (the request's resourceVersion before it, status) of our last status write: used until
    #: the informer delivers it, so a second pass does not write or announce it again
    written: tuple[str, dict[str, Any]] | None = None
    #: names that exist but belong to someone else (a create answered AlreadyExists)
    foreign: set[str] = field(default_factory=set)


class Requester:
    def __init__(
        self,
        kube: Kube,
        *,
        requests: Informer,
        resources: Informer,
        nodes: Informer,
        publisher: Publisher,
        recorder: Recorder,
        limits: model.Limits | None = None,
        driver: str = "",
        clock: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        batch: int = 16,
        workers: int = 8,
        claims: Informer | None = None,
    ) -> None:
        self.kube = kube
        #: the claims, to keep the members they hold when a request shrinks (None: not known)
        self.claims = claims
        self.requests = requests
        self.resources = resources
        self.nodes = nodes
        self.publisher = publisher
        self.recorder = recorder
        self.limits = limits or model.Limits()
        #: members are labelled with the deployment that made them (cohdi.io/driver)
        self.made_by = {DRIVER_LABEL: names.label_value(driver)} if driver else {}
        self.clock = clock
        self.mono = mono
        self.batch = batch
        self.queue: KeyedQueue[str] = KeyedQueue(
            "requests", metrics.timed("requests", self.handle), workers=workers
        )
        metrics.QUEUES.track(self.queue)
        self._memory: dict[str, _Memory] = {}
        #: requests with members waiting for a free device
        self._waiting: set[str] = set()
        #: uid -> monotonic time an unlabelled request we cannot serve was first seen
        self._unclaimed: dict[str, float] = {}
        requests.add_handler(self._on_request)
        resources.add_handler(self._on_resource)

    # --- events -----------------------------------------------------------------------------

    def _on_request(self, event: Event) -> None:
        name = name_of(event.obj)
        if event.type == "DELETED":
            self._memory.pop(name, None)
            self._waiting.discard(name)
            return
        self.queue.enqueue(name)

    def _on_resource(self, event: Event) -> None:
        obj = event.obj
        owner = model.owner_of(obj)
        if owner is not None:
            memory = self._memory.get(owner[0])
            if memory is not None:
                member = name_of(obj)
                memory.pending.pop(member, None)
                if event.type == "DELETED" or deleting(obj):
                    memory.deleted.discard(member)
            self.queue.enqueue(owner[0])
        if event.type == "DELETED" or (
            event.old is not None and state(event.old) == "Online" and state(obj) != "Online"
        ):
            # A device may have come free: requests waiting for one look again.
            for name in self._waiting:
                self.queue.enqueue(name)

    async def run(self) -> None:
        await self.requests.synced.wait()
        await self.resources.synced.wait()
        await self.publisher.synced.wait()
        await self.queue.run()

    # --- observe ----------------------------------------------------------------------------

    def _memory_of(self, name: str) -> _Memory:
        return self._memory.setdefault(name, _Memory())

    def _current(self, obj: Obj, memory: _Memory) -> Obj:
        """The request with the status we last wrote, while the informer has not delivered it."""
        if memory.written is None:
            return obj
        before, status = memory.written
        if obj["metadata"].get("resourceVersion") == before:
            return {**obj, "status": status}
        memory.written = None
        return obj

    def _owned(self, req: model.Request, memory: _Memory) -> list[Obj]:
        found = {
            name_of(o): o
            for o in self.resources.store.values()
            if model.owned_by(o, req.name, req.uid)
        }
        expiry = self.mono() - PENDING_TTL
        for member, (obj, at) in list(memory.pending.items()):
            if member in found or at < expiry:
                del memory.pending[member]
            else:
                found[member] = obj
        memory.deleted &= set(found)
        out = []
        for member, obj in sorted(found.items()):
            if member in memory.deleted and not deleting(obj):
                meta = {**obj["metadata"], "deletionTimestamp": "pending"}
                obj = {**obj, "metadata": meta}
            out.append(obj)
        return out

    def _fabric(self) -> model.Fabric:
        taken = {d for o in self.resources.store.values() if (d := fabric_device(o))}
        taken |= self.publisher.withheld | self.publisher.pinned
        return model.Fabric.of(self.publisher.inventory, self.publisher.node_of_machine(), taken)

    def _members(self, owned: Iterable[Obj], memory: _Memory, now: float) -> list[model.Member]:
        failed = {name_of(o) for o in owned if state(o) == "Failed"}
        memory.failed_since = {
            n: memory.failed_since.get(n, now) for n in failed
        }  # forget members no longer Failed
        held = self._held()
        return [
            model.Member.of(
                o,
                failed_since=memory.failed_since.get(name_of(o)),
                held=bool(devices_of(o) & held),
            )
            for o in owned
        ]

    def _held(self) -> set[str]:
        """Fabric devices a claim holds (our pool's devices, and in vendor mode the vendor's
        devices that are our GPUs: `Publisher.device_index` knows both); empty without claims."""
        if self.claims is None:
            return set()
        return scalemodel.held_devices(
            self.claims.store.values(), self.publisher.driver, self.publisher.device_index()
        )

    # --- decide and act ---------------------------------------------------------------------

    async def handle(self, name: str) -> None:
        raw = self.requests.get("", name)
        if raw is None:
            return
        memory = self._memory_of(name)
        obj = self._current(raw, memory)
        req = model.Request.of(obj, finalizer=FINALIZER, replacements=memory.replacements)
        now = self.clock()
        owned = self._owned(req, memory)
        members = self._members(owned, memory, now)
        fabric = self._fabric()
        if self.made_by and not await self._ours(obj, model.serves(req.want, fabric, members)):
            return
        decision = model.decide(req, members, fabric, self.limits, now=now, reserved=memory.foreign)
        await self._act(obj, req, decision, memory, {name_of(o): o for o in owned})

    async def _ours(self, obj: Obj, serves: bool) -> bool:
        """May this deployment act on the request now (`agent.model.composing.adoption`, the
        composer's rule for resources)? Another deployment's: never. One no deployment labelled
        (CoHDI's, or hand-written) that we can serve (`model.serves`): labelled ours first (the
        update event brings it back); one we cannot: left to the others for a grace."""
        name = name_of(obj)
        uid = str(obj["metadata"].get("uid", ""))
        first = self._unclaimed.setdefault(uid, self.mono())
        verdict, after = composemodel.adoption(
            obj,
            self.made_by[DRIVER_LABEL],
            serves=serves,
            unclaimed_for=self.mono() - first,
            grace=composemodel.UNCLAIMED_GRACE,
        )
        if verdict is not composemodel.Adoption.WAIT:
            self._unclaimed.pop(uid, None)
        if verdict is composemodel.Adoption.FOREIGN:
            return False
        if verdict is composemodel.Adoption.WAIT:
            self.queue.enqueue_after(name, after)
            return False
        if verdict is composemodel.Adoption.LABEL:
            try:
                await self.kube.patch(
                    f"{REQUESTS}/{name}",
                    {
                        "metadata": {
                            "labels": dict(self.made_by),
                            "resourceVersion": obj["metadata"]["resourceVersion"],
                        }
                    },
                )
            except errors.KubeNotFound:
                return False
            except errors.KubeConflict:
                self.queue.enqueue_after(name, 0.1)  # changed meanwhile (another took it?)
                return False
            logger.info(
                "ComposabilityRequest %s adopted (no deployment's label, and ours to serve): "
                "labelled %s=%s",
                name,
                DRIVER_LABEL,
                self.made_by[DRIVER_LABEL],
                extra=logs.fields(request=name),
            )
            return False  # the update event brings us back
        return True

    async def _act(
        self,
        obj: Obj,
        req: model.Request,
        d: model.Decision,
        memory: _Memory,
        owned: dict[str, Obj],
    ) -> None:
        if d.finalizer is not model.Finalizer.KEEP:
            await self._finalizer(obj, add=d.finalizer is model.Finalizer.ADD)
            if d.finalizer is model.Finalizer.REMOVE:
                self._memory.pop(req.name, None)
                self._waiting.discard(req.name)
            return  # the update event brings us back
        await self._chunked(d.adopt, lambda n: self._adopt(req, owned[n]))
        await self._chunked(d.force_detach, lambda n: self._force_detach(n, req.want))
        await self._chunked(d.delete, lambda n: self._delete(n, memory))
        status, events = d.status, list(d.events)
        refused = await self._create_all(req, d.create, memory)
        self._emit(obj, d.done)  # what was done is done, whatever happens to the status write
        running = status is not None and status.get("state") == "Running"
        memory.replacements = 0 if running else memory.replacements + d.replaced
        if refused and status is not None:
            failed, message = refused
            status, note = model.create_failed(req, status, failed, message, self.clock())
            events.append(note)
        if status is not None and status != (obj.get("status") or {}):
            await self._write_status(obj, status, memory)
        self._emit(obj, events)
        if d.waiting:
            self._waiting.add(req.name)
        else:
            self._waiting.discard(req.name)
        later = d.recheck_after
        if refused:
            later = self.limits.recheck
        if later is not None:
            self.queue.enqueue_after(req.name, later)

    def _emit(self, obj: Obj, notes: Iterable[model.Note]) -> None:
        for note in notes:
            logger.log(
                logging.WARNING if note.warning else logging.INFO,
                "request %s: %s: %s",
                name_of(obj),
                note.reason,
                note.message,
                extra=logs.fields(request=name_of(obj), reason=note.reason),
            )
            self.recorder.emit(obj, note.reason, note.message, warning=note.warning)

    async def _chunked(self, items: Iterable[T], act: Callable[[T], Awaitable[None]]) -> None:
        """`act` on every item, `batch` at a time in parallel; the first error is raised once
        every started call has finished."""
        todo = list(items)
        for i in range(0, len(todo), self.batch):
            results = await asyncio.gather(
                *(act(x) for x in todo[i : i + self.batch]), return_exceptions=True
            )
            for r in results:
                if isinstance(r, BaseException):
                    raise r

    async def _create_all(
        self, req: model.Request, create: Iterable[model.NewMember], memory: _Memory
    ) -> tuple[set[str], str] | None:
        """Create the members; record each that the API server accepted. Transient errors are
        raised (the queue retries); a permanent refusal is returned as (names, message)."""
        todo = list(create)
        transient: BaseException | None = None
        refused: set[str] = set()
        message = ""
        for i in range(0, len(todo), self.batch):
            chunk = todo[i : i + self.batch]
            results = await asyncio.gather(
                *(self._create(req, m, memory) for m in chunk), return_exceptions=True
            )
            for m, r in zip(chunk, results, strict=True):
                if isinstance(r, errors.AgentError) and r.transient:
                    transient = transient or r
                elif isinstance(r, errors.AgentError):
                    refused.add(m.name)
                    message = message or f"creating member {m.name} failed: {r}"
                elif isinstance(r, BaseException):
                    raise r
        if transient is not None:
            raise transient
        return (refused, message) if refused else None

    async def _create(self, req: model.Request, m: model.NewMember, memory: _Memory) -> None:
        want = req.want
        body = {
            "apiVersion": API_VERSION,
            "kind": "ComposableResource",
            "metadata": {
                "name": m.name,
                "labels": {**model.member_labels(req.name), **self.made_by},
                "ownerReferences": [model.owner_reference(API_VERSION, req.name, req.uid)],
            },
            "spec": {
                "type": want.type,
                "model": want.model,
                "target_node": m.node,
                "force_detach": want.force_detach,
            },
        }
        try:
            created = await self.kube.create(RESOURCES, body)
        except errors.KubeAlreadyExists:
            existing = await self.kube.get(f"{RESOURCES}/{m.name}")
            if not model.owned_by(existing, req.name, req.uid):
                memory.foreign.add(m.name)  # someone else's: the next pass picks another name
                raise errors.KubeConflict(
                    f"ComposableResource {m.name} exists and is not {req.name}'s"
                ) from None
            created = existing
        memory.pending[m.name] = (created, self.mono())

    async def _delete(self, name: str, memory: _Memory) -> None:
        with contextlib.suppress(errors.KubeNotFound):
            await self.kube.delete(f"{RESOURCES}/{name}")
        memory.deleted.add(name)

    async def _adopt(self, req: model.Request, obj: Obj) -> None:
        """Give one of CoHDI's members our labels and an ownerReference to its request."""
        name = name_of(obj)
        refs = [*(obj["metadata"].get("ownerReferences") or [])]
        refs.append(model.owner_reference(API_VERSION, req.name, req.uid))
        with contextlib.suppress(errors.KubeNotFound):
            await self.kube.patch(
                f"{RESOURCES}/{name}",
                {
                    "metadata": {
                        "labels": {**model.member_labels(req.name), **self.made_by},
                        "ownerReferences": refs,
                        "resourceVersion": obj["metadata"]["resourceVersion"],
                    }
                },
            )

    async def _force_detach(self, name: str, want: model.Want) -> None:
        with contextlib.suppress(errors.KubeNotFound):
            await self.kube.patch(
                f"{RESOURCES}/{name}", {"spec": {"force_detach": want.force_detach}}
            )

    async def _finalizer(self, obj: Obj, *, add: bool) -> None:
        finalizers = [f for f in obj["metadata"].get("finalizers") or [] if f != FINALIZER]
        if add:
            finalizers.append(FINALIZER)
        with contextlib.suppress(errors.KubeNotFound):
            await self.kube.patch(
                f"{REQUESTS}/{name_of(obj)}",
                {
                    "metadata": {
                        "finalizers": finalizers,
                        "resourceVersion": obj["metadata"]["resourceVersion"],
                    }
                },
            )

    async def _write_status(self, obj: Obj, status: dict[str, Any], memory: _Memory) -> None:
        """Merge-patch the status from what `obj` (the informer's object, with our last write
        while the informer lags) holds to `status`; remember it until the informer catches up."""
        patch = model.status_patch(obj.get("status") or {}, status)
        await self.kube.patch(
            f"{REQUESTS}/{name_of(obj)}/status", {"status": patch}, content_type=MERGE_PATCH
        )
        memory.written = (str(obj["metadata"].get("resourceVersion", "")), status)
