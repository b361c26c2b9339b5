"""The NVML binding (cffi ABI mode) over the stub library compiled from C: every bound function,
a GPU appearing after init (re-init), running processes, Xid events, a missing library. The same
tests run against the real libnvidia-ml.so.1 where a GPU exists (marked gpu)."""

from __future__ import annotations

import asyncio
import ctypes.util
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import settings
from agent.native import nvml as nvmlmod
from agent.native.nvml import AsyncNvml, Nvml, NvmlLibraryNotFound, NvmlNotFound, XidEvent
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


async def test_async_calls_and_xid_events(
    stub_library: Path, gpus_file: Path, tmp_path: Path
) -> None:
    a = AsyncNvml(Nvml(str(stub_library)))
    assert await a.start()
    try:
        assert await a.call(a.nvml.count) == 1
        seen: list[XidEvent] = []
        got = asyncio.Event()
        stop = threading.Event()

        def on_event(ev: XidEvent) -> None:
            seen.append(ev)
            got.set()

        watching = asyncio.create_task(a.watch_xids(on_event, stop, timeout_ms=50))
        (tmp_path / "xid").write_text("0000:41:00.0 79\n")
        await asyncio.wait_for(got.wait(), 5)
        stop.set()
        await watching
        assert seen == [XidEvent("0000:41:00.0", 79)]
    finally:
        await a.close()


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
