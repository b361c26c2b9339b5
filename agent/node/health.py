"""The node's view of its GPUs' health: NVML events turned into typed faults per GPU, held until
the GPU has answered NVML for a while with no new fatal event, and the verdict the node writes
on the GPU's ComposableResource as the `DeviceHealthy` condition and streams to kubelet.

Facts used (nvml.h; NVIDIA's Xid catalogue, docs.nvidia.com/deploy/xid-errors, Ampere and newer):
- `nvmlEventTypeXidCriticalError` (0x8) carries the Xid in `eventData`. Which Xids are fatal is
  `--node-fatal-xids`: by default those whose immediate action in the catalogue is a GPU reset or
  more — 48 double-bit ECC, 62 internal micro-controller halt, 63 row remapping / page retirement
  recorded (takes effect after a reset), 64 row remapping / page retirement failed, 74 NVLink
  error, 79 GPU has fallen off the bus, 95 uncontained ECC, 119 GSP RPC timeout, 120 GSP error,
  140 unrecovered ECC. Application Xids (13, 31, 43, 45, 68, 109) and contained ECC (94, the
  application is stopped and the GPU keeps working) are not.
- `nvmlEventTypeDoubleBitEccError` (0x2), `DramRetirementFailure` (0x800), `FatalPoisonError`
  (0x2000), `GpuUnavailableError` (0x4000) are fatal whatever the Xid list says;
  `GpuRecoveryAction` (0x8000) is fatal when its action is not NONE (0): 1 GPU reset, 2 node
  reboot, 3 drain P2P, 4 drain and reset.
- A GPU that fell off the bus answers NVML_ERROR_GPU_IS_LOST; its PCI function may vanish from
  the tree too (`FellOffBus`, decided by the node reporter, which knows what is attached).
- The kernel's PCIe error recovery (AER) sends a `change` uevent with `ERROR_EVENT=
  BEGIN_RECOVERY|SUCCESSFUL_RECOVERY|FAILED_RECOVERY` and `DEVICE_ONLINE=0|1` (drivers/pci
  `pci_uevent_ers`): FAILED_RECOVERY is a fault (`PcieRecoveryFailed`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from agent import errors
from agent.model.pci import PciAddress
from agent.native import nvml

#: condition statuses (DeviceHealthy) and the kubelet stream's words for them
HEALTHY: Final = "True"
UNHEALTHY: Final = "False"
UNKNOWN: Final = "Unknown"

#: Words for the Xids of the default list (NVIDIA's Xid catalogue); others are "Xid <n>".
XID_NAMES: Final = {
    48: "double-bit ECC error",
    62: "internal micro-controller halt",
    63: "row remapping / page retirement recorded, needs a GPU reset",
    64: "row remapping / page retirement failed",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
    140: "unrecovered ECC error",
}

_RECOVERY: Final = {
    1: ("RecoveryGpuReset", "the driver asks for a GPU reset"),
    2: ("RecoveryNodeReboot", "the driver asks for a node reboot"),
    3: ("RecoveryDrainP2P", "the driver asks to drain peer-to-peer traffic"),
    4: ("RecoveryDrainAndReset", "the driver asks to drain and reset the GPU"),
}


#: NVML hands the Xid over in `nvmlEventData_t.eventData` (unsigned long long).
XID_MAX: Final = 2**64 - 1


def parse_xids(text: str, setting: str = "--node-fatal-xids") -> frozenset[int]:
    """The Xid numbers of a comma-separated list ("48,79"; spaces allowed, empty = none).
    Raises errors.ConfigError naming `setting` for anything but decimal integers (ASCII digits:
    `str.isdigit` also takes "²", which `int` refuses) from 0 to `XID_MAX`."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not (part.isascii() and part.isdigit()) or int(part) > XID_MAX:
            raise errors.ConfigError(setting, text, "comma-separated Xid numbers, e.g. 48,79")
        out.add(int(part))
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class Fault:
    """Why a GPU is unhealthy: `reason` a CamelCase word (`Xid79`, `DoubleBitEcc`...), `message`
    in words."""

    reason: str
    message: str


