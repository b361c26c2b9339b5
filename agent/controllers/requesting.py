"""ComposabilityRequests (CoHDI's manual / pre-warm intent: "keep N GPUs of model M on node X")
reconciled into the matching set of ComposableResources, which the composer attaches. Resources a
request owns carry `app.kubernetes.io/managed-by=<request>`; scale-down leaves them alone.

States follow CoHDI: "" → NodeAllocating → Updating → Running; deletion Cleaning → Deleting.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from agent import errors
from agent.controllers.publishing import Publisher
from agent.controllers.queueing import KeyedQueue
from agent.kube.client import MERGE_PATCH, Kube, Obj
from agent.kube.eventing import Recorder
from agent.kube.resources import REQUESTS, RESOURCES, deleting, spec, state
from agent.kube.watching import Event, Informer
from agent.manifests import crds

logger = logging.getLogger(__name__)


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
    ) -> None:
        self.kube = kube
        self.requests = requests
        self.resources = resources
        self.nodes = nodes
        self.publisher = publisher
        self.recorder = recorder
        self.queue: KeyedQueue[str] = KeyedQueue("requests", self.handle, workers=8)
        requests.add_handler(lambda e: self.queue.enqueue(e.obj["metadata"]["name"]))
        resources.add_handler(self._on_resource)

    def _on_resource(self, event: Event) -> None:
        owner = (event.obj["metadata"].get("labels") or {}).get(crds.MANAGED_BY)
        if owner:
            self.queue.enqueue(owner)

    async def run(self) -> None:
        await self.requests.synced.wait()
        await self.resources.synced.wait()
        await self.publisher.synced.wait()
        await self.queue.run()

    def _owned(self, name: str) -> list[Obj]:
        return sorted(
            (
                o
                for o in self.resources.store.values()
                if (o["metadata"].get("labels") or {}).get(crds.MANAGED_BY) == name
            ),
            key=lambda o: o["metadata"]["name"],
        )

    async def _status(self, name: str, status: dict[str, Any]) -> None:
        await self.kube.patch(
            f"{REQUESTS}/{name}/status", {"status": status}, content_type=MERGE_PATCH
        )

    async def handle(self, name: str) -> None:
        req = self.requests.get("", name)
        if req is None:
            return
        finalizers = req["metadata"].get("finalizers") or []
        if deleting(req):
            await self._clean(req, finalizers)
            return
        if crds.FINALIZER not in finalizers:
            await self.kube.patch(
                f"{REQUESTS}/{name}",
                {
                    "metadata": {
                        "finalizers": [*finalizers, crds.FINALIZER],
                        "resourceVersion": req["metadata"]["resourceVersion"],
                    }
                },
            )
            return
        want = spec(req)["resource"]
        size = int(want["size"])
        nodes = self._nodes_for(want, size)
        if nodes is None:
            message = f"no node for {want.get('target_node') or 'the request'} is wired to a fabric"
            await self._status(name, {"state": "Failed", "error": message, "scalarResource": want})
            self.recorder.emit(req, "NoNode", message, warning=True)
            return
        owned = [o for o in self._owned(name) if not deleting(o)]
        matching = [
            o
            for o in owned
            if spec(o).get("model") == want["model"]
            and spec(o).get("type") == want["type"]
            and (not want.get("target_node") or spec(o).get("target_node") == want["target_node"])
        ]
        surplus = [o for o in owned if o not in matching] + matching[size:]
        keep = matching[:size]
        for o in surplus:
            await self._delete(o["metadata"]["name"])
        used = {o["metadata"]["name"] for o in self._owned(name)}
        for i in range(size - len(keep)):
            index = next(n for n in range(10_000) if f"{name}-{n}" not in used)
            used.add(f"{name}-{index}")
            node = nodes[(len(keep) + i) % len(nodes)]
            await self._create(name, f"{name}-{index}", want, node)
        members = {
            o["metadata"]["name"]: {
                "state": state(o) or "Attaching",
                "device_id": (o.get("status") or {}).get("device_id", ""),
                "cdi_device_id": (o.get("status") or {}).get("cdi_device_id", ""),
                "node_name": spec(o).get("target_node", ""),
                "error": (o.get("status") or {}).get("error", ""),
            }
            for o in keep
        }
        running = len(keep) == size and all(m["state"] == "Online" for m in members.values())
        new_state = "Running" if running else ("Updating" if keep else "NodeAllocating")
        status = req.get("status") or {}
        if status.get("state") != new_state or status.get("resources") != members:
            await self._status(
                name,
                {"state": new_state, "error": "", "resources": members, "scalarResource": want},
            )
            if new_state == "Running":
                self.recorder.emit(req, "Running", f"{size} x {want['model']} attached")

    def _nodes_for(self, want: dict[str, Any], size: int) -> list[str] | None:
        fabric_nodes = sorted(set(self.publisher.node_of_machine().values()))
        target = want.get("target_node") or ""
        if target:
            return [target] if target in fabric_nodes else None
        if not fabric_nodes:
            return None
        if want.get("allocation_policy") == "differentnode":
            return fabric_nodes[: max(size, 1)]
        return fabric_nodes[:1]

    async def _create(self, owner: str, name: str, want: dict[str, Any], node: str) -> None:
        body = {
            "apiVersion": f"{crds.GROUP}/{crds.VERSION}",
            "kind": "ComposableResource",
            "metadata": {"name": name, "labels": {crds.MANAGED_BY: owner}},
            "spec": {
                "type": want["type"],
                "model": want["model"],
                "target_node": node,
                "force_detach": bool(want.get("force_detach", False)),
            },
        }
        try:
            created = await self.kube.create(RESOURCES, body)
            self.resources.store[("", name)] = created
        except errors.KubeAlreadyExists:
            pass

    async def _delete(self, name: str) -> None:
        with contextlib.suppress(errors.KubeNotFound):
            await self.kube.delete(f"{RESOURCES}/{name}")

    async def _clean(self, req: Obj, finalizers: list[str]) -> None:
        name = req["metadata"]["name"]
        owned = self._owned(name)
        if owned:
            if (req.get("status") or {}).get("state") != "Cleaning":
                await self._status(name, {"state": "Cleaning"})
            for o in owned:
                if not deleting(o):
                    await self._delete(o["metadata"]["name"])
            return
        if crds.FINALIZER in finalizers:
            await self.kube.patch(
                f"{REQUESTS}/{name}",
                {
                    "metadata": {
                        "finalizers": [f for f in finalizers if f != crds.FINALIZER],
                        "resourceVersion": req["metadata"]["resourceVersion"],
                    }
                },
            )
