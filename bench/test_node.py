"""The node's fast path.

- PCI scan: the C scan (cffi API mode) timed by pytest-benchmark, on a synthetic tree of 256
  functions and on this machine's /sys, beside the floor — bench/floor.c, a plain C loop doing
  only the open/read/close/readlink calls of the scan — and the same scan in pure Python;
- NVML: one query (handle by bus id, UUID, name, memory, PCI info, processes) through our cffi
  binding, over the stub library (or the real libnvidia-ml.so.1 when this machine has one),
  beside nvidia-ml-py in a worker process;
- hot-plug → NodeReady: a GPU function appearing in a synthetic tree → `NodeReady` written into
  its ComposableResource on the API server, one pedantic round per hot-plug;
- the idle node agent: `cohdi-agent run --roles node` on a 16-function synthetic tree, no NVML,
  for --idle-seconds: CPU and RSS, where the RSS goes (anonymous vs file-backed, the largest
  mappings) and, from a second run under tracemalloc (bench/rss_probe.py), which packages hold
  the Python memory.
"""

from __future__ import annotations

import asyncio
import ctypes.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent import settings
from agent.kube.client import MERGE_PATCH, Kube
from agent.kube.resources import NODE_READY, RESOURCES, condition
from agent.manifests import installing
from agent.native import scanning
from agent.node.reporting import NodeReporter
from agent.simulated import stubnvml
from agent.simulated.sysfs import add_function, tree
from bench.conftest import Site
from bench.harness import cpu_seconds, mappings, memory, percentiles

HERE = Path(__file__).resolve().parent
BUS_ID = "0000:41:00.0"


def _per_function_ns(fn: Callable[[str], Any], root: str, rounds: int) -> float:
    n = max(len(fn(root)), 1)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        fn(root)
        times.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(times)


@pytest.fixture(scope="module")
def floor_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("floor") / "floor"
    subprocess.run(["cc", "-O2", "-o", str(out), str(HERE / "floor.c")], check=True)
    return out


