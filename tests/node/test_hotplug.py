"""Hot-plug events: real kernel uevents through the netlink monitor, and inotify on a synthetic
tree, both delivered on the event loop as PciEvents."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from agent.node.hotplug import KernelPciMonitor, PciEvent, TreePciWatcher
from agent.simulated.sysfs import add_function


def _writable_pci_uevent() -> str | None:
    base = Path("/sys/bus/pci/devices")
    if os.geteuid() != 0 or not base.is_dir():
        return None
    for dev in sorted(base.iterdir()):
        if os.access(dev / "uevent", os.W_OK):
            return dev.name
    return None


BDF = _writable_pci_uevent()


@pytest.mark.root
@pytest.mark.skipif(BDF is None, reason="needs root and a writable /sys/bus/pci/devices/*/uevent")
async def test_real_kernel_uevent_reaches_the_monitor() -> None:
    assert BDF is not None
    got: list[PciEvent] = []
    arrived = asyncio.Event()

    def on_event(ev: PciEvent) -> None:
        if ev.address == BDF:
            got.append(ev)
            arrived.set()

    monitor = KernelPciMonitor(on_event)
    monitor.start()
    try:
        sent = time.monotonic()
        Path(f"/sys/bus/pci/devices/{BDF}/uevent").write_text("change")  # noqa: ASYNC240
        await asyncio.wait_for(arrived.wait(), 5)
    finally:
        monitor.stop()
    (ev,) = got
    assert ev.action == "change"
    assert ev.properties["SUBSYSTEM"] == "pci"
    assert ev.properties["PCI_SLOT_NAME"] == BDF
    assert "SYNTH_UUID" in ev.properties  # a synthetic uevent, as written
    latency = ev.received - sent
    assert latency < 0.05, f"{latency * 1e3:.1f} ms from the write to the callback"


async def test_synthetic_tree_add_and_remove(tmp_path: Path) -> None:
    events: list[PciEvent] = []
    two = asyncio.Event()

    def on_event(ev: PciEvent) -> None:
        events.append(ev)
        if len(events) >= 2:
            two.set()

    watcher = TreePciWatcher(str(tmp_path), on_event)
    watcher.start()
    try:
        staging = tmp_path / "bus" / "pci" / "devices" / ".new-x"
        add_function(tmp_path, ".new-x")
        staging.rename(staging.with_name("0000:41:00.0"))  # appears whole, like the hook does
        await asyncio.sleep(0.05)
        import shutil

        shutil.rmtree(tmp_path / "bus" / "pci" / "devices" / "0000:41:00.0")
        await asyncio.wait_for(two.wait(), 5)
    finally:
        watcher.stop()
    assert [(e.action, e.address) for e in events] == [
        ("add", "0000:41:00.0"),
        ("remove", "0000:41:00.0"),
    ]
