"""What a cluster benchmark runs against.

- `embedded(...)`: on the suite's local control plane, a world of its own — a driver name, four
  Nodes, the fabric emulator (zero injected attach latency) with the Nodes' machines and a pool
  of GPUs, and either the agent's cluster role with the node-report stand-in (`mode="agent"`)
  or the floor (`mode="floor"`: the pool published, then bench.apichain's raw API chain);
  `stop()` removes everything it made, so the next benchmark starts from the same cluster.
- `deployed(...)`: a cluster given with --kubeconfig, measured from outside: the agent that
  runs there (its driver name, a model its pool offers) does the work; the benchmark only
  submits pods and watches.

Either way a ClaimClock times every claim, and `submit`/`finish` make and end its pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from agent import errors, settings
from agent.controllers import running
from agent.controllers.publishing import NODES, SLICES, Publisher
from agent.demo import objects
from agent.fabric.credentials import Secret
from agent.fabric.emulator import config as emuconfig
from agent.fabric.emulator.server import EmulatorServer
from agent.fabric.protocol import FabricManager
from agent.fabric.redfish import RedfishFabric
from agent.fabric.transport import FabricHttp
from agent.kube.client import Kube
from agent.kube.resources import GROUP, RESOURCES, VERSION
from agent.kube.watching import Informer
from agent.manifests import installing
from agent.testing.nodereport import NodeDouble
from bench.apichain import ApiChain
from bench.harness import CLAIMS, PODS, ClaimClock, bounded

PASSWORD = "bench-emulator-pass-1"  # noqa: S105 -- a throwaway emulator user on loopback
MODEL = "BENCH-GPU"
Mode = Literal["agent", "floor", "deployed"]


class TimedEmulator(EmulatorServer):
    """The emulator, recording each request it serves: (method, path, started, seconds) with
    `started` in perf_counter seconds — how long the fabric's side of a read took."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.served: list[tuple[str, str, float, float]] = []

    def app(self) -> web.Application:
        app = super().app()

        @web.middleware
        async def timed(request: web.Request, handler: Any) -> web.StreamResponse:
            t0 = time.perf_counter()
            try:
                return await handler(request)  # type: ignore[no-any-return]
            finally:
                self.served.append((request.method, request.path_qs, t0, time.perf_counter() - t0))

        app.middlewares.insert(0, timed)
        return app


def emulator(
    tag: str, nodes: list[str], devices: int, tmp: Path, *, model: str = MODEL
) -> TimedEmulator:
    """The fabric emulator over HTTPS: one machine per node (`m-<node>`), `devices` GPUs of
    `model` on one fabric, zero injected attach latency."""
    conf = emuconfig.parse(
        {
            "machines": [{"id": f"m-{n}", "name": n, "fabric": f"{tag}-fab"} for n in nodes],
            "devices": [{"model": model, "count": devices, "fabric": f"{tag}-fab"}],
            "users": [{"name": "admin", "password": PASSWORD}],
        }
    )
    return TimedEmulator(conf, tls_dir=tmp / f"{tag}-tls")


def redfish(em: EmulatorServer) -> RedfishFabric:
    http = FabricHttp(base_url=em.url, ca_bundle=str(em.ca_file), concurrency=256)
    return RedfishFabric(http, user="admin", password=Secret(PASSWORD), poll_interval=1.0)


@dataclass
class World:
    kube: Kube
    mode: Mode
    driver: str
    model: str
    clock: ClaimClock
    nodes: list[str] = field(default_factory=list)
    emulator: EmulatorServer | None = None
    fabric: FabricManager | None = None
    role: running.ClusterRole | None = None
    chain: ApiChain | None = None
    publisher: Publisher | None = None
    #: fabric device id -> seconds its attach took in the emulator (attach call → device there)
    attach_s: dict[str, float] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @property
    def embedded(self) -> bool:
        return self.mode != "deployed"

    async def submit(self, name: str) -> None:
        self.names.append(name)
        self.clock.submitted[name] = time.perf_counter()
        await objects.submit(self.kube, name, self.driver, self.model)

    async def finish(self, names: list[str]) -> None:
        """End the pods: on the local control plane do kubelet's and the controller-manager's
        part (objects.finish); on a real cluster delete pod and claim and let them."""
        if self.embedded:
            await bounded((objects.finish(self.kube, n) for n in names), 16)
            return

        async def gone(name: str) -> None:
            for path in (f"{PODS}/{name}", f"{CLAIMS}/{name}"):
                with contextlib.suppress(errors.KubeNotFound):
                    await self.kube.delete(path)

        await bounded((gone(n) for n in names), 16)

    def attach_time(self, claim: str) -> float | None:
        """Seconds the fabric emulator spent attaching this claim's device (None when unknown:
        a warm claim, or a real fabric)."""
        pool_device = self.clock.device.get(claim)
        if pool_device is None:
            return None
        pub = self.role.publisher if self.role else self.publisher
        device = pub.device_id_of(*pool_device) if pub else None
        return self.attach_s.get(device or "")

    async def stop(self) -> None:
        """Stop what runs and remove what this world made (on a real cluster: its pods and
        claims only)."""
        with contextlib.suppress(Exception):
            await self.finish([n for n in self.names])
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.clock.stop()
        try:
            if self.embedded:
                await self._remove_everything()
        finally:
            if self.fabric is not None:
                await self.fabric.close()
            if self.emulator is not None:
                await self.emulator.stop()
            await self.kube.close()

    async def _remove_everything(self) -> None:
        if self.chain is not None:
            await self.chain.clean_up()
        mine = set(self.nodes)
        resources = await self.kube.get(RESOURCES)
        for cr in resources["items"]:
            if cr["spec"].get("target_node") in mine:
                name = cr["metadata"]["name"]
                with contextlib.suppress(errors.KubeNotFound):
                    await self.kube.patch(f"{RESOURCES}/{name}", {"metadata": {"finalizers": None}})
                    await self.kube.delete(f"{RESOURCES}/{name}")
        await self.kube.request(
            "DELETE", SLICES, params={"fieldSelector": f"spec.driver={self.driver}"}
        )
        for n in self.nodes:
            with contextlib.suppress(errors.KubeNotFound):
                await self.kube.delete(f"{NODES}/{n}")
        with contextlib.suppress(errors.KubeNotFound):
            await self.kube.delete(f"/apis/resource.k8s.io/v1/deviceclasses/gpu.{self.driver}")


