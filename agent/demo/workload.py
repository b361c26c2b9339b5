"""The demo's workload and the kubelet's part: pods with ResourceClaims arrive in bursts; when the
scheduler binds one, its node's DRA plugin is asked to prepare it (as kubelet would, over the
plugin's socket), the pod runs for its lifetime, then is unprepared and finishes (what kubelet and
kube-controller-manager would do: pod gone, claim deallocated and deleted). Every instant is
recorded for the summary and the plot."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from agent._proto.dra.v1 import api_pb2, api_pb2_grpc
from agent.demo import objects
from agent.demo.world import World
from agent.kube.watching import Event, Informer
from agent.model import claims as claimmodel

NS, CLAIMS, PODS = objects.NS, objects.CLAIMS, objects.PODS


@dataclass
class PodRecord:
    name: str
    model: str
    submitted: float
    allocated: float = 0.0
    ready: float = 0.0
    bound: float = 0.0
    prepared: float = 0.0
    finished: float = 0.0
    node: str = ""
    device: str = ""
    #: The claim was allocated a device already attached to its node (published with `nodeName`,
    #: no binding conditions): nothing to attach, no wait in the scheduler's PreBind, so `ready`
    #: stays 0 and the pod's only figure is submitted → bound.
    warm: bool = False
    #: Allocations after the first: the scheduler dropped the pod's allocation (its binding
    #: conditions failed or timed out) and allocated again. Such a pod waited, so it is never
    #: counted warm.
    reallocated: int = 0
    cdi_ids: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def phase(self) -> str:
        if self.finished:
            return "done"
        if self.prepared:
            return "running"
        if self.bound:
            return "bound"
        if self.allocated:
            return "attaching"
        return "pending"


class Workload:
    def __init__(self, world: World, *, lifetime: tuple[float, float], seed: int = 7) -> None:
        self.world = world
        self.lifetime = lifetime
        self.rng = random.Random(seed)  # noqa: S311 -- a demo's arrival pattern
        self.records: dict[str, PodRecord] = {}
        self.claims = Informer(world.kube, CLAIMS, name="demo-claims")
        self.pods = Informer(world.kube, PODS, name="demo-pods")
        self.claims.add_handler(self._on_claim)
        self.pods.add_handler(self._on_pod)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.t0 = time.monotonic()

    def _on_claim(self, e: Event) -> None:
        rec = self.records.get(e.obj["metadata"]["name"])
        if rec is None or e.type == "DELETED":
            return
        held = claimmodel.allocated_devices(e.obj, self.world.driver)
        waiting = claimmodel.bindings(e.obj, self.world.driver)
        if held and not rec.allocated:
            rec.allocated = time.monotonic()
            rec.device = min(held)[1]
            rec.warm = not waiting  # no device of ours waits for FabricDeviceReady
        elif held and min(held)[1] != rec.device:
            rec.reallocated += 1
            rec.device = min(held)[1]
            rec.warm = False
        elif not held and rec.allocated and not rec.bound:
            rec.device = ""  # dropped before binding: whatever comes next is a new allocation
        for b in waiting:
            if b.ready and not rec.ready:
                rec.ready = time.monotonic()

    def _on_pod(self, e: Event) -> None:
        rec = self.records.get(e.obj["metadata"]["name"])
        node = e.obj.get("spec", {}).get("nodeName")
        if rec is None or e.type == "DELETED" or not node or rec.bound:
            return
        rec.bound, rec.node = time.monotonic(), node
        self._spawn(self._run(rec))

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        self._spawn(self.claims.run())
        self._spawn(self.pods.run())
        await self.claims.synced.wait()
        await self.pods.synced.wait()

    async def submit(self, name: str, model: str) -> None:
        self.records[name] = PodRecord(name, model, time.monotonic())
        # Written as the README advises: GPUs already on a node first (a prioritized list), so
        # the scheduler sends the pod to a node with an idle attached GPU when there is one.
        await objects.submit(
            self.world.kube,
            name,
            self.world.driver,
            model,
            {"cohdi.io/demo": "true"},
            prefer_attached=True,
        )

    async def _run(self, rec: PodRecord) -> None:
        claim = await self.world.kube.get(f"{CLAIMS}/{rec.name}")
        uid = claim["metadata"]["uid"]
        ref = api_pb2.Claim(namespace=NS, name=rec.name, uid=uid)
        socket = self.world.plugin_socket(rec.node)
        async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
            stub = api_pb2_grpc.DRAPluginStub(channel)
            answer = await stub.NodePrepareResources(
                api_pb2.NodePrepareResourcesRequest(claims=[ref]), timeout=45
            )
            result = answer.claims[uid]
            if result.error:
                rec.error = result.error
                return
            rec.cdi_ids = [i for d in result.devices for i in d.cdi_device_ids]
            rec.prepared = time.monotonic()
            await self.world.kube.patch(
                f"{PODS}/{rec.name}/status", {"status": {"phase": "Running"}}
            )
            await asyncio.sleep(self.rng.uniform(*self.lifetime))
            await stub.NodeUnprepareResources(
                api_pb2.NodeUnprepareResourcesRequest(claims=[ref]), timeout=45
            )
        await objects.finish(self.world.kube, rec.name)
        rec.finished = time.monotonic()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
