"""A whole cluster-level world per test, on the session's real control plane: unique nodes, a
unique driver name (so tests never see each other's slices), the fabric emulator wired to those
nodes, the cluster role, and a stand-in for the node role that reports NodeReady/NodeReleased
(`agent.testing.nodereport`; the node-role, kubelet-plugin and full-stack tests run the real
node role instead)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent import settings
from agent.controllers import running
from agent.demo import objects
from agent.devcluster.controlplane import ControlPlane
from agent.fabric.credentials import Secret
from agent.fabric.emulator import config as emuconfig
from agent.fabric.emulator.config import DEFAULT_TENANT
from agent.fabric.emulator.server import EmulatorServer
from agent.fabric.fti import FtiFabric
from agent.fabric.protocol import FabricManager
from agent.fabric.redfish import RedfishFabric
from agent.fabric.transport import FabricHttp
from agent.kube.client import Kube, path_of
from agent.kube.resources import RESOURCES
from agent.manifests import installing
from agent.testing.nodereport import NodeDouble

PASSWORD = "cluster-test-pass-1"
A100 = "NVIDIA-A100-PCIE-40GB"
NS = "default"
CLAIMS = path_of(group="resource.k8s.io", version="v1", plural="resourceclaims", namespace=NS)
PODS = path_of(group="", version="v1", plural="pods", namespace=NS)
NODES = path_of(group="", version="v1", plural="nodes")


make_node = objects.make_node
finish = objects.finish


@dataclass
class World:
    kube: Kube
    emulator: EmulatorServer
    cfg: settings.Settings
    driver: str
    nodes: list[str]
    suffix: str
    backend: str = "redfish"
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    role: running.ClusterRole | None = None

    @property
    def device_class(self) -> str:
        return f"gpu.{self.driver}"

    def machine_of(self, node: str) -> str:
        return f"m-{node}"

    async def start_role(self, **build: Any) -> running.ClusterRole:
        """The cluster role over the emulator; `build`: more keywords for `running.build`."""
        http = FabricHttp(base_url=self.emulator.url, ca_bundle=str(self.emulator.ca_file))
        fabric: FabricManager
        if self.backend == "fti":
            fabric = FtiFabric(
                http,
                user="admin",
                password=Secret(PASSWORD),
                tenant=DEFAULT_TENANT,
                models=(A100,),
                poll_interval=0.5,
            )
        else:
            fabric = RedfishFabric(http, user="admin", password=Secret(PASSWORD), poll_interval=0.5)
        self.role = running.build(
            self.kube, fabric, self.cfg, identity=f"test-{self.suffix}", **build
        )
        self.tasks.append(asyncio.create_task(self.role.run()))
        return self.role

    async def claim_and_pod(
        self, name: str, model: str = A100, *, prefer_attached: bool = False
    ) -> None:
        await objects.submit(
            self.kube,
            name,
            self.driver,
            model,
            {"test-world": self.suffix},
            prefer_attached=prefer_attached,
        )


def world_config(driver: str, suffix: str, **cluster: Any) -> settings.Settings:
    return settings.Settings(
        cluster=settings.ClusterSettings(driver=driver, **cluster),
        leader=settings.LeaderSettings(name=f"lease-{suffix}"),
    )


#: The fabric backends the cluster tier runs on: a module opts in to both with
#: `pytest.mark.parametrize("backend", BACKENDS, indirect=True)`.
BACKENDS = ["redfish", "fti"]


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """Which fabric-manager protocol the world's cluster role speaks to the emulator (the
    emulator serves both over one state): "redfish" unless a module asks for both."""
    return str(getattr(request, "param", "redfish"))


def backend_args(backend: str) -> list[str]:
    """The `cohdi-agent run` flags that select `backend` against the emulator."""
    if backend == "fti":
        return [
            "--fabric-backend",
            "fti",
            "--fabric-tenant",
            DEFAULT_TENANT,
            "--fabric-models",
            A100,
        ]
    return ["--fabric-backend", "redfish"]


@pytest.fixture
async def world(
    control_plane: ControlPlane,
    kube: Kube,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
) -> AsyncIterator[World]:
    params: dict[str, Any] = getattr(request, "param", {})
    suffix = uuid.uuid4().hex[:6]
    driver = f"t{suffix}.cohdi.io"
    nodes = [f"n{suffix}-{i}" for i in range(params.get("nodes", 4))]
    await installing.install(kube, driver)
    for node in nodes:
        await make_node(kube, node, {"test-world": suffix, **params.get("node_labels", {})})
    conf = emuconfig.parse(
        {
            "machines": [{"id": f"m-{n}", "name": n, "fabric": f"fab-{suffix}"} for n in nodes],
            "devices": [
                {
                    "model": A100,
                    "count": params.get("gpus", 24),
                    "fabric": f"fab-{suffix}",
                    "memory": 40 * 2**30,
                    "attach_latency": params.get("latency", 0.0),
                }
            ],
            "users": [{"name": "admin", "password": PASSWORD}],
        }
    )
    emulator = EmulatorServer(conf, tls_dir=tmp_path / "tls", state_file=tmp_path / "fabric.json")
    await emulator.start()
    cfg = world_config(
        driver,
        suffix,
        idle_grace=params.get("idle_grace", 300.0),
        claim_deadline=params.get("claim_deadline", 60.0),
        scale_down_settle=params.get("settle", 5.0),
        warm_devices=params.get("warm", 0),
    )
    w = World(kube, emulator, cfg, driver, nodes, suffix, backend=backend)
    if params.get("double", True):
        double = NodeDouble(kube, set(nodes))
        w.tasks.append(asyncio.create_task(double.run()))
    try:
        yield w
    finally:
        for t in w.tasks:
            t.cancel()
        await asyncio.gather(*w.tasks, return_exceptions=True)
        if w.role is not None:
            await w.role.fabric.close()
        await emulator.stop()
        await _cleanup(kube, w)


async def _cleanup(kube: Kube, w: World) -> None:
    with contextlib.suppress(Exception):
        for claim in (await kube.get(CLAIMS))["items"]:
            if w.suffix in claim["metadata"]["name"]:
                await kube.delete(f"{CLAIMS}/{claim['metadata']['name']}")
    with contextlib.suppress(Exception):
        for pod in (await kube.get(PODS, labelSelector=""))["items"]:
            if pod["spec"].get("nodeSelector", {}).get("test-world") == w.suffix:
                await kube.delete(f"{PODS}/{pod['metadata']['name']}")
    with contextlib.suppress(Exception):
        for obj in (await kube.get(RESOURCES))["items"]:
            name = obj["metadata"]["name"]
            if obj["spec"].get("target_node") in w.nodes:
                await kube.patch(f"{RESOURCES}/{name}", {"metadata": {"finalizers": None}})
                with contextlib.suppress(Exception):
                    await kube.delete(f"{RESOURCES}/{name}")
    for node in w.nodes:
        with contextlib.suppress(Exception):
            await kube.delete(f"{NODES}/{node}")
