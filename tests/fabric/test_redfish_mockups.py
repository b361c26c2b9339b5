"""The redfish backend against DMTF's reference data: the emulator serves each of DMTF's three
composition mockups (`public-composability`, `public-compose-action`, `public-cxl`) as its
initial state, with live sessions, ETags, composition actions and task monitors; the backend's
inventory, attach and detach run against it, and so does the whole cluster role on the in-memory
API server (`FakeKube`): only GPU/accelerator blocks are offered, named by their Processor's
model, every slice is valid, and the role stays up and ready."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent import errors, settings
from agent.controllers import running
from agent.fabric.emulator.server import EmulatorServer
from agent.fabric.redfish import RedfishFabric
from agent.model.fabric import DeviceId, DeviceState, MachineId
from agent.testing.fakekube import FakeKube
from tests.fabric.conftest import MOCKUPS, admin, make_client, mockup_config, serving
from tests.fabric.test_clients import attached
from tests.waiting import until

pytestmark = pytest.mark.skipif(not MOCKUPS.is_dir(), reason=f"no DMTF mockups at {MOCKUPS}")

GPU_MODEL = "Contoso Workstation VID2000"
DRIVER = "gpu.mockup.cohdi.io"


@contextlib.asynccontextmanager
async def mockup_client(
    name: str, tmp_path: Path, **options: Any
) -> AsyncIterator[tuple[EmulatorServer, RedfishFabric]]:
    async with serving(mockup_config(MOCKUPS / name, **options), tmp_path) as server:
        fabric = make_client(server, "redfish")
        assert isinstance(fabric, RedfishFabric)
        fabric.poll_interval = 0.1
        try:
            yield server, fabric
        finally:
            await fabric.close()


# --- the backend ---------------------------------------------------------------------------------


@pytest.mark.parametrize("expand", [True, False])
async def test_composability_offers_its_gpu_block_only(tmp_path: Path, expand: bool) -> None:
    """12 blocks (compute, drive, network, system, one offload processor): one device, the GPU,
    with its Processor's model and vendor, in its zone; every system in a zone is a machine of
    that zone, and the one in no zone is left out. The same with and without `$expand`."""
    async with mockup_client("public-composability", tmp_path) as (server, fabric):
        if not expand:
            await admin(server, "PUT", "/faults", {"expand_unsupported": True})
        inv = await fabric.inventory()
        assert [(d.id, d.model, d.vendor, d.fabric, d.state) for d in inv.devices] == [
            ("OffloadBlock9", GPU_MODEL, "Contoso Graphics", "2", DeviceState.FREE)
        ]
        assert {m.id: m.fabric for m in inv.machines} == {
            "ComposedSystem": "1",
            "ComposedSystem2": "2",
            "SystemAfterResourceBlock": "3",
            "SystemAfterAddResourceAction": "3",
        }
        assert {m.id: m.node_name for m in inv.machines}["ComposedSystem2"] == "composed-system"
        assert len(server.state.devices) > 1, "the emulator composes other blocks too"


async def test_composability_attach_and_detach_through_task_monitors(tmp_path: Path) -> None:
    """The GPU block composed to the system of its zone and back, each through a 202 and a task
    monitor (0.3 s composition latency); the system's Links.ResourceBlocks follows."""
    async with mockup_client(
        "public-composability", tmp_path, attach_latency=0.3, detach_latency=0.3
    ) as (server, fabric):
        dev = await fabric.attach(DeviceId("OffloadBlock9"), MachineId("ComposedSystem2"))
        assert (dev.state, dev.machine, dev.model) == (
            DeviceState.ATTACHED,
            "ComposedSystem2",
            GPU_MODEL,
        )
        assert attached(server)["OffloadBlock9"] == "ComposedSystem2"
        assert any(t.operation == "attach" for t in server.state.tasks.values())
        system = await fabric._get_json("/redfish/v1/Systems/ComposedSystem2")
        links = [r["@odata.id"] for r in system["Links"]["ResourceBlocks"]]
        assert "/redfish/v1/CompositionService/ResourceBlocks/OffloadBlock9" in links
        assert "/redfish/v1/CompositionService/ResourceBlocks/ComputeBlock2" in links
        inv = await fabric.inventory()
        listed = inv.device("OffloadBlock9")
        assert listed is not None
        assert (listed.state, listed.machine) == (DeviceState.ATTACHED, "ComposedSystem2")

        gone = await fabric.detach(DeviceId("OffloadBlock9"))
        assert (gone.state, gone.machine) == (DeviceState.FREE, None)
        assert "OffloadBlock9" not in attached(server)
        assert all(t.state == "Completed" for t in server.state.tasks.values())


