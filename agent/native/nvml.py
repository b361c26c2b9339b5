"""NVML through cffi ABI mode: `ffi.dlopen` of a configurable path at run time (no headers at build
time), versioned symbols as nvml.h maps them, return codes mapped to typed errors, and a missing
library as a clean "no NVML" state.

NVML snapshots the GPU list at init: a hot-added GPU is invisible until `reinit()` (shutdown +
init). Everything is keyed by PCI bus id or UUID, never by index. All queries go through one thread
(`AsyncNvml`), so the event loop never blocks on the driver and queries are serialised; the event
wait (`next_event`: Xid critical errors, double-bit ECC, GPU unavailable...) runs on a thread of its
own. Out-parameters are per thread (`_Buffers` in a `threading.local`): no two threads ever pass
NVML the same buffer, whichever methods they call. A re-init and the event wait exclude each other
(`_events_lock`): the event set is freed before NVML shuts down and re-armed, with the GPUs of the
new init, by the next wait.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
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
nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *eventTypes);
nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set);
nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long eventTypes,
                                      nvmlEventSet_t set);
nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms);
nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set);
"""

logger = logging.getLogger(__name__)

SUCCESS: Final = 0
INIT_FLAG_NO_GPUS: Final = 1
_BUF: Final = 96  # NVML_DEVICE_UUID_V2_BUFFER_SIZE / NAME_V2_BUFFER_SIZE

# Event types (nvml.h `nvmlEventType*`, a bit mask; eventData is the Xid for XID_CRITICAL)
EVENT_SINGLE_BIT_ECC: Final = 0x1
EVENT_DOUBLE_BIT_ECC: Final = 0x2
EVENT_PSTATE: Final = 0x4
EVENT_XID_CRITICAL: Final = 0x8
EVENT_CLOCK: Final = 0x10
EVENT_DRAM_RETIREMENT_FAILURE: Final = 0x800
EVENT_FATAL_POISON: Final = 0x2000
EVENT_GPU_UNAVAILABLE: Final = 0x4000
EVENT_GPU_RECOVERY_ACTION: Final = 0x8000
#: What the health source registers for: the event types that say a GPU is unusable (each GPU
#: gets the part of it `nvmlDeviceGetSupportedEventTypes` says it supports).
HEALTH_EVENTS: Final = (
    EVENT_XID_CRITICAL
    | EVENT_DOUBLE_BIT_ECC
    | EVENT_DRAM_RETIREMENT_FAILURE
    | EVENT_FATAL_POISON
    | EVENT_GPU_UNAVAILABLE
    | EVENT_GPU_RECOVERY_ACTION
)
#: How long one `nvmlEventSetWait_v2` may block (ms): a re-init (on the hot-add path) waits at
#: most this long for the event thread to let go of the event set, ~half of it on average; the
#: price is a wake-up of the event thread every slice (a poll in the driver, microseconds).
EVENT_SLICE_MS: Final = 10

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
class NvmlEvent:
    """One event NVML reported: the GPU's PCI address (sysfs form), the event type (one
    `EVENT_*` bit) and its data (the Xid number for `EVENT_XID_CRITICAL`, the recovery action for
    `EVENT_GPU_RECOVERY_ACTION`, else 0)."""

    bus_id: PciAddress
    event_type: int
    data: int


class _Buffers:
    """One thread's out-parameters, allocated once and reused (an `ffi.new` per call costs about
    as much as the NVML call itself)."""

    __slots__ = ("event", "handle", "mem", "pci", "text", "uint", "ull")

    def __init__(self, ffi: FFI) -> None:
        self.handle = ffi.new("nvmlDevice_t *")
        self.uint = ffi.new("unsigned int *")
        self.ull = ffi.new("unsigned long long *")
        self.text = ffi.new("char[]", _BUF)
        self.mem = ffi.new("nvmlMemory_t *")
        self.pci = ffi.new("nvmlPciInfo_t *")
        self.event = ffi.new("nvmlEventData_t *")


