"""The floor: the API requests the agent makes for one claim, with no agent logic.

For each claim allocated a device of `driver` that waits for `FabricDeviceReady`, one chain of
requests, each waiting for its own watch event before the next:

1. create the ComposableResource (the body the scaler sends: annotation, fabric label,
   finalizer, spec), until the resource informer has it;
2. status `Attaching` (merge patch of the status subresource), until seen;
3. status `Online` with the device's id, serial, machine and PCI address, until seen;
4. the node's report: `NodeReady` in the status conditions, until seen;
5. the claim's status read-modify-write: GET, `FabricDeviceReady=True` in our entry of
   `status.devices`, PUT, until the claim informer shows it.

No fabric call, no decision, no Event, no slice rewrite: what is left is the API server,
etcd, the watch fan-out and the client library (the agent's own, so the comparison is of
the logic, not of HTTP stacks). The time from "claim allocated" to "claim ready" this chain
takes, measured by the same ClaimClock as the agent's, is the floor the agent is held to.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable

from agent import errors
from agent.controllers.publishing import Publisher
from agent.kube.client import MERGE_PATCH, Kube, Obj
from agent.kube.resources import (
    CLAIM_ANNOTATION,
    FINALIZER,
    GROUP,
    NODE_READY,
    RESOURCES,
    VERSION,
    condition,
    state,
)
from agent.kube.watching import Event, Informer
from agent.model import claims as claimmodel
from agent.model import pool as poolmodel
from bench.harness import CLAIMS

Predicate = Callable[[Obj], bool]


class Watched:
    """Futures an informer's events resolve: `await watched.until(name, predicate)` returns the
    first version of object `name` (cluster-scoped or in the informer's namespace) for which
    the predicate holds — at once when the store already has one."""

    def __init__(self, informer: Informer, namespace: str = "") -> None:
        self.informer = informer
        self.namespace = namespace
        self._waits: dict[str, list[tuple[Predicate, asyncio.Future[Obj]]]] = defaultdict(list)
        informer.add_handler(self._on)

    def _on(self, e: Event) -> None:
        name = e.obj["metadata"]["name"]
        waits = self._waits.get(name)
        if not waits or e.type == "DELETED":
            return
        for pred, fut in waits:
            if not fut.done() and pred(e.obj):
                fut.set_result(e.obj)
        waits[:] = [(p, f) for p, f in waits if not f.done()]

    async def until(self, name: str, pred: Predicate, timeout: float = 120.0) -> Obj:  # noqa: ASYNC109
        have = self.informer.get(self.namespace, name)
        if have is not None and pred(have):
            return have
        fut: asyncio.Future[Obj] = asyncio.get_running_loop().create_future()
        self._waits[name].append((pred, fut))
        return await asyncio.wait_for(fut, timeout)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ApiChain:
    """Walks the chain above for every claim of `driver` that waits for its device. `publisher`
    is only read (which fabric device a pool device is); it keeps the pool published."""

    def __init__(self, kube: Kube, *, driver: str, publisher: Publisher) -> None:
        self.kube = kube
        self.driver = driver
        self.publisher = publisher
        self.claims = Informer(kube, CLAIMS, name="floor-claims")
        self.resources = Informer(kube, RESOURCES, name="floor-resources")
        self.claim_events = Watched(self.claims, namespace="default")
        self.resource_events = Watched(self.resources)
        self.claims.add_handler(self._on_claim)
        self.started: set[str] = set()
        self.created: list[str] = []
        self.errors: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.claims.run())
            tg.create_task(self.resources.run())

    async def synced(self) -> None:
        await self.claims.synced.wait()
        await self.resources.synced.wait()

    def _on_claim(self, e: Event) -> None:
        if e.type == "DELETED":
            return
        for b in claimmodel.bindings(e.obj, self.driver):
            if b.ready or b.failed or b.uid in self.started:
                continue
            self.started.add(b.uid)
            task = asyncio.get_running_loop().create_task(self._chain(b))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _chain(self, b: claimmodel.Binding) -> None:
        try:
            await self._walk(b)
        except (errors.AgentError, TimeoutError) as exc:
            self.errors.append(f"{b.claim}: {type(exc).__name__}: {exc}")

    async def _walk(self, b: claimmodel.Binding) -> None:
        device = self.publisher.device_id_of(b.pool, b.device) or b.device
        dev = self.publisher.device(device)
        name = f"floor-{b.claim}"
        self.created.append(name)
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ComposableResource",
            "metadata": {
                "name": name,
                "annotations": {CLAIM_ANNOTATION: f"{b.namespace}/{b.claim}"},
                "labels": {
                    poolmodel.FABRIC_LABEL: poolmodel.fabric_label(dev.fabric if dev else "")
                },
                "finalizers": [FINALIZER],
            },
            "spec": {
                "type": "gpu",
                "model": dev.model if dev else "",
                "target_node": b.node,
                "fabric_device": device,
            },
        }
        status = f"{RESOURCES}/{name}/status"
        await self.kube.create(RESOURCES, body)
        await self.resource_events.until(name, lambda _o: True)
        await self.kube.patch(
            status, {"status": {"state": "Attaching", "error": ""}}, content_type=MERGE_PATCH
        )
        await self.resource_events.until(name, lambda o: state(o) == "Attaching")
        online = {
            "state": "Online",
            "error": "",
            "reason": "",
            "message": "",
            "cdi_device_id": device,
            "device_id": dev.gpu_uuid if dev else device,
            "machine": self.publisher.machine_of_node(b.node) or "",
            "pci_address": "0000:41:00.0",
        }
        await self.kube.patch(status, {"status": online}, content_type=MERGE_PATCH)
        await self.resource_events.until(name, lambda o: state(o) == "Online")
        report = {
            "type": NODE_READY,
            "status": "True",
            "reason": "Seen",
            "message": "0000:41:00.0 present",
            "lastTransitionTime": _now(),
        }
        await self.kube.patch(
            status, {"status": {"conditions": [report]}}, content_type=MERGE_PATCH
        )
        await self.resource_events.until(name, lambda o: condition(o, NODE_READY))
        path = f"{CLAIMS}/{b.claim}"
        claim = await self.kube.get(path)
        updated = claimmodel.with_condition(
            claim,
            driver=self.driver,
            pool=b.pool,
            device=b.device,
            ctype=poolmodel.READY,
            reason="Attached",
            message=f"{device} is attached and ready on {b.node}",
            now=time.time(),
        )
        if updated is None:
            return
        await self.kube.replace(f"{path}/status", updated)

        def ready(o: Obj) -> bool:
            return any(x.ready for x in claimmodel.bindings(o, self.driver) if x.device == b.device)

        await self.claim_events.until(b.claim, ready)

    async def clean_up(self) -> None:
        """Delete every resource the chain made (their finalizer dropped first: no composer)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for name in self.created:
            with contextlib.suppress(errors.KubeNotFound):
                await self.kube.patch(f"{RESOURCES}/{name}", {"metadata": {"finalizers": None}})
                await self.kube.delete(f"{RESOURCES}/{name}")