@pytest.mark.parametrize("where", ["synthetic-256", "sys"])
def test_pci_scan(benchmark: Any, floor_binary: Path, tmp_path: Path, where: str) -> None:
    root = str(tree(tmp_path / "synthetic", 256)) if where == "synthetic-256" else "/sys"
    functions = len(scanning.scan_c(root))
    if functions == 0:
        pytest.skip(f"no PCI function under {root}")
    rounds = 300
    floor_ns = float(
        subprocess.run(
            [str(floor_binary), root, str(rounds)], capture_output=True, text=True, check=True
        ).stdout
    )
    benchmark(scanning.scan_c, root)
    c_ns = benchmark.stats.stats.median * 1e9 / functions
    py_ns = _per_function_ns(scanning.scan_python, root, rounds // 3)
    benchmark.extra_info.update(
        functions=functions,
        floor_us_per_function=round(floor_ns / 1e3, 2),
        c_us_per_function=round(c_ns / 1e3, 2),
        python_us_per_function=round(py_ns / 1e3, 2),
        c_over_floor=round(c_ns / floor_ns, 2),
        python_over_floor=round(py_ns / floor_ns, 2),
    )


def _nvml_library(tmp: Path) -> tuple[str, dict[str, str], str]:
    """(library path, environment, bus id): the machine's own libnvidia-ml.so.1 and its first
    GPU when there is one, else the stub with one simulated A100."""
    real = ctypes.util.find_library("nvidia-ml")
    if real:
        from agent.native.nvml import Nvml

        n = Nvml("libnvidia-ml.so.1")
        n.init()
        gpus = n.all()
        n.shutdown()
        if gpus:
            return "libnvidia-ml.so.1", dict(os.environ), str(gpus[0].bus_id)
    stub = stubnvml.build(settings.Settings().cache_dir)
    gpus = tmp / "gpus"
    gpu = stubnvml.StubGpu(
        "GPU-0000aaaa-0000-0000-0000-000000000001",
        "NVIDIA A100",
        BUS_ID,
        40 * 2**30,
        0,
        ((4242, 2**30),),
    )
    stubnvml.write_gpus(gpus, [gpu])
    env = {**os.environ, "STUB_NVML_GPUS": str(gpus), "LD_LIBRARY_PATH": str(stub.parent)}
    return str(stub), env, BUS_ID


def test_nvml_query(benchmark: Any, tmp_path: Path) -> None:
    from agent.native.nvml import Nvml

    library, env, bus = _nvml_library(tmp_path)
    os.environ["STUB_NVML_GPUS"] = env.get("STUB_NVML_GPUS", "")
    try:
        n = Nvml(library)
        n.init()

        def query() -> None:
            h = n.handle_by_bus_id(bus)
            n.uuid(h)
            n.name(h)
            n.memory(h)
            n.pci_info(h)
            n.compute_processes(h)

        benchmark(query)
    finally:
        os.environ.pop("STUB_NVML_GPUS", None)
    done = subprocess.run(
        [sys.executable, "-m", "bench.nvml_worker", library, bus],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=HERE.parent,
    )
    per = json.loads(done.stdout)
    benchmark.extra_info.update(
        library="stub" if "stub" in library else library,
        us_per_query_worker=per,
        speedup_over_nvidia_ml_py=round(per["nvidia-ml-py (ctypes)"] / per["cffi (ours)"], 2),
    )


async def _hotplug_world(kube: Kube, root: Path, count: int) -> tuple[NodeReporter, Any]:
    node = "bench-hotplug-node"
    (root / "bus" / "pci" / "devices").mkdir(parents=True)
    await installing.install(kube, "hp.bench.cohdi.io")
    reporter = NodeReporter(
        kube,
        settings.NodeSettings(sysfs_root=str(root), nvml_path=str(root / "none"), rescan="never"),
        node=node,
    )
    task = asyncio.create_task(reporter.run())
    await reporter.resources.synced.wait()
    for i in range(count):  # resources the fabric says are attached, waiting for the node
        name = f"hp-{i}"
        await kube.create(
            RESOURCES,
            {
                "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
                "kind": "ComposableResource",
                "metadata": {"name": name},
                "spec": {"type": "gpu", "model": "X", "target_node": node},
            },
        )
        await kube.patch(
            f"{RESOURCES}/{name}/status",
            {
                "status": {
                    "state": "Online",
                    "pci_address": f"0000:{0x41 + i:02x}:00.0",
                    "device_id": f"GPU-{i}",
                }
            },
            content_type=MERGE_PATCH,
        )
    while any(  # noqa: ASYNC110 -- set-up, not measured
        ((reporter.resources.get("", f"hp-{i}") or {}).get("status") or {}).get("state") != "Online"
        for i in range(count)
    ):
        await asyncio.sleep(0.01)
    return reporter, task


def test_hotplug_to_node_ready(
    benchmark: Any,
    site: Site,
    runner: asyncio.Runner,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    if not site.embedded:
        pytest.skip("hot-plug is measured on a synthetic tree against the local control plane")
    count = request.config.getoption("--hotplugs")
    root = tmp_path / "hotplug"
    kube = runner.run(Kube.connect(kubeconfig=site.kubeconfig))
    reporter, task = runner.run(_hotplug_world(kube, root, count))
    plug_to_report: list[float] = []
    event_to_report: list[float] = []
    index = iter(range(count))

    async def one() -> None:
        i = next(index)
        name, address = f"hp-{i}", f"0000:{0x41 + i:02x}:00.0"
        add_function(root, f".new-{i}", driver=None, iommu_group=None)
        staging = root / "bus" / "pci" / "devices" / f".new-{i}"
        t0 = time.monotonic()
        staging.rename(staging.with_name(address))  # the GPU appears
        # The reporter's own timestamps are what is measured; this poll only paces the round.
        while name not in reporter.reported:  # noqa: ASYNC110
            await asyncio.sleep(0.0005)
        plug_to_report.append(reporter.reported[name] - t0)
        event_to_report.append(reporter.reported[name] - reporter.events_seen[address])

    try:
        benchmark.pedantic(lambda: runner.run(one()), rounds=count, iterations=1)
        last = runner.run(kube.get(f"{RESOURCES}/hp-{count - 1}"))
        assert condition(last, NODE_READY)
    finally:

        async def clean_up() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await kube.request("DELETE", RESOURCES)
            await kube.close()

        runner.run(clean_up())
    benchmark.extra_info.update(
        devices=count,
        appear_to_node_ready_written=percentiles(plug_to_report),
        event_to_node_ready_written=percentiles(event_to_report),
    )


def _node_agent(site: Site, tmp: Path, name: str, prefix: list[str]) -> subprocess.Popen[bytes]:
    root = tmp / f"{name}-tree"
    if not root.exists():
        tree(root, 16)
    return subprocess.Popen(
        [
            *prefix,
            "run",
            "--roles",
            "node",
            "--kubeconfig",
            site.kubeconfig,
            "--node-name",
            name,
            "--node-sysfs-root",
            str(root),
            "--node-nvml-path",
            str(tmp / "none"),
            "--node-kubelet-dir",
            str(tmp / f"{name}-kubelet"),
            "--node-cdi-dir",
            str(tmp / f"{name}-cdi"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=HERE.parent,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_idle_node_agent(
    benchmark: Any, site: Site, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    seconds = request.config.getoption("--idle-seconds")
    proc = _node_agent(site, tmp_path, "bench-idle-node", [sys.executable, "-m", "agent"])
    figures: dict[str, Any] = {}

    def idle() -> None:
        time.sleep(5)  # start-up done
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_seconds(proc.pid), time.monotonic()
        figures["cpu_percent"] = round((c1 - c0) / (t1 - t0) * 100, 3)
        figures.update(memory(proc.pid))
        figures["rss_mb_decimal"] = round(figures["rss_mib"] * 2**20 / 1e6, 1)
        figures["largest_mappings_mib"] = mappings(proc.pid)

    try:
        benchmark.pedantic(idle, rounds=1, iterations=1)
    finally:
        _stop(proc)
    # Where the Python part goes: the same agent again under tracemalloc (bench/rss_probe.py).
    out = tmp_path / "traced.json"
    probe = [sys.executable, "-m", "bench.rss_probe", str(out), "15", "--"]
    traced = _node_agent(site, tmp_path, "bench-traced-node", probe)
    try:
        deadline = time.monotonic() + 60
        while not out.exists() and time.monotonic() < deadline and traced.poll() is None:
            time.sleep(0.5)
    finally:
        _stop(traced)
    if out.exists():
        doc = json.loads(out.read_text())
        doc.pop("agent_modules", None)
        figures["python_traced"] = doc
    benchmark.extra_info.update(seconds=seconds, **figures)
