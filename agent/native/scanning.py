"""Scan the PCI tree under a sysfs root: the C fast path (`agent.native._scan`, cffi API mode)
and the same scan in pure Python (the fallback, and the benchmark's baseline). Both return the
same `PciFunction`s; the sysfs root is a setting, so tests run the real code on synthetic trees.

Blocking file I/O: call these from an executor, never on the event loop.
"""

from __future__ import annotations

import errno as errnos
import os
from typing import Any

from agent import errors
from agent.model.pci import PciAddress, PciFunction

try:  # built by the package build; absent only in a source tree nobody installed
    from agent.native import _scan  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised by the fallback test via `scan_python`
    _scan = None


def native_available() -> bool:
    return _scan is not None


def scan(sysfs_root: str = "/sys") -> list[PciFunction]:
    """Every PCI function under `<sysfs_root>/bus/pci/devices`, by the C scan when built."""
    return scan_c(sysfs_root) if _scan is not None else scan_python(sysfs_root)


def scan_c(sysfs_root: str = "/sys") -> list[PciFunction]:
    assert _scan is not None, "agent.native._scan was not built"
    ffi, lib = _scan.ffi, _scan.lib
    capacity = 256
    while True:
        out = ffi.new("pci_function[]", capacity)
        count = ffi.new("int *")
        err = ffi.new("char[]", 512)
        rc = lib.pci_scan(sysfs_root.encode(), out, capacity, count, err, 512)
        if rc == -errnos.ENOSPC:
            capacity = count[0] + 16
            continue
        if rc < 0:
            raise errors.SysfsError(ffi.string(err).decode(errors="replace"))
        return [_from_c(ffi, out[i]) for i in range(count[0])]


def _from_c(ffi: Any, f: Any) -> PciFunction:
    error = ""
    if f.error:
        attr = ffi.string(f.error_attr).decode()
        error = f"{attr}: {os.strerror(f.error)}"
    return PciFunction(
        address=PciAddress(ffi.string(f.address).decode()),
        vendor=f.vendor,
        device=f.device,
        class_code=f.class_code,
        subsystem_vendor=f.subsystem_vendor,
        subsystem_device=f.subsystem_device,
        revision=f.revision,
        numa_node=f.numa_node,
        link_speed=ffi.string(f.link_speed).decode(errors="replace"),
        link_width=f.link_width,
        driver=ffi.string(f.driver).decode(errors="replace"),
        iommu_group=f.iommu_group,
        error=error,
    )


def _read(path: str) -> str:
    with open(path, "rb") as fh:
        return fh.read(63).decode(errors="replace").strip()


def scan_python(sysfs_root: str = "/sys") -> list[PciFunction]:
    base = os.path.join(sysfs_root, "bus", "pci", "devices")
    try:
        names = [n for n in os.listdir(base) if not n.startswith(".")]
    except OSError as exc:
        raise errors.SysfsError(f"cannot open {base}: {exc.strerror}") from exc
    out = []
    for name in names:
        d = os.path.join(base, name)
        problems: list[str] = []

        def hexa(attr: str, required: bool, d: str = d, problems: list[str] = problems) -> int:
            try:
                return int(_read(os.path.join(d, attr)), 16)
            except FileNotFoundError:
                if required:
                    problems.append(f"{attr}: {os.strerror(errnos.ENOENT)}")
            except (OSError, ValueError) as exc:
                problems.append(f"{attr}: {getattr(exc, 'strerror', None) or exc}")
            return 0

        def text(attr: str, d: str = d) -> str | None:
            try:
                return _read(os.path.join(d, attr))
            except (FileNotFoundError, OSError):
                return None

        def link(attr: str, d: str = d) -> str:
            try:
                return os.path.basename(os.readlink(os.path.join(d, attr)))
            except OSError:
                return ""

        vendor, device, klass = hexa("vendor", True), hexa("device", True), hexa("class", True)
        numa = text("numa_node")
        width = text("current_link_width")
        group = link("iommu_group")
        out.append(
            PciFunction(
                address=PciAddress(name),
                vendor=vendor,
                device=device,
                class_code=klass,
                subsystem_vendor=hexa("subsystem_vendor", False),
                subsystem_device=hexa("subsystem_device", False),
                revision=hexa("revision", False),
                numa_node=int(numa) if numa not in (None, "") else -1,
                link_speed=text("current_link_speed") or "",
                link_width=int(width) if width and width.lstrip("-").isdigit() else -1,
                driver=link("driver"),
                iommu_group=int(group) if group.isdigit() else -1,
                error=problems[0] if problems else "",
            )
        )
    return out
