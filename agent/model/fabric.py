"""The fabric as the rest of the agent sees it: machines wired to a fabric, pooled devices and
their attachment state. Pure data; every backend converts its wire format into these types on the
first line that receives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NewType

DeviceId = NewType("DeviceId", str)  # the fabric's own stable id of a pooled device
MachineId = NewType("MachineId", str)  # the fabric's id of a server wired to it
FabricId = NewType("FabricId", str)


class DeviceState(StrEnum):
    FREE = "free"
    ATTACHING = "attaching"
    ATTACHED = "attached"
    DETACHING = "detaching"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Machine:
    id: MachineId
    name: str
    fabric: FabricId
    #: The Kubernetes node this machine is, when the fabric knows (Redfish HostName, FTI mach_name).
    node_name: str = ""


@dataclass(frozen=True, slots=True)
class PoolDevice:
    id: DeviceId
    fabric: FabricId
    model: str
    state: DeviceState
    vendor: str = ""
    #: Device memory in bytes, when the fabric reports it.
    memory: int = 0
    #: The GPU's own UUID as NVML reports it (`GPU-<uuid>`), when the fabric knows it: the node
    #: matches the arrived function by it. Redfish: the Processor's SerialNumber or UUID; FTI:
    #: `res_serial_num`.
    gpu_uuid: str = ""
    #: The machine it is attached (or being attached/detached) to.
    machine: MachineId | None = None
    #: PCI address on that machine, when the fabric reports it.
    pci_address: str = ""
    #: The fabric names no free device (FTI counts them per model): the id is a placeholder and
    #: attach picks any free device of the model.
    anonymous: bool = False
    #: A human-readable reason when the state is FAILED.
    reason: str = ""
    #: The fabric's own view of the device's health: "OK", "Warning" or "Critical" (Redfish
    #: `Status.Health` of the ResourceBlock or its Processor; FTI's resource status mapped to
    #: the same three words). "OK" when the fabric reports nothing.
    health: str = "OK"
    #: Why the health is not "OK", in words (empty when it is).
    health_reason: str = ""


@dataclass(frozen=True, slots=True)
class Inventory:
    """One consistent read of a fabric manager."""

    machines: tuple[Machine, ...]
    devices: tuple[PoolDevice, ...]
    #: Opaque version (ETag) of this read; equal versions mean nothing changed.
    version: str = ""

    def device(self, device_id: str) -> PoolDevice | None:
        return next((d for d in self.devices if d.id == device_id), None)
