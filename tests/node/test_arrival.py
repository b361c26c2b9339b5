"""A GPU's arrival on the node without a control plane: the reporter identifies a function the
fabric reported (PCI address, UUID from NVML, re-initialising NVML for a GPU it has not seen), and
when the function has not appeared, rescans as configured (never / always / auto)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.kube.resources import NODE_READY, RESOURCES
from agent.node import reporting
from agent.simulated.sysfs import add_function
from tests.node.simnode import SimNode, make_node
from tests.waiting import until

BDF = "0000:41:00.0"


@pytest.fixture
async def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SimNode]:
    n = make_node(tmp_path, monkeypatch)
    await n.reporter.nvml.start()
    try:
        yield n
    finally:
        await n.reporter.nvml.close()


async def online(node: SimNode, *, on_bus: bool = True, in_nvml: bool = True) -> str:
    """A resource the composer set Online, not yet NodeReady; its name."""
    cr = await node.attach("gpu-a", BDF, minor=0, on_bus=on_bus, in_nvml=in_nvml)
    name: str = cr["metadata"]["name"]

    def not_ready(o: dict[str, Any]) -> None:
        o["status"]["conditions"] = []
        o["status"]["device_id"] = ""

    obj = node.kube.edit(f"{RESOURCES}/{name}", not_ready)
    node.reporter.resources.store[("", name)] = obj or {}
    return name


def ready(node: SimNode, name: str) -> dict[str, Any] | None:
    obj = node.kube.get_obj(f"{RESOURCES}/{name}") or {}
    conds = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == NODE_READY), None)


async def test_a_gpu_nvml_saw_at_init_is_reported_with_its_uuid(node: SimNode) -> None:
    name = await online(node)
    await node.reporter.nvml.call(node.reporter.nvml.nvml.reinit)
    await node.reporter._handle(name)
    cond = ready(node, name)
    assert cond is not None
    assert cond["status"] == "True"
    obj = node.kube.get_obj(f"{RESOURCES}/{name}") or {}
    assert obj["status"]["device_id"] == node.gpus[0].uuid
    assert obj["status"]["pci_address"] == BDF


async def test_a_hot_added_gpu_is_found_by_an_nvml_reinit(node: SimNode) -> None:
    name = await online(node)  # NVML started before the GPU arrived
    await node.reporter._handle(name)
    obj = node.kube.get_obj(f"{RESOURCES}/{name}") or {}
    assert obj["status"]["device_id"] == node.gpus[0].uuid


async def test_a_function_nvml_never_knows_is_reported_without_uuid(node: SimNode) -> None:
    name = await online(node, in_nvml=False)
    await node.reporter._handle(name)
    cond = ready(node, name)
    assert cond is not None
    assert "UUID" not in cond["message"]


async def test_without_nvml_the_fabrics_uuid_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = make_node(tmp_path, monkeypatch)  # NVML never started
    name = await online(n)
    n.kube.edit(f"{RESOURCES}/{name}", lambda o: o["status"].update(device_id="GPU-fabric"))
    n.reporter.resources.store[("", name)] = n.kube.get_obj(f"{RESOURCES}/{name}") or {}
    await n.reporter._handle(name)
    cond = ready(n, name)
    assert cond is not None
    assert cond["message"].endswith("UUID GPU-fabric")


async def test_a_resource_gone_from_the_store_is_ignored(node: SimNode) -> None:
    await node.reporter._handle("no-such-resource")
    assert node.kube.count("patch", "composableresources/status") == 0


def rescan(node: SimNode, mode: str) -> Path:
    node.reporter.cfg = dataclasses.replace(node.reporter.cfg, rescan=mode, rescan_after=0.0)
    path = node.sysfs / "bus" / "pci" / "rescan"
    path.write_text("")
    return path


async def test_rescan_never_waits_for_the_hot_plug(node: SimNode) -> None:
    path = rescan(node, "never")
    name = await online(node, on_bus=False)
    await node.reporter._handle(name)
    assert path.read_text() == ""
    assert ready(node, name) is None
    assert name not in node.reporter._pending


async def test_rescan_always_writes_the_bus_rescan(node: SimNode) -> None:
    path = rescan(node, "always")
    name = await online(node, on_bus=False)
    await node.reporter._handle(name)
    assert path.read_text() == "1"
    assert name in node.reporter._pending  # looked at again after the rescan


async def test_rescan_auto_first_looks_again(node: SimNode) -> None:
    path = rescan(node, "auto")
    name = await online(node, on_bus=False)
    add_function(node.sysfs, BDF)  # it appears, but no event reached us
    await node.reporter._handle(name)
    assert path.read_text() == ""  # a scan found it: no rescan written
    assert name in node.reporter._pending


async def test_rescan_auto_writes_the_rescan_when_still_absent(node: SimNode) -> None:
    path = rescan(node, "auto")
    name = await online(node, on_bus=False)
    await node.reporter._handle(name)
    assert path.read_text() == "1"


async def test_no_rescan_file_no_retry(node: SimNode) -> None:
    rescan(node, "always").unlink()
    name = await online(node, on_bus=False)
    await node.reporter._handle(name)
    assert name not in node.reporter._pending


async def test_a_function_appearing_during_a_scan_is_not_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hot-plug event that arrives while a scan is under way (after it listed the tree) must
    lead to another scan before the resources are looked at: otherwise the resource is handled
    with the stale list and, with no rescan configured, waits for the next resync (minutes).
    Found as a flaky test_node_role (three GPUs arriving on two nodes at once)."""
    n = make_node(tmp_path, monkeypatch)
    name = await online(n, on_bus=False, in_nvml=False)
    n.reporter.resources.store.clear()
    real_scan = reporting.scanning.scan
    listed, release = threading.Event(), threading.Event()
    hold = threading.Event()  # armed: the next scan lists the tree, then waits for `release`

    def scan(root: str) -> Any:
        functions = real_scan(root)
        if hold.is_set():
            hold.clear()
            listed.set()
            release.wait(30)
        return functions

    monkeypatch.setattr(reporting.scanning, "scan", scan)
    task = asyncio.create_task(n.reporter.run())
    try:
        await until(lambda: _synced(n), what="the reporter's first pass")
        hold.set()
        add_function(n.sysfs, "0000:99:00.0")  # an unrelated arrival starts a scan
        await asyncio.to_thread(listed.wait, 30)
        add_function(n.sysfs, BDF)  # ours arrives while that scan is under way
        await until(lambda: _seen(n, BDF), what="the hot-plug event of ours")
        release.set()
        cond = await until(lambda: _ready(n, name), what="NodeReady", timeout=15)
        assert BDF in cond["message"]
    finally:
        release.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _synced(n: SimNode) -> bool:
    return n.reporter.resources.synced.is_set() and not n.reporter._rescan_wanted


async def _seen(n: SimNode, bdf: str) -> bool:
    return bdf in n.reporter.events_seen


async def _ready(n: SimNode, name: str) -> dict[str, Any] | None:
    return ready(n, name)