async def _warm_up_crd(kube: Kube) -> None:
    """The first object of a freshly established CRD costs the API server ~2 s (its storage is
    set up lazily); a real cluster pays that once at install time, so pay it before measuring."""
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ComposableResource",
        "metadata": {"name": "bench-warm-up"},
        "spec": {"type": "gpu", "model": "x", "target_node": "none"},
    }
    with contextlib.suppress(errors.KubeAlreadyExists):
        await kube.create(RESOURCES, body)
    with contextlib.suppress(errors.KubeNotFound):
        await kube.delete(f"{RESOURCES}/bench-warm-up")


async def embedded(
    kubeconfig: str,
    tmp: Path,
    *,
    tag: str,
    devices: int,
    mode: Literal["agent", "floor"],
    nodes: int = 4,
    cluster: dict[str, Any] | None = None,
) -> World:
    """A world on the local control plane (see the module docstring). `cluster`: overrides of
    the cluster role's settings (agent.settings.ClusterSettings fields)."""
    kube = await Kube.connect(kubeconfig=kubeconfig)
    driver = f"{tag}.bench.cohdi.io"
    names = [f"{tag}-node-{i}" for i in range(nodes)]
    await installing.install(kube, driver)
    await _warm_up_crd(kube)
    await bounded((objects.make_node(kube, n, pods=1000) for n in names), 8)
    em = emulator(tag, names, devices, tmp)
    await em.start()
    world = World(kube, mode, driver, MODEL, ClaimClock(kube, driver), names, em, redfish(em))
    _time_attaches(em, world.attach_s)
    assert world.fabric is not None
    if mode == "agent":
        cfg = settings.Settings(
            cluster=settings.ClusterSettings(
                driver=driver, workers=256, idle_grace=3600.0, **(cluster or {})
            )
        )
        world.role = running.build(kube, world.fabric, cfg, identity=f"bench-{tag}")
        world.tasks += [
            asyncio.create_task(world.role.run()),
            asyncio.create_task(NodeDouble(kube, set(names)).run()),
        ]
        await asyncio.wait_for(world.role.publisher.synced.wait(), 120)
    else:
        slices = Informer(kube, SLICES, name="floor-slices", field_selector=f"spec.driver={driver}")
        node_informer = Informer(kube, NODES, name="floor-nodes")
        world.publisher = Publisher(kube, driver=driver, slices=slices, nodes=node_informer)
        world.chain = ApiChain(kube, driver=driver, publisher=world.publisher)
        world.tasks += [
            asyncio.create_task(slices.run()),
            asyncio.create_task(node_informer.run()),
            asyncio.create_task(world.publisher.run()),
            asyncio.create_task(world.chain.run()),
        ]
        world.publisher.update_inventory(await world.fabric.inventory())
        await world.publisher.flush()
        await world.chain.synced()
    await world.clock.start()
    return world


async def deployed(kubeconfig: str, *, driver: str, model: str) -> World:
    """A cluster given with --kubeconfig, with its own agent publishing `driver`'s pool."""
    kube = await Kube.connect(kubeconfig=kubeconfig)
    world = World(kube, "deployed", driver, model, ClaimClock(kube, driver))
    await world.clock.start()
    return world


def _time_attaches(em: EmulatorServer, into: dict[str, float]) -> None:
    """Record, per device, the emulator's own attach time: from the attach call it served to
    the device appearing on the machine."""
    started: dict[str, float] = {}
    original = em.state.attach

    def timed(device_id: str, machine_id: str) -> Any:
        started.setdefault(device_id, time.perf_counter())
        return original(device_id, machine_id)

    em.state.attach = timed  # type: ignore[method-assign]
    em.state.on_appear.append(
        lambda d, _m: (
            into.__setitem__(d.spec.id, time.perf_counter() - started[d.spec.id])
            if d.spec.id in started
            else None
        )
    )
