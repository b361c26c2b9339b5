"""NVML through cffi ABI mode: `ffi.dlopen` of a configurable path at run time (no headers at build
time), versioned symbols as nvml.h maps them, return codes mapped to typed errors, and a missing
library as a clean "no NVML" state.

NVML snapshots the GPU list at init: a hot-added GPU is invisible until `reinit()` (shutdown +
init). Everything is keyed by PCI bus id or UUID, never by index. All calls go through one thread
(`AsyncNvml`), so the event loop never blocks on the driver and calls are serialised; the Xid event
wait runs on a thread of its own.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from cffi import FFI

from agent import errors
from agent.model.pci import PciAddress, normalise_bus_id

CDEF: Final = """
typedef struct nvmlDevice_st* nvmlDevice_t;
typedef struct nvmlEventSet_st* nvmlEventSet_t;
typedef int nvmlReturn_t;
typedef struct { char busIdLegacy[16]; unsigned int domain; unsigned int bus;
                 unsigned int device; unsigned int pciDeviceId; unsigned int pciSubSystemId;
                 char busId[32]; } nvmlPciInfo_t;
typedef struct { unsigned long long total; unsigned long long free;
                 unsigned long long used; } nvmlMemory_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; unsigned int gpuInstanceId;
                 unsigned int computeInstanceId; } nvmlProcessInfo_t;
typedef struct { nvmlDevice_t device; unsigned long long eventType; unsigned long long eventData;
                 unsigned int gpuInstanceId; unsigned int computeInstanceId; } nvmlEventData_t;
nvmlReturn_t nvmlInit_v2(void);
nvmlReturn_t nvmlInitWithFlags(unsigned int flags);
nvmlReturn_t nvmlShutdown(void);
const char* nvmlErrorString(nvmlReturn_t result);
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount);
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device);
nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *pciBusId, nvmlDevice_t *device);
nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device);
nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length);
nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length);
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory);
nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci);
nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minorNumber);
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                     nvmlProcessInfo_t *infos);
nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set);
nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long eventTypes,
                                      nvmlEventSet_t set);
nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms);
nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set);
"""

SUCCESS: Final = 0
INIT_FLAG_NO_GPUS: Final = 1
EVENT_XID_CRITICAL: Final = 0x8
_BUF: Final = 96  # NVML_DEVICE_UUID_V2_BUFFER_SIZE / NAME_V2_BUFFER_SIZE

# Return codes (nvml.h) -> (name, what to tell the operator)
_CODES: Final = {
    1: "UNINITIALIZED",
    2: "INVALID_ARGUMENT",
    3: "NOT_SUPPORTED",
    4: "NO_PERMISSION",
    6: "NOT_FOUND",
    7: "INSUFFICIENT_SIZE",
    9: "DRIVER_NOT_LOADED",
    10: "TIMEOUT",
    12: "LIBRARY_NOT_FOUND",
    13: "FUNCTION_NOT_FOUND",
    15: "GPU_IS_LOST",
    16: "RESET_REQUIRED",
    19: "IN_USE",
    28: "GPU_NOT_FOUND",
    999: "UNKNOWN",
}


class NvmlCallError(errors.NvmlError):
    """An NVML call returned an error code."""

    def __init__(self, call: str, code: int, text: str) -> None:
        self.call = call
        self.code = code
        super().__init__(f"{call}: NVML_ERROR_{_CODES.get(code, code)} ({code}): {text}")


class NvmlNotFound(NvmlCallError):
    """No such GPU (bus id / UUID unknown to NVML: not attached, or NVML needs a re-init)."""


class NvmlGpuLost(NvmlCallError, errors.PermanentError):
    """The GPU fell off the bus (Xid 79 territory): it needs a reset or a detach."""


class NvmlTimeout(NvmlCallError, errors.TransientError):
    pass


class NvmlLibraryNotFound(errors.NvmlError, errors.PermanentError):
    """No NVML on this machine: not a crash, a node without NVIDIA GPUs (or drivers)."""


_BY_CODE: Final[dict[int, type[NvmlCallError]]] = {
    6: NvmlNotFound,
    28: NvmlNotFound,
    15: NvmlGpuLost,
    10: NvmlTimeout,
}


@dataclass(frozen=True, slots=True)
class GpuInfo:
    uuid: str
    name: str
    bus_id: PciAddress  # sysfs form: 0000:41:00.0
    memory_total: int
    minor: int
    pci_device_id: int


@dataclass(frozen=True, slots=True)
class XidEvent:
    bus_id: PciAddress
    xid: int


class Nvml:
    """Synchronous binding; use through `AsyncNvml` from the event loop."""

    def __init__(self, path: str = "libnvidia-ml.so.1") -> None:
        self.path = path
        self.ffi = FFI()
        self.ffi.cdef(CDEF)
        self._lib: Any = None
        self.initialised = False
        # Calls are serialised on one thread, so out-parameters are allocated once and reused:
        # an ffi.new per call costs about as much as the NVML call itself.
        self._handle = self.ffi.new("nvmlDevice_t *")
        self._uint = self.ffi.new("unsigned int *")
        self._text = self.ffi.new("char[]", _BUF)
        self._mem = self.ffi.new("nvmlMemory_t *")
        self._pci = self.ffi.new("nvmlPciInfo_t *")

    def load(self) -> None:
        if self._lib is not None:
            return
        try:
            self._lib = self.ffi.dlopen(self.path)
        except OSError as exc:
            raise NvmlLibraryNotFound(
                f"cannot load NVML from {self.path!r} ({exc}); no NVIDIA driver here, or set "
                "--nvml-path to libnvidia-ml.so.1"
            ) from exc

    def _check(self, call: str, rc: int) -> None:
        if rc != SUCCESS:
            text = self.ffi.string(self._lib.nvmlErrorString(rc)).decode(errors="replace")
            raise _BY_CODE.get(rc, NvmlCallError)(call, rc, text)

    def init(self) -> None:
        """Initialise, tolerating a machine with no GPU attached yet."""
        self.load()
        try:
            rc = self._lib.nvmlInitWithFlags(INIT_FLAG_NO_GPUS)
        except AttributeError:  # an old driver without InitWithFlags
            rc = self._lib.nvmlInit_v2()
        self._check("nvmlInit", rc)
        self.initialised = True

    def shutdown(self) -> None:
        if self.initialised:
            self.initialised = False
            self._check("nvmlShutdown", self._lib.nvmlShutdown())

    def reinit(self) -> None:
        """After a hot-plug: NVML sees only the GPUs present at init; all handles are invalid."""
        self.shutdown()
        self.init()

    def count(self) -> int:
        rc = self._lib.nvmlDeviceGetCount_v2(self._uint)
        if rc:
            self._check("nvmlDeviceGetCount_v2", rc)
        return int(self._uint[0])

    def handle_by_index(self, index: int) -> Any:
        rc = self._lib.nvmlDeviceGetHandleByIndex_v2(index, self._handle)
        if rc:
            self._check("nvmlDeviceGetHandleByIndex_v2", rc)
        return self._handle[0]

    def handle_by_bus_id(self, bus_id: str) -> Any:
        rc = self._lib.nvmlDeviceGetHandleByPciBusId_v2(bus_id.encode(), self._handle)
        if rc:
            self._check(f"nvmlDeviceGetHandleByPciBusId_v2({bus_id})", rc)
        return self._handle[0]

    def handle_by_uuid(self, uuid: str) -> Any:
        rc = self._lib.nvmlDeviceGetHandleByUUID(uuid.encode(), self._handle)
        if rc:
            self._check(f"nvmlDeviceGetHandleByUUID({uuid})", rc)
        return self._handle[0]

    def uuid(self, handle: Any) -> str:
        rc = self._lib.nvmlDeviceGetUUID(handle, self._text, _BUF)
        if rc:
            self._check("nvmlDeviceGetUUID", rc)
        return str(self.ffi.string(self._text).decode())

    def name(self, handle: Any) -> str:
        rc = self._lib.nvmlDeviceGetName(handle, self._text, _BUF)
        if rc:
            self._check("nvmlDeviceGetName", rc)
        return str(self.ffi.string(self._text).decode())

    def memory(self, handle: Any) -> tuple[int, int, int]:
        m = self._mem
        rc = self._lib.nvmlDeviceGetMemoryInfo(handle, m)
        if rc:
            self._check("nvmlDeviceGetMemoryInfo", rc)
        return m.total, m.free, m.used

    def pci_info(self, handle: Any) -> tuple[PciAddress, int]:
        p = self._pci
        rc = self._lib.nvmlDeviceGetPciInfo_v3(handle, p)
        if rc:
            self._check("nvmlDeviceGetPciInfo_v3", rc)
        return normalise_bus_id(self.ffi.string(p.busId).decode()), p.pciDeviceId

    def minor(self, handle: Any) -> int:
        rc = self._lib.nvmlDeviceGetMinorNumber(handle, self._uint)
        if rc:
            self._check("nvmlDeviceGetMinorNumber", rc)
        return int(self._uint[0])

    def compute_processes(self, handle: Any) -> list[tuple[int, int]]:
        """(pid, used GPU memory) of every compute process on the GPU."""
        count = self._uint
        count[0] = 0
        rc = self._lib.nvmlDeviceGetComputeRunningProcesses_v3(handle, count, self.ffi.NULL)
        if rc == SUCCESS:
            return []
        if rc != 7:  # INSUFFICIENT_SIZE tells us how many
            self._check("nvmlDeviceGetComputeRunningProcesses_v3", rc)
        size = count[0] * 2 + 5
        infos = self.ffi.new("nvmlProcessInfo_t[]", size)
        count[0] = size
        self._check(
            "nvmlDeviceGetComputeRunningProcesses_v3",
            self._lib.nvmlDeviceGetComputeRunningProcesses_v3(handle, count, infos),
        )
        return [(int(infos[i].pid), int(infos[i].usedGpuMemory)) for i in range(count[0])]

    def info(self, handle: Any) -> GpuInfo:
        bus, pci_id = self.pci_info(handle)
        return GpuInfo(
            self.uuid(handle),
            self.name(handle),
            bus,
            self.memory(handle)[0],
            self.minor(handle),
            pci_id,
        )

    def all(self) -> list[GpuInfo]:
        return [self.info(self.handle_by_index(i)) for i in range(self.count())]

    # --- Xid events (blocking: their own thread) -------------------------------------------------

    def event_set(self, handles: list[Any]) -> Any:
        s = self.ffi.new("nvmlEventSet_t *")
        self._check("nvmlEventSetCreate", self._lib.nvmlEventSetCreate(s))
        for h in handles:
            self._check(
                "nvmlDeviceRegisterEvents",
                self._lib.nvmlDeviceRegisterEvents(h, EVENT_XID_CRITICAL, s[0]),
            )
        return s[0]

    def wait_event(self, event_set: Any, timeout_ms: int) -> XidEvent | None:
        data = self.ffi.new("nvmlEventData_t *")
        rc = self._lib.nvmlEventSetWait_v2(event_set, data, timeout_ms)
        if rc == 10:
            return None
        self._check("nvmlEventSetWait_v2", rc)
        return XidEvent(self.pci_info(data.device)[0], int(data.eventData))

    def free_event_set(self, event_set: Any) -> None:
        self._check("nvmlEventSetFree", self._lib.nvmlEventSetFree(event_set))


T = TypeVar("T")


class AsyncNvml:
    """NVML for the event loop: every call on one dedicated thread, in order."""

    def __init__(self, nvml: Nvml) -> None:
        self.nvml = nvml
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="nvml")
        self.available = False

    async def call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self) -> bool:
        """Initialise; False (and a clean "no NVML" state) when the library is missing."""
        try:
            await self.call(self.nvml.init)
        except NvmlLibraryNotFound:
            self.available = False
            return False
        self.available = True
        return True

    async def close(self) -> None:
        if self.available:
            await self.call(self.nvml.shutdown)
        self._executor.shutdown(wait=True)

    async def watch_xids(self, on_event: Any, stop: threading.Event, timeout_ms: int = 500) -> None:
        """Wait for Xid events on a thread of its own (NVML's wait blocks) and hand each to
        `on_event` on the loop; returns when `stop` is set."""
        loop = asyncio.get_running_loop()
        handles = await self.call(
            lambda: [self.nvml.handle_by_index(i) for i in range(self.nvml.count())]
        )
        event_set = await self.call(self.nvml.event_set, handles)

        def waiting() -> None:
            while not stop.is_set():
                ev = self.nvml.wait_event(event_set, timeout_ms)
                if ev is not None:
                    loop.call_soon_threadsafe(on_event, ev)

        try:
            await asyncio.to_thread(waiting)
        finally:
            await self.call(self.nvml.free_event_set, event_set)