class Nvml:
    """Synchronous binding; use through `AsyncNvml` from the event loop. Safe to call from
    several threads: each thread has its own out-parameters."""

    def __init__(self, path: str = "libnvidia-ml.so.1") -> None:
        self.path = path
        self.ffi = FFI()
        self.ffi.cdef(CDEF)
        self._lib: Any = None
        self.initialised = False
        self._local = threading.local()
        # The event set: created and waited on by the event thread, freed before a shutdown.
        self._events_lock = threading.Lock()
        self._want_events_lock = threading.Event()
        self._event_set: Any = None
        #: PCI addresses of the GPUs the event set watches (empty until armed)
        self.watched: frozenset[PciAddress] = frozenset()

    def _buf(self) -> _Buffers:
        """This thread's out-parameters."""
        b: _Buffers | None = getattr(self._local, "b", None)
        if b is None:
            b = self._local.b = _Buffers(self.ffi)
        return b

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
        """Free the event set (waiting for the event thread's current wait, at most
        `EVENT_SLICE_MS`), then shut NVML down."""
        self._want_events_lock.set()
        try:
            with self._events_lock:
                self._free_events()
                if self.initialised:
                    self.initialised = False
                    self._check("nvmlShutdown", self._lib.nvmlShutdown())
        finally:
            self._want_events_lock.clear()

    def reinit(self) -> None:
        """After a hot-plug: NVML sees only the GPUs present at init; all handles are invalid."""
        self.shutdown()
        self.init()

    def count(self) -> int:
        b = self._buf()
        rc = self._lib.nvmlDeviceGetCount_v2(b.uint)
        if rc:
            self._check("nvmlDeviceGetCount_v2", rc)
        return int(b.uint[0])

    def handle_by_index(self, index: int) -> Any:
        b = self._buf()
        rc = self._lib.nvmlDeviceGetHandleByIndex_v2(index, b.handle)
        if rc:
            self._check("nvmlDeviceGetHandleByIndex_v2", rc)
        return b.handle[0]

    def handle_by_bus_id(self, bus_id: str) -> Any:
        b = self._buf()
        rc = self._lib.nvmlDeviceGetHandleByPciBusId_v2(bus_id.encode(), b.handle)
        if rc:
            self._check(f"nvmlDeviceGetHandleByPciBusId_v2({bus_id})", rc)
        return b.handle[0]

    def handle_by_uuid(self, uuid: str) -> Any:
        b = self._buf()
        rc = self._lib.nvmlDeviceGetHandleByUUID(uuid.encode(), b.handle)
        if rc:
            self._check(f"nvmlDeviceGetHandleByUUID({uuid})", rc)
        return b.handle[0]

    def uuid(self, handle: Any) -> str:
        b = self._buf()
        rc = self._lib.nvmlDeviceGetUUID(handle, b.text, _BUF)
        if rc:
            self._check("nvmlDeviceGetUUID", rc)
        return str(self.ffi.string(b.text).decode())

    def name(self, handle: Any) -> str:
        b = self._buf()
        rc = self._lib.nvmlDeviceGetName(handle, b.text, _BUF)
        if rc:
            self._check("nvmlDeviceGetName", rc)
        return str(self.ffi.string(b.text).decode())

    def memory(self, handle: Any) -> tuple[int, int, int]:
        m = self._buf().mem
        rc = self._lib.nvmlDeviceGetMemoryInfo(handle, m)
        if rc:
            self._check("nvmlDeviceGetMemoryInfo", rc)
        return m.total, m.free, m.used

    def pci_info(self, handle: Any) -> tuple[PciAddress, int]:
        p = self._buf().pci
        rc = self._lib.nvmlDeviceGetPciInfo_v3(handle, p)
        if rc:
            self._check("nvmlDeviceGetPciInfo_v3", rc)
        return normalise_bus_id(self.ffi.string(p.busId).decode()), p.pciDeviceId

    def minor(self, handle: Any) -> int:
        b = self._buf()
        rc = self._lib.nvmlDeviceGetMinorNumber(handle, b.uint)
        if rc:
            self._check("nvmlDeviceGetMinorNumber", rc)
        return int(b.uint[0])

    def compute_processes(self, handle: Any) -> list[tuple[int, int]]:
        """(pid, used GPU memory) of every compute process on the GPU."""
        b = self._buf()
        count = b.uint
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

    # --- events (blocking: the event thread) -----------------------------------------------------

    def supported_events(self, handle: Any) -> int:
        """The event types the GPU can report (`nvmlDeviceGetSupportedEventTypes`); a library
        without that call is taken to support every type."""
        b = self._buf()
        try:
            fn = self._lib.nvmlDeviceGetSupportedEventTypes
        except AttributeError:
            return ~0
        rc = fn(handle, b.ull)
        if rc:
            self._check("nvmlDeviceGetSupportedEventTypes", rc)
        return int(b.ull[0])

    def _arm(self, types: int) -> list[NvmlEvent]:
        """Create the event set and register every GPU of this init for `types` (the part each
        supports). The caller holds `_events_lock`. Returns the events found while arming: a GPU
        NVML calls lost (GPU_IS_LOST) is reported as `EVENT_GPU_UNAVAILABLE`; one NVML cannot
        even name is skipped."""
        s = self.ffi.new("nvmlEventSet_t *")
        self._check("nvmlEventSetCreate", self._lib.nvmlEventSetCreate(s))
        self._event_set = s[0]
        try:
            return self._register_all(types)
        except BaseException:
            self._free_events()  # half armed: the next wait starts again
            raise

    def _register_all(self, types: int) -> list[NvmlEvent]:
        watched: set[PciAddress] = set()
        found: list[NvmlEvent] = []
        for i in range(self.count()):
            try:
                handle = self.handle_by_index(i)
                bus = self.pci_info(handle)[0]
            except NvmlCallError as exc:
                logger.warning("NVML GPU #%d cannot be named: %s", i, exc)
                continue
            try:
                mask = types & self.supported_events(handle)
                if mask:
                    self._check(
                        "nvmlDeviceRegisterEvents",
                        self._lib.nvmlDeviceRegisterEvents(handle, mask, self._event_set),
                    )
                    watched.add(bus)
            except NvmlGpuLost:
                found.append(NvmlEvent(bus, EVENT_GPU_UNAVAILABLE, 0))
            except NvmlCallError as exc:  # NOT_SUPPORTED on this GPU: its health is unknown
                logger.warning("NVML cannot report events of %s: %s", bus, exc)
        self.watched = frozenset(watched)
        return found

    def _free_events(self) -> None:
        """Free the event set, if any (the caller holds `_events_lock`)."""
        event_set, self._event_set = self._event_set, None
        self.watched = frozenset()
        if event_set is not None and self.initialised:
            rc = self._lib.nvmlEventSetFree(event_set)
            if rc:
                logger.debug("nvmlEventSetFree: %s", rc)

    def next_events(self, types: int, timeout_ms: int = EVENT_SLICE_MS) -> list[NvmlEvent]:
        """On the event thread: wait up to `timeout_ms` for events of `types` on any GPU of the
        current init, arming the event set first when there is none (after a start or a
        re-init). Empty on a timeout or while NVML is not initialised (after sleeping
        `timeout_ms`). Raises NvmlCallError (the set is dropped and re-armed by the next call)."""
        while self._want_events_lock.is_set():  # a re-init is waiting: let it go first
            time.sleep(0.001)
        with self._events_lock:
            if self.initialised:
                return self._wait(types, timeout_ms)
        time.sleep(timeout_ms / 1000)
        return []

    def _wait(self, types: int, timeout_ms: int) -> list[NvmlEvent]:
        """Arm if needed, then one `nvmlEventSetWait_v2` (the caller holds `_events_lock`)."""
        if self._event_set is None:
            found = self._arm(types)
            if found:
                return found
        b = self._buf()
        rc = self._lib.nvmlEventSetWait_v2(self._event_set, b.event, timeout_ms)
        if rc == 10:  # TIMEOUT
            return []
        if rc:
            self._free_events()
            self._check("nvmlEventSetWait_v2", rc)
        ev = b.event
        return [NvmlEvent(self.pci_info(ev.device)[0], int(ev.eventType), int(ev.eventData))]


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

    async def watch_events(
        self,
        on_event: Callable[[NvmlEvent], None],
        stop: threading.Event,
        *,
        types: int = HEALTH_EVENTS,
        timeout_ms: int = EVENT_SLICE_MS,
    ) -> None:
        """Wait for NVML events on a thread of its own (NVML's wait blocks) and hand each to
        `on_event` on the loop, until `stop` is set. A failed wait is logged and the set re-armed
        after a second."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finish(exc: BaseException | None) -> None:
            if done.done():
                return
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

        def waiting() -> None:
            failing = ""
            try:
                while not stop.is_set():
                    try:
                        events = self.nvml.next_events(types, timeout_ms)
                    except errors.NvmlError as exc:
                        if str(exc) != failing:
                            logger.warning("NVML event wait: %s; re-arming", exc)
                        failing = str(exc)
                        stop.wait(1.0)
                        continue
                    failing = ""
                    for ev in events:
                        loop.call_soon_threadsafe(on_event, ev)
            except BaseException as exc:  # handed to the awaiting task
                loop.call_soon_threadsafe(finish, exc)
                return
            loop.call_soon_threadsafe(finish, None)

        thread = threading.Thread(target=waiting, name="nvml-events", daemon=True)
        thread.start()
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            stop.set()
            await asyncio.to_thread(thread.join)
            raise
