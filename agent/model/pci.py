"""A PCI function as the node role sees it in sysfs. Pure data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NewType

PciAddress = NewType("PciAddress", str)  # dddd:bb:dd.f, lower case, as sysfs names it

PCI_CLASS_DISPLAY = 0x03  # base class of VGA (0x0300xx) and 3D controllers (0x0302xx)
NVIDIA = 0x10DE


@dataclass(frozen=True, slots=True)
class PciFunction:
    address: PciAddress
    vendor: int
    device: int
    class_code: int
    subsystem_vendor: int
    subsystem_device: int
    revision: int
    numa_node: int  # -1: none
    link_speed: str  # "" when the function reports none (not PCIe, or virtual)
    link_width: int  # -1: unknown
    driver: str  # "" when unbound
    iommu_group: int  # -1: no IOMMU group
    #: The first attribute that could not be read, with the OS error; "" when all were read.
    error: str = ""

    @property
    def is_gpu(self) -> bool:
        return self.class_code >> 16 == PCI_CLASS_DISPLAY


def normalise_bus_id(bus_id: str) -> PciAddress:
    """NVML's `00000000:3B:00.0` (8-hex domain, upper case) → sysfs's `0000:3b:00.0`."""
    if len(bus_id) == 16 and bus_id.startswith("0000"):  # the common case, without parsing
        return PciAddress(bus_id[4:].lower())
    domain, rest = bus_id.strip().lower().split(":", 1)
    return PciAddress(f"{int(domain, 16):04x}:{rest}")
