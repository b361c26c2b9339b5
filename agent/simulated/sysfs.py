"""Synthetic sysfs trees for simulated nodes, tests and benchmarks: `bus/pci/devices/<bdf>/` with
the attribute files a real function has, and `driver` / `iommu_group` symlinks."""

from __future__ import annotations

import os
from pathlib import Path


def add_function(
    root: Path,
    address: str,
    *,
    vendor: int = 0x10DE,
    device: int = 0x20B0,
    class_code: int = 0x030200,
    subsystem: tuple[int, int] = (0x10DE, 0x1533),
    revision: int = 0xA1,
    numa_node: int = 0,
    link: tuple[str, int] | None = ("16.0 GT/s PCIe", 16),
    driver: str | None = "nvidia",
    iommu_group: int | None = 42,
) -> Path:
    d = root / "bus" / "pci" / "devices" / address
    d.mkdir(parents=True, exist_ok=True)
    files = {
        "vendor": f"0x{vendor:04x}",
        "device": f"0x{device:04x}",
        "class": f"0x{class_code:06x}",
        "subsystem_vendor": f"0x{subsystem[0]:04x}",
        "subsystem_device": f"0x{subsystem[1]:04x}",
        "revision": f"0x{revision:02x}",
        "numa_node": str(numa_node),
    }
    if link is not None:
        files["current_link_speed"], files["current_link_width"] = link[0], str(link[1])
    for name, value in files.items():
        (d / name).write_text(value + "\n")
    if driver:
        drv = root / "bus" / "pci" / "drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(drv, d), d / "driver")
    if iommu_group is not None:
        grp = root / "kernel" / "iommu_groups" / str(iommu_group)
        grp.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(grp, d), d / "iommu_group")
    return d


def tree(root: Path, count: int) -> Path:
    """`count` functions: GPUs and bridges mixed, some without link, driver or IOMMU group."""
    for i in range(count):
        gpu = i % 4 == 0
        add_function(
            root,
            f"0000:{(i >> 3) & 0xFF:02x}:{i & 0x7:02x}.0"
            if i < 2048
            else f"0001:{i >> 8 & 0xFF:02x}:00.{i & 7}",
            vendor=0x10DE if gpu else 0x8086,
            class_code=0x030200 if gpu else 0x060400,
            numa_node=i % 2,
            link=("16.0 GT/s PCIe", 16) if i % 3 else None,
            driver="nvidia" if gpu else (None if i % 5 == 0 else "pcieport"),
            iommu_group=i if i % 7 else None,
        )
    return root
