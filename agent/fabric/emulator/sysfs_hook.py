"""The appear/disappear hook for simulated nodes: when the emulator attaches a GPU to a machine,
write the PCI function into that machine's synthetic sysfs tree (and the GPU into its stub-NVML
list), so the node role — hot-plug watch, native scan, NVML — runs unchanged against it. Detach
removes both. Writes are atomic (temp + rename), the directory appears last.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from agent.fabric.emulator.config import MachineSpec
from agent.fabric.emulator.state import Device
from agent.files import write_atomic
from agent.simulated.stubnvml import StubGpu

PCI_CLASS_3D_CONTROLLER = "0x030200"


class SysfsHook:
    """`roots(machine)` gives the node directory of a machine, or None for machines that are not
    simulated here. Under it: `sys/bus/pci/devices/<bdf>/...` and `nvml-gpus` (the GPU list the
    stub NVML library reads)."""

    def __init__(self, roots: Callable[[MachineSpec], Path | None]) -> None:
        self.roots = roots

    def appear(self, dev: Device, machine: MachineSpec) -> None:
        root = self.roots(machine)
        if root is None or not dev.pci_address:
            return
        devices = root / "sys" / "bus" / "pci" / "devices"
        devices.mkdir(parents=True, exist_ok=True)
        final = devices / dev.pci_address
        tmp = Path(tempfile.mkdtemp(prefix=".new-", dir=devices))
        s = dev.spec
        files = {
            "vendor": s.pci_vendor,
            "device": s.pci_device,
            "class": PCI_CLASS_3D_CONTROLLER,
            "subsystem_vendor": s.pci_vendor,
            "subsystem_device": "0x1533",
            "revision": "0xa1",
            "numa_node": "0",
            "current_link_speed": "16.0 GT/s PCIe",
            "current_link_width": "16",
            "serial": s.serial,  # what the fabric reports; real sysfs has no such file
        }
        for name, value in files.items():
            (tmp / name).write_text(value + "\n")
        os.rename(tmp, final)
        self._update_nvml(
            root,
            s.serial,
            StubGpu(s.serial, s.model, dev.pci_address, s.memory, _minor(dev.pci_address)),
        )

    def disappear(self, dev: Device, machine: MachineSpec) -> None:
        root = self.roots(machine)
        if root is None or not dev.pci_address:
            return
        shutil.rmtree(
            root / "sys" / "bus" / "pci" / "devices" / dev.pci_address, ignore_errors=True
        )
        self._update_nvml(root, dev.spec.serial, None)

    def _update_nvml(self, root: Path, uuid: str, gpu: StubGpu | None) -> None:
        """The node's stub-NVML GPU list (`nvml-gpus`, the stub library's format): drop `uuid`,
        then add `gpu` if given; replaced atomically."""
        path = root / "nvml-gpus"
        keep: list[str] = []
        with contextlib.suppress(OSError):
            keep = [
                line
                for line in path.read_text().splitlines(keepends=True)
                if not line.startswith(uuid + "\t")
            ]
        if gpu is not None:
            keep.append(gpu.line())
        write_atomic(path, "".join(keep).encode(), mode=0o644, sync=False)


def _minor(pci_address: str) -> int:
    """A stable /dev/nvidia<minor> for a simulated GPU: its bus number."""
    return int(pci_address.split(":")[1], 16)
