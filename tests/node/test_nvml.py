"""The NVML binding (cffi ABI mode) over the stub library compiled from C: every bound function,
a GPU appearing after init (re-init), running processes, events (Xid, double-bit ECC) on their own
thread with their own buffers, a lost GPU, a missing library. The same tests run against the real
libnvidia-ml.so.1 where a GPU exists (marked gpu)."""

from __future__ import annotations

import asyncio
import ctypes.util
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import settings
from agent.model.pci import PciAddress
from agent.native import nvml as nvmlmod
from agent.native.nvml import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_GPU_UNAVAILABLE,
    EVENT_XID_CRITICAL,
    HEALTH_EVENTS,
    AsyncNvml,
    Nvml,
    NvmlEvent,
    NvmlGpuLost,
    NvmlLibraryNotFound,
    NvmlNotFound,
)
from agent.simulated import stubnvml
from agent.simulated.stubnvml import StubGpu, write_gpus

A = StubGpu(
    "GPU-aaaaaaaa-0000-0000-0000-000000000001",
    "NVIDIA A100-PCIE-40GB",
    "0000:41:00.0",
    40 * 2**30,
    0,
)
B = StubGpu(
    "GPU-bbbbbbbb-0000-0000-0000-000000000002",
    "NVIDIA H100 PCIe",
    "0000:42:00.0",
    80 * 2**30,
    1,
    processes=((4242, 2**30), (4343, 2**29)),
)


@pytest.fixture(scope="session")
def stub_library() -> Path:
    return stubnvml.build(settings.Settings().cache_dir)


@pytest.fixture
def gpus_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "gpus"
    write_gpus(path, [A])
    monkeypatch.setenv("STUB_NVML_GPUS", str(path))
    monkeypatch.setenv("STUB_NVML_XID", str(tmp_path / "xid"))
    monkeypatch.setenv("STUB_NVML_LOST", str(tmp_path / "lost"))
    return path


@pytest.fixture
def nvml(stub_library: Path, gpus_file: Path) -> Iterator[Nvml]:
    n = Nvml(str(stub_library))
    n.init()
    try:
        yield n
    finally:
        n.shutdown()


def test_every_bound_function(nvml: Nvml) -> None:
    assert nvml.count() == 1
    h = nvml.handle_by_index(0)
    assert nvml.uuid(h) == A.uuid
    assert nvml.name(h) == A.name
    assert nvml.memory(h) == (A.memory, A.memory, 0)
    bus, pci_id = nvml.pci_info(h)
    assert bus == "0000:41:00.0"  # NVML's 00000000:41:00.0, normalised to the sysfs form
    assert pci_id == 0x20B010DE
    assert nvml.minor(h) == 0
    assert nvml.compute_processes(h) == []
    assert nvml.uuid(nvml.handle_by_bus_id("0000:41:00.0")) == A.uuid
    assert nvml.uuid(nvml.handle_by_uuid(A.uuid)) == A.uuid
    (info,) = nvml.all()
    assert (info.uuid, info.bus_id, info.memory_total, info.minor) == (
        A.uuid,
        "0000:41:00.0",
        A.memory,
        0,
    )


def test_unknown_gpu_is_a_typed_error(nvml: Nvml) -> None:
    with pytest.raises(NvmlNotFound, match="NVML_ERROR_NOT_FOUND"):
        nvml.handle_by_bus_id("0000:99:00.0")
    with pytest.raises(NvmlNotFound):
        nvml.handle_by_uuid("GPU-nope")


def test_hot_added_gpu_is_seen_after_reinit(nvml: Nvml, gpus_file: Path) -> None:
    write_gpus(gpus_file, [A, B])  # the fabric attached B
    assert nvml.count() == 1, "NVML snapshots the GPUs at init"
    with pytest.raises(NvmlNotFound):
        nvml.handle_by_bus_id(B.bus_id)
    nvml.reinit()
    assert nvml.count() == 2
    h = nvml.handle_by_bus_id(B.bus_id)
    assert nvml.uuid(h) == B.uuid
    assert sorted(nvml.compute_processes(h)) == [(4242, 2**30), (4343, 2**29)]
    total, free, used = nvml.memory(h)
    assert (total, used, free) == (B.memory, 2**30 + 2**29, B.memory - 2**30 - 2**29)