async def test_composability_refuses_a_system_of_another_zone(tmp_path: Path) -> None:
    async with mockup_client("public-composability", tmp_path) as (server, fabric):
        with pytest.raises(errors.FabricRejected, match="zone"):
            await fabric.attach(DeviceId("OffloadBlock9"), MachineId("ComposedSystem"))
        assert "OffloadBlock9" not in attached(server)
        with pytest.raises(errors.DeviceNotFound, match="not a pooled device"):
            await fabric.attach(DeviceId("DriveBlock7"), MachineId("ComposedSystem2"))
        assert "DriveBlock7" not in attached(server)


async def test_compose_action_offers_nothing_and_lists_its_systems(tmp_path: Path) -> None:
    """Compute, storage and NVMe blocks only: no device; each server is a machine of its own
    zone (DMTF's documents have Ids that differ from their URIs: the URI is the id)."""
    async with mockup_client("public-compose-action", tmp_path) as (_server, fabric):
        inv = await fabric.inventory()
        assert inv.devices == ()
        fabrics = {m.id: m.fabric for m in inv.machines}
        assert fabrics["BladeServer-1"] == "BladeServer-1"
        assert fabrics["RackServer-1"] == "RackServer-1"
        assert fabrics["RackServer-3"] == "Appliance"
        assert len(inv.machines) == 8


