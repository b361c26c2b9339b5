"""The node role and a GPU CoHDI attached before the switch: CoHDI's operator records the GPU's UUID
(`status.device_id`) but not where it sits (no `status.pci_address`) and writes no `NodeReady`.
The node finds it by its UUID (NVML), reports it, and — when it is deleted before that — reports
it first, then releases it safely (busy: refused), instead of never answering."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.kube.resources import FINALIZER, NODE_READY, NODE_RELEASED, RESOURCES
from agent.model.composing import ADOPTED_ANNOTATION
from tests.node.simnode import SimNode, make_node

BDF = "0000:41:00.0"


@pytest.fixture
async def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SimNode]:
    (tmp_path / "proc").mkdir()
    (tmp_path / "dev").mkdir()
    n = make_node(tmp_path, monkeypatch, proc_root=str(tmp_path / "proc"))
    await n.reporter.nvml.start()
    try:
        yield n
    finally:
        await n.reporter.nvml.close()


async def adopted(node: SimNode, *, upper: bool = False) -> str:
    """A GPU on the node (PCI function, NVML) whose resource is in CoHDI's shape, adopted Online:
    UUID and fabric id only, no PCI address, no conditions. Its name."""
    cr = await node.attach("gpu-a", BDF, minor=3)
    name: str = cr["metadata"]["name"]
    (node.root / "dev" / "nvidia3").write_text("")

    def cohdi_shape(o: dict[str, Any]) -> None:
        o["metadata"]["annotations"] = {ADOPTED_ANNOTATION: "Online"}
        o["metadata"]["finalizers"] = [FINALIZER]
        uuid = o["status"]["device_id"]
        o["status"] = {
            "state": "Online",
            "device_id": uuid.upper() if upper else uuid,
            "cdi_device_id": "gpu-a",
        }

    obj = node.kube.edit(f"{RESOURCES}/{name}", cohdi_shape)
    node.reporter.resources.store[("", name)] = obj or {}
    return name


def conditions(node: SimNode, name: str) -> dict[str, dict[str, Any]]:
    obj = node.kube.get_obj(f"{RESOURCES}/{name}") or {}
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def refresh(node: SimNode, name: str) -> None:
    """The reporter's informer catches up with the object."""
    obj = node.kube.get_obj(f"{RESOURCES}/{name}")
    assert obj is not None
    node.reporter.resources.store[("", name)] = obj


@pytest.mark.parametrize("upper", [False, True], ids=["as-nvml", "upper-case"])
async def test_an_adopted_gpu_is_found_by_its_uuid(node: SimNode, upper: bool) -> None:
    name = await adopted(node, upper=upper)
    await node.reporter._handle(name)
    assert conditions(node, name)[NODE_READY]["status"] == "True"
    obj = node.kube.get_obj(f"{RESOURCES}/{name}") or {}
    assert obj["status"]["pci_address"] == BDF


async def test_an_adopted_gpu_deleted_before_it_was_reported_is_reported_then_released(
    node: SimNode,
) -> None:
    name = await adopted(node)
    node.processes(BDF, [4242])
    node.kube.remove(f"{RESOURCES}/{name}")  # the finalizer holds it: deleting
    refresh(node, name)
    await node.reporter._handle(name)
    assert conditions(node, name)[NODE_READY]["status"] == "True"
    refresh(node, name)
    await node.reporter._handle(name)
    released = conditions(node, name)[NODE_RELEASED]
    assert (released["status"], released["reason"]) == ("False", "Busy"), "a process uses it"
    node.processes(BDF, [])
    refresh(node, name)
    await node.reporter._handle(name)
    assert conditions(node, name)[NODE_RELEASED]["status"] == "True"