def test_missing_library_is_a_clean_no_nvml_state(tmp_path: Path) -> None:
    n = Nvml(str(tmp_path / "libnvidia-ml.so.1"))
    with pytest.raises(NvmlLibraryNotFound, match="cannot load NVML"):
        n.init()

    async def start() -> bool:
        a = AsyncNvml(n)
        try:
            return await a.start()
        finally:
            await a.close()

    assert asyncio.run(start()) is False


async def test_async_calls_and_events(stub_library: Path, gpus_file: Path, tmp_path: Path) -> None:
    """Events of the registered types reach the loop, per GPU; a re-init while the event thread
    waits re-arms the set with the GPUs of the new init."""
    a = AsyncNvml(Nvml(str(stub_library)))
    assert await a.start()
    try:
        assert await a.call(a.nvml.count) == 1
        seen: list[NvmlEvent] = []
        got = asyncio.Event()
        stop = threading.Event()

        def on_event(ev: NvmlEvent) -> None:
            seen.append(ev)
            got.set()

        async def next_event() -> NvmlEvent:
            await asyncio.wait_for(got.wait(), 5)
            got.clear()
            return seen.pop(0)

        watching = asyncio.create_task(a.watch_events(on_event, stop))
        stubnvml.inject_event(tmp_path / "xid", A.bus_id, 79)
        assert await next_event() == NvmlEvent(PciAddress(A.bus_id), EVENT_XID_CRITICAL, 79)
        assert a.nvml.watched == {A.bus_id}
        write_gpus(gpus_file, [A, B])  # hot-add: the node re-inits NVML on its own thread
        await a.call(a.nvml.reinit)
        stubnvml.inject_event(tmp_path / "xid", B.bus_id, 0, stubnvml.DOUBLE_BIT_ECC)
        assert await next_event() == NvmlEvent(PciAddress(B.bus_id), EVENT_DOUBLE_BIT_ECC, 0)
        assert a.nvml.watched == {A.bus_id, B.bus_id}
        stop.set()
        await watching
        assert seen == []
    finally:
        await a.close()


class _Recorder:
    """Stands in for the loaded library: records, per thread, the address of every out-parameter
    (a pointer or array argument that is not a device handle or an event set) passed to NVML."""

    def __init__(self, lib: Any, ffi: Any) -> None:
        self.lib = lib
        self.ffi = ffi
        self.lock = threading.Lock()
        self.buffers: dict[int, set[int]] = {}

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.lib, name)

        def call(*args: Any) -> Any:
            for arg in args:
                if not isinstance(arg, self.ffi.CData):
                    continue
                ctype = self.ffi.typeof(arg)
                if ctype.kind not in ("pointer", "array") or "_st *" in ctype.cname:
                    continue  # nvmlDevice_t / nvmlEventSet_t are handles, not buffers
                address = int(self.ffi.cast("uintptr_t", arg))
                with self.lock:
                    self.buffers.setdefault(threading.get_ident(), set()).add(address)
            return fn(*args)

        return call