async def test_cxl_without_a_composition_service_says_so_and_keeps_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CXL fabric (Fabrics, Connections) and no CompositionService: no device, its system a
    machine of one implicit fabric named after the service, and a warning that says what to
    configure — then the watch keeps polling."""
    caplog.set_level(logging.INFO)
    async with mockup_client("public-cxl", tmp_path) as (server, fabric):
        inv = await fabric.inventory()
        assert inv.devices == ()
        host = server.url.removeprefix("https://")
        assert [(m.id, m.fabric) for m in inv.machines] == [("CXL-System", host)]
        assert "no CompositionService" in caplog.text
        assert "DSP2050" in caplog.text
        assert "no resource zones" in caplog.text
        watch = fabric.watch()
        first = await anext(watch)
        assert first.devices == ()
        assert fabric.link.up


# --- the cluster role on DMTF's data -------------------------------------------------------------

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = rf"{_LABEL}(\.{_LABEL})*"
_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_C_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def slice_problems(spec: dict[str, Any]) -> list[str]:
    """What the API server would refuse in a ResourceSlice spec (resource.k8s.io/v1 validation,
    the rules this test relies on, written from k8s.io/kubernetes pkg/apis/resource/validation
    independently of the code under test)."""
    out = []
    pool = spec.get("pool") or {}
    name = pool.get("name", "")
    if not (0 < len(name) <= 253 and re.fullmatch(rf"{_SUBDOMAIN}(/{_SUBDOMAIN})*", name)):
        out.append(f"pool.name {name!r}")
    if not re.fullmatch(_SUBDOMAIN, spec.get("driver", "")) or len(spec["driver"]) > 63:
        out.append(f"driver {spec.get('driver')!r}")
    if pool.get("resourceSliceCount", 0) < 1 or pool.get("generation", -1) < 0:
        out.append(f"pool counts {pool}")
    chosen = [
        k for k in ("nodeName", "nodeSelector", "allNodes", "perDeviceNodeSelection") if spec.get(k)
    ]
    if len(chosen) != 1:
        out.append(f"exactly one node choice, got {chosen}")
    devices = spec.get("devices") or []
    if len(devices) > 128:
        out.append(f"{len(devices)} devices")
    names = [d.get("name", "") for d in devices]
    if len(set(names)) != len(names):
        out.append(f"duplicate device names {names}")
    for d in devices:
        if not (len(d["name"]) <= 63 and re.fullmatch(_LABEL, d["name"])):
            out.append(f"device name {d['name']!r}")
        for key, value in (d.get("attributes") or {}).items():
            if not re.fullmatch(_C_IDENT, key.rsplit("/", 1)[-1]) or len(key) > 63 + 1 + 253:
                out.append(f"attribute name {key!r}")
            if len(value) != 1:
                out.append(f"attribute {key} has {sorted(value)}")
            if "string" in value and len(value["string"].encode()) > 64:
                out.append(f"attribute {key} longer than 64 bytes")
        node = d.get("nodeName")
        if node is not None and not re.fullmatch(_SUBDOMAIN, node):
            out.append(f"nodeName {node!r}")
        for term in (d.get("nodeSelector") or {}).get("nodeSelectorTerms") or []:
            for expr in term.get("matchExpressions") or []:
                for v in expr.get("values") or []:
                    if not (len(v) <= 63 and re.fullmatch(_VALUE, v)):
                        out.append(f"node selector value {v!r}")
        chosen = [k for k in ("nodeName", "nodeSelector", "allNodes") if d.get(k)]
        if spec.get("perDeviceNodeSelection") and len(chosen) != 1:
            out.append(f"device {d['name']}: exactly one node choice, got {chosen}")
    return out


@pytest.mark.parametrize(
    ("mockup", "models"),
    [
        ("public-composability", [GPU_MODEL]),
        ("public-compose-action", []),
        ("public-cxl", []),
    ],
)
async def test_the_cluster_role_publishes_valid_slices_and_stays_up(
    tmp_path: Path, mockup: str, models: list[str]
) -> None:
    async with mockup_client(mockup, tmp_path) as (_server, fabric):
        inv = await fabric.inventory()
        kube = FakeKube(bookmark_interval=60)
        kube.selectable("composableresources", "spec.target_node")
        for node in sorted({m.node_name.lower() for m in inv.machines}):
            if re.fullmatch(_SUBDOMAIN, node):  # DMTF's host names are not all node names
                kube.add(
                    "/api/v1/nodes",
                    {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "labels": {}}},
                )
        cfg = settings.Settings(cluster=settings.ClusterSettings(driver=DRIVER))
        role = running.build(kube, fabric, cfg, identity="mockup-test")
        task = asyncio.create_task(role.run())
        try:
            pools = {m.fabric for m in inv.machines}

            def published() -> list[dict[str, Any]]:
                return [s["spec"] for s in kube.objects("resourceslices")]

            async def every_pool() -> bool:
                return len({s["pool"]["name"] for s in published()}) == len(pools)

            await until(every_pool, what="a slice for every fabric", timeout=20, interval=0.05)

            async def ready() -> bool:
                return not role.not_ready()

            await until(ready, what="the cluster role ready", timeout=20, interval=0.05)
            problems = [p for spec in published() for p in slice_problems(spec)]
            assert problems == []
            offered = [d for spec in published() for d in spec.get("devices") or []]
            assert [d["attributes"]["productName"]["string"] for d in offered] == models
            await asyncio.sleep(3 * fabric.poll_interval)  # a few polls later: still up
            assert not task.done(), task.exception() if task.done() else ""
            assert not role.not_ready()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