def classify(event: nvml.NvmlEvent, fatal_xids: frozenset[int]) -> Fault | None:
    """The fault an NVML event means, or None when it says nothing about the GPU's health (a
    non-fatal Xid, a P-state or clock change, recovery action NONE)."""
    kind, data = event.event_type, event.data
    if kind == nvml.EVENT_XID_CRITICAL:
        if data not in fatal_xids:
            return None
        words = XID_NAMES.get(data, "critical error")
        return Fault(f"Xid{data}", f"NVML reported Xid {data} ({words}) on {event.bus_id}")
    if kind == nvml.EVENT_DOUBLE_BIT_ECC:
        return Fault("DoubleBitEcc", f"uncorrectable double-bit ECC error on {event.bus_id}")
    if kind == nvml.EVENT_DRAM_RETIREMENT_FAILURE:
        return Fault("DramRetirementFailure", f"DRAM page retirement failed on {event.bus_id}")
    if kind == nvml.EVENT_FATAL_POISON:
        return Fault("FatalPoison", f"fatal poison error on {event.bus_id}")
    if kind == nvml.EVENT_GPU_UNAVAILABLE:
        return Fault("GpuUnavailable", f"NVML reports {event.bus_id} unavailable (lost)")
    if kind == nvml.EVENT_GPU_RECOVERY_ACTION and data in _RECOVERY:
        reason, words = _RECOVERY[data]
        return Fault(reason, f"{words} ({event.bus_id})")
    return None


def pcie_fault(action: str, properties: Mapping[str, str], bus_id: str) -> Fault | None:
    """The fault a PCI uevent means: a failed AER recovery, else None."""
    if action == "change" and properties.get("ERROR_EVENT") == "FAILED_RECOVERY":
        return Fault(
            "PcieRecoveryFailed",
            f"the kernel could not recover {bus_id} from a PCIe error "
            f"(DEVICE_ONLINE={properties.get('DEVICE_ONLINE', '?')})",
        )
    return None


@dataclass(slots=True)
class _Held:
    fault: Fault
    #: time.monotonic() of the last fatal event or failed probe: the hold counts from here
    last_bad: float


class HealthBook:
    """The faults of this node's GPUs by PCI address, and when each may clear.

    A fault is recorded from an NVML event (`record`); it clears (`probed`) once the GPU has
    answered NVML for `hold` seconds with no new fatal event and no failed probe. `forget` drops
    a GPU's fault when a (maybe other) GPU arrives at that address. Not thread-safe: the event
    loop's."""

    def __init__(self, fatal_xids: frozenset[int], hold: float) -> None:
        self.fatal_xids = fatal_xids
        self.hold = hold
        self._faults: dict[PciAddress, _Held] = {}
        self._changed = asyncio.Event()

    def record(self, event: nvml.NvmlEvent) -> Fault | None:
        """The fault `event` means, now held for its GPU (None: the event is not a fault)."""
        fault = classify(event, self.fatal_xids)
        if fault is not None:
            self._faults[event.bus_id] = _Held(fault, time.monotonic())
            self.notify()
        return fault

    def hold_fault(self, bus_id: str, fault: Fault) -> None:
        """Hold a fault found by another source than NVML (the kernel's PCIe error recovery)."""
        self._faults[PciAddress(bus_id)] = _Held(fault, time.monotonic())
        self.notify()

    def fault(self, bus_id: str) -> Fault | None:
        held = self._faults.get(PciAddress(bus_id))
        return held.fault if held is not None else None

    def faulty(self) -> dict[PciAddress, Fault]:
        return {bus: held.fault for bus, held in self._faults.items()}

    def probed(self, bus_id: str, answered: bool) -> bool:
        """Record a probe of a faulty GPU: it answered NVML or not. True when the fault has now
        cleared (answered, and `hold` seconds since the last fatal event or failed probe)."""
        held = self._faults.get(PciAddress(bus_id))
        if held is None:
            return False
        now = time.monotonic()
        if not answered:
            held.last_bad = now
            return False
        if now - held.last_bad < self.hold:
            return False
        del self._faults[PciAddress(bus_id)]
        self.notify()
        return True

    def clears_in(self, bus_id: str) -> float:
        """Seconds until the fault of `bus_id` may clear if the GPU keeps answering (0: none)."""
        held = self._faults.get(PciAddress(bus_id))
        if held is None:
            return 0.0
        return max(0.0, held.last_bad + self.hold - time.monotonic())

    def forget(self, bus_id: str) -> None:
        if self._faults.pop(PciAddress(bus_id), None) is not None:
            self.notify()

    # --- change notification (the kubelet health stream) ---------------------------------------

    def notify(self) -> None:
        """Wake everyone waiting in `changed` (a health fact or the set of devices changed)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def changes(self) -> asyncio.Event:
        """The event the next `notify` sets: take it before reading the state, then wait on it."""
        return self._changed


def probe(n: nvml.Nvml, bus_id: str) -> bool:
    """On the NVML thread: does the GPU at `bus_id` answer (a handle and its memory info)? False
    for GPU_IS_LOST or a GPU NVML no longer knows."""
    try:
        n.memory(n.handle_by_bus_id(bus_id))
    except errors.NvmlError:
        return False
    return True
