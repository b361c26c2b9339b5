"""A stand-in for the node role in tests and benchmarks: it reports `NodeReady` on every
ComposableResource that is Online on one of its nodes, and `NodeReleased` when one is being
deleted — what the real node agent writes after it has seen (or safely removed) the device. Used
until the node role runs in the same tests; never in production code paths."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt

from agent.kube.client import MERGE_PATCH, Kube, Obj
from agent.kube.resources import (
    NODE_READY,
    NODE_RELEASED,
    RESOURCES,
    condition,
    deleting,
    state,
)
from agent.kube.watching import Event, Informer


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class NodeDouble:
    """Stands in for the node role: when a resource is Online on one of our nodes, report
    NodeReady (with the PCI address the fabric gave); when it is being deleted, NodeReleased."""

    def __init__(self, kube: Kube, nodes: set[str], delay: float = 0.0) -> None:
        self.kube = kube
        self.nodes = nodes
        self.delay = delay
        self.informer = Informer(kube, RESOURCES, name="node-double")
        self.informer.add_handler(self._on)
        self._tasks: set[asyncio.Task[None]] = set()

    def _on(self, event: Event) -> None:
        obj = event.obj
        if event.type == "DELETED" or obj.get("spec", {}).get("target_node") not in self.nodes:
            return
        ready, released = condition(obj, NODE_READY), condition(obj, NODE_RELEASED)
        if deleting(obj) and ready and not released:
            self._spawn(obj, NODE_RELEASED)
        elif not deleting(obj) and state(obj) == "Online" and not ready:
            self._spawn(obj, NODE_READY)

    def _spawn(self, obj: Obj, ctype: str) -> None:
        t = asyncio.get_running_loop().create_task(self._report(obj, ctype))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _report(self, obj: Obj, ctype: str) -> None:
        await asyncio.sleep(self.delay)
        conds = [c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] != ctype]
        conds.append(
            {
                "type": ctype,
                "status": "True",
                "reason": "NodeDouble",
                "message": "test",
                "lastTransitionTime": now(),
            }
        )
        with contextlib.suppress(Exception):
            await self.kube.patch(
                f"{RESOURCES}/{obj['metadata']['name']}/status",
                {"status": {"conditions": conds}},
                content_type=MERGE_PATCH,
            )

    async def run(self) -> None:
        await self.informer.run()