def test_queries_and_event_wait_share_no_buffer(
    stub_library: Path, gpus_file: Path, tmp_path: Path
) -> None:
    """The event wait and NVML queries run at the same time on two threads: no out-parameter is
    passed to NVML from both (the event thread used to read its event's PCI address into the
    query thread's nvmlPciInfo_t), and every answer is right under that load."""
    write_gpus(gpus_file, [A, B])
    n = Nvml(str(stub_library))
    n.init()
    recorder = _Recorder(n._lib, n.ffi)
    n._lib = recorder
    try:
        for _ in range(20):
            stubnvml.inject_event(tmp_path / "xid", B.bus_id, 48)
        events: list[NvmlEvent] = []
        stop = threading.Event()

        def waiting() -> None:
            while not stop.is_set():
                events.extend(n.next_events(HEALTH_EVENTS, 5))

        thread = threading.Thread(target=waiting)
        thread.start()
        answers = set()
        deadline = time.monotonic() + 10
        while len(events) < 20 and time.monotonic() < deadline:
            h = n.handle_by_bus_id(A.bus_id)
            answers.add((n.pci_info(h)[0], n.uuid(h), n.name(h), n.minor(h)))
        stop.set()
        thread.join()
        assert events == [NvmlEvent(PciAddress(B.bus_id), EVENT_XID_CRITICAL, 48)] * 20
        assert answers == {(A.bus_id, A.uuid, A.name, A.minor)}
        query = recorder.buffers[threading.get_ident()]
        wait = recorder.buffers[thread.ident or 0]
        assert query
        assert wait
        assert query.isdisjoint(wait), "a buffer passed to NVML from both threads"
    finally:
        n._lib = recorder.lib
        n.shutdown()


def test_lost_gpu_is_a_typed_error_and_comes_back(nvml: Nvml, tmp_path: Path) -> None:
    stubnvml.set_lost(tmp_path / "lost", [A.bus_id])
    h = nvml.handle_by_bus_id(A.bus_id)
    with pytest.raises(NvmlGpuLost, match="GPU_IS_LOST"):
        nvml.memory(h)
    assert nvml.pci_info(h)[0] == A.bus_id  # still named, so events can be attributed
    stubnvml.set_lost(tmp_path / "lost", [])
    assert nvml.memory(h)[0] == A.memory


def test_a_gpu_lost_when_the_event_set_is_armed_is_reported_unavailable(
    nvml: Nvml, gpus_file: Path, tmp_path: Path
) -> None:
    write_gpus(gpus_file, [A, B])
    nvml.reinit()
    stubnvml.set_lost(tmp_path / "lost", [A.bus_id])
    assert nvml.next_events(HEALTH_EVENTS, 5) == [
        NvmlEvent(PciAddress(A.bus_id), EVENT_GPU_UNAVAILABLE, 0)
    ]
    assert nvml.watched == {B.bus_id}


def test_error_codes_map_to_classes() -> None:
    assert issubclass(nvmlmod.NvmlGpuLost, nvmlmod.errors.PermanentError)
    assert nvmlmod._BY_CODE[15] is nvmlmod.NvmlGpuLost


@pytest.mark.gpu
@pytest.mark.skipif(
    ctypes.util.find_library("nvidia-ml") is None, reason="no libnvidia-ml on this machine"
)
def test_real_nvml() -> None:  # pragma: no cover - runs only where a GPU exists
    n = Nvml()
    n.init()
    try:
        assert n.count() >= 1
        for info in n.all():
            assert info.uuid.startswith("GPU-")
            assert info.memory_total > 0
            assert n.uuid(n.handle_by_bus_id(info.bus_id)) == info.uuid
            assert isinstance(n.compute_processes(n.handle_by_uuid(info.uuid)), list)
    finally:
        n.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(
    ctypes.util.find_library("nvidia-ml") is None, reason="no libnvidia-ml on this machine"
)
def test_real_nvml_event_wait() -> None:  # pragma: no cover - runs only where a GPU exists
    """The health event set on a real driver: armed with what each GPU supports, a wait that
    times out cleanly, freed by a re-init and armed again."""
    n = Nvml()
    n.init()
    try:
        expected = {
            info.bus_id
            for info in n.all()
            if n.supported_events(n.handle_by_bus_id(info.bus_id)) & HEALTH_EVENTS
        }
        for _ in range(2):
            assert isinstance(n.next_events(HEALTH_EVENTS, 10), list)
            assert n.watched == expected
            n.reinit()
            assert n.watched == frozenset()
    finally:
        n.shutdown()
