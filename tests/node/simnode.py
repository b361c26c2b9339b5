"""A node for fast plugin and reporter tests, without a control plane: the in-memory API server
(`FakeKube`), the real `NodeReporter` over a synthetic sysfs tree and the stub NVML, and helpers
that attach a GPU the way the fabric and the node role would (a PCI function in the tree, a GPU in
NVML's list, a ComposableResource the node reported `NodeReady` on) and create a ResourceClaim the
way the scheduler allocates it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import app, settings
from agent.kube.client import path_of
from agent.kube.resources import NODE_READY, RESOURCES, resource_name
from agent.model.pool import device_name
from agent.node.plugin import Preparer
from agent.node.reporting import NodeReporter
from agent.simulated import stubnvml
from agent.simulated.stubnvml import StubGpu, write_gpus
from agent.simulated.sysfs import add_function
from agent.testing.fakekube import FakeKube
from tests.waiting import until

DRIVER = "composable.cohdi.io"
POOL = "fab-1"
NS = "default"
CLAIMS = path_of(group="resource.k8s.io", version="v1", plural="resourceclaims", namespace=NS)
Obj = dict[str, Any]


def stub_library() -> Path:
    return stubnvml.build(settings.Settings().cache_dir)


@dataclass
class SimNode:
    kube: FakeKube
    reporter: NodeReporter
    root: Path
    gpus_file: Path
    name: str = "node-1"
    gpus: list[StubGpu] = field(default_factory=list)

    @property
    def sysfs(self) -> Path:
        return self.root / "sys"

    def preparer(self, plugin_dir: Path | None = None, cdi_dir: Path | None = None) -> Preparer:
        return Preparer(
            self.kube,
            driver=DRIVER,
            reporter=self.reporter,
            plugin_dir=plugin_dir or self.root / "plugin",
            cdi_dir=cdi_dir or self.root / "cdi",
        )

    async def attach(
        self,
        fabric_id: str,
        bdf: str,
        *,
        minor: int,
        driver: str = "nvidia",
        iommu_group: int = 42,
        in_nvml: bool = True,
        on_bus: bool = True,
    ) -> Obj:
        """A GPU the fabric attached to this node and the node saw: returns its
        ComposableResource (status Online, NodeReady, its PCI address and UUID)."""
        gpu_uuid = f"GPU-{uuid.uuid4()}"
        if on_bus:
            add_function(self.sysfs, bdf, driver=driver, iommu_group=iommu_group)
        if in_nvml:
            self.gpus.append(StubGpu(gpu_uuid, "NVIDIA A100-PCIE-40GB", bdf, 40 * 2**30, minor))
            write_gpus(self.gpus_file, self.gpus)
        cr = self.kube.add(
            RESOURCES,
            {
                "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
                "kind": "ComposableResource",
                "metadata": {"name": resource_name(fabric_id)},
                "spec": {"type": "gpu", "model": "A100", "target_node": self.name},
                "status": {
                    "state": "Online",
                    "cdi_device_id": fabric_id,
                    "device_id": gpu_uuid,
                    "pci_address": bdf,
                    "conditions": [{"type": NODE_READY, "status": "True", "reason": "Seen"}],
                },
            },
        )
        self.reporter.resources.store[("", cr["metadata"]["name"])] = cr
        await self.reporter._scan()
        return cr

    def processes(self, bdf: str, pids: list[int]) -> None:
        """The compute processes NVML reports on the GPU at `bdf` from now on (live)."""
        self.gpus = [
            dataclasses.replace(g, processes=tuple((p, 2**30) for p in pids))
            if g.bus_id == bdf
            else g
            for g in self.gpus
        ]
        write_gpus(self.gpus_file, self.gpus)

    def claim(self, name: str, fabric_ids: list[str], *, driver: str = DRIVER) -> Obj:
        """A ResourceClaim the scheduler allocated: one request `gpu-<i>` per device."""
        return self.kube.add(
            CLAIMS,
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "ResourceClaim",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"devices": {"requests": []}},
                "status": {
                    "allocation": {
                        "devices": {
                            "results": [
                                {
                                    "request": f"gpu-{i}",
                                    "driver": driver,
                                    "pool": POOL,
                                    "device": device_name(f),
                                }
                                for i, f in enumerate(fabric_ids)
                            ]
                        }
                    }
                },
            },
        )


def make_node(
    tmp_path: Path, monkeypatch: Any, *, name: str = "node-1", proc_root: str = "/proc"
) -> SimNode:
    """A node over `tmp_path`; the caller starts its NVML (`await n.reporter.nvml.start()`) after
    attaching what NVML must see at init, and closes it (`await n.reporter.nvml.close()`)."""
    gpus_file = tmp_path / "nvml-gpus"
    write_gpus(gpus_file, [])
    monkeypatch.setenv("STUB_NVML_GPUS", str(gpus_file))
    kube = FakeKube()
    cfg = settings.NodeSettings(
        sysfs_root=str(tmp_path / "sys"), nvml_path=str(stub_library()), rescan="never"
    )
    (tmp_path / "sys" / "bus" / "pci" / "devices").mkdir(parents=True)
    reporter = NodeReporter(
        kube,
        cfg,
        node=name,
        dev_root=str(tmp_path / "dev"),
        proc_root=proc_root,
    )
    return SimNode(kube, reporter, tmp_path, gpus_file, name)


def make_node_role(
    root: Path, *, driver: str = DRIVER, vendor_driver: str = "", **node: Any
) -> app._NodeRole:
    """The real node role (`cohdi-agent run --roles node`'s unit), not started, over an empty
    synthetic PCI tree under `root` (short: unix socket paths hold 107 bytes), on the in-memory
    API server, without NVML. `node`: more NodeSettings."""
    (root / "sys" / "bus" / "pci" / "devices").mkdir(parents=True, exist_ok=True)
    kube = FakeKube(bookmark_interval=60)
    kube.selectable("composableresources", "spec.target_node")
    cfg = settings.Settings(
        cluster=settings.ClusterSettings(driver=driver, vendor_driver=vendor_driver),
        node=settings.NodeSettings(
            name="node-0",
            sysfs_root=str(root / "sys"),
            nvml_path=str(root / "no-nvml.so"),
            rescan="never",
            kubelet_dir=str(root / "kubelet"),
            cdi_dir=str(root / "cdi"),
            **node,
        ),
    )
    return app._NodeRole(kube, cfg)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def node_role(
    root: Path, *, driver: str = DRIVER, vendor_driver: str = "", **node: Any
) -> AsyncIterator[app._NodeRole]:
    """`make_node_role`'s role, yielded once its first scan is done and its plugin serves (none
    runs with a `vendor_driver`), and cancelled after."""
    role = make_node_role(root, driver=driver, vendor_driver=vendor_driver, **node)
    task = asyncio.create_task(role.run())
    try:

        async def started() -> bool:
            reporter = role.reporter
            scanned = reporter is not None and reporter.scanned.is_set()
            return scanned and (role.plugin_serving or bool(vendor_driver))

        await until(started, what="the first scan done and the plugin serving", timeout=10)
        yield role
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
