"""Node fast-path benchmarks:

- PCI scan: the C scan (cffi API mode) and the same scan in pure Python, on the real /sys and on a
  synthetic tree of 256 functions, beside the floor — a plain C loop doing only the open/read/close
  (and readlink) calls for the same attributes (bench/floor.c);
- NVML: our cffi binding vs nvidia-ml-py (ctypes), both over the stub library;
- hot-plug → node report: a GPU function appearing in a synthetic tree → NodeReady written into its
  ComposableResource on a real local API server (p50/p99);
- the node agent's RSS and CPU while idle for 60 s (`cohdi-agent run --roles node`).

Run: `./dev bench node` (or `python -m bench.node`). Writes JSON (with the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent import settings
from agent.devcluster import local
from agent.devcluster.controlplane import ControlPlane
from agent.kube.client import MERGE_PATCH, Kube
from agent.kube.resources import NODE_READY, RESOURCES, condition
from agent.manifests import installing
from agent.native import scanning
from agent.node.reporting import NodeReporter
from agent.simulated import stubnvml
from agent.simulated.sysfs import add_function, tree
from bench.machine import describe

HERE = Path(__file__).resolve().parent


def _median_per_function(fn: Any, root: str, rounds: int) -> float:
    times = []
    n = max(len(fn(root)), 1)
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        fn(root)
        times.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(times)


def _c_call_only() -> Any:
    """The C scan itself, into a preallocated array, without building Python objects: what the
    scan costs beside the syscalls, separated from what materialising results costs."""
    from agent.native import _scan  # type: ignore[attr-defined]

    out = _scan.ffi.new("pci_function[]", 4096)
    count = _scan.ffi.new("int *")
    err = _scan.ffi.new("char[]", 512)

    def call(root: str) -> list[int]:
        _scan.lib.pci_scan(root.encode(), out, 4096, count, err, 512)
        return [0] * count[0]

    return call


def scan_bench(tmp: Path, rounds: int) -> dict[str, Any]:
    floor_bin = tmp / "floor"
    subprocess.run(["cc", "-O2", "-o", str(floor_bin), str(HERE / "floor.c")], check=True)
    synthetic = tree(tmp / "synthetic", 256)
    out = {}
    for label, root in (("real /sys", "/sys"), ("synthetic 256", str(synthetic))):
        functions = len(scanning.scan_c(root))
        floor = float(
            subprocess.run(
                [str(floor_bin), root, str(rounds)], capture_output=True, text=True, check=True
            ).stdout
        )
        c = _median_per_function(scanning.scan_c, root, rounds)
        c_call = _median_per_function(_c_call_only(), root, rounds)
        py = _median_per_function(scanning.scan_python, root, rounds)
        out[label] = {
            "functions": functions,
            "floor_us": round(floor / 1e3, 2),
            "c_us": round(c / 1e3, 2),
            "c_call_only_us": round(c_call / 1e3, 2),
            "c_call_only_over_floor": round(c_call / floor, 2),
            "python_us": round(py / 1e3, 2),
            "c_over_floor": round(c / floor, 2),
            "python_over_floor": round(py / floor, 2),
        }
    return out


def nvml_bench(tmp: Path) -> dict[str, Any]:
    stub = stubnvml.build(settings.Settings().cache_dir)
    gpus = tmp / "gpus"
    stubnvml.write_gpus(
        gpus,
        [
            stubnvml.StubGpu(
                "GPU-0000aaaa-0000-0000-0000-000000000001",
                "NVIDIA A100",
                "0000:41:00.0",
                40 * 2**30,
                0,
                ((4242, 2**30),),
            )
        ],
    )
    env = {**os.environ, "STUB_NVML_GPUS": str(gpus), "LD_LIBRARY_PATH": str(stub.parent)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.nvml_worker", str(stub), "0000:41:00.0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    per = json.loads(done.stdout)
    return {
        "query": "handle by bus id + UUID + name + memory + PCI info v3 + compute processes",
        "us_per_query": per,
        "speedup": round(per["nvidia-ml-py (ctypes)"] / per["cffi (ours)"], 2),
    }


def _pct(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {
        "n": len(s),
        "p50_ms": round(s[len(s) // 2] * 1e3, 2),
        "p99_ms": round(s[min(len(s) - 1, int(0.99 * len(s)))] * 1e3, 2),
        "max_ms": round(s[-1] * 1e3, 2),
    }


async def hotplug_bench(kube: Kube, tmp: Path, count: int) -> dict[str, Any]:
    node = "bench-node"
    root = tmp / "hotplug"
    (root / "bus" / "pci" / "devices").mkdir(parents=True)
    await installing.install(kube, "hp.bench.cohdi.io")
    reporter = NodeReporter(
        kube,
        settings.NodeSettings(sysfs_root=str(root), nvml_path=str(tmp / "none"), rescan="never"),
        node=node,
    )
    task = asyncio.create_task(reporter.run())
    try:
        await reporter.resources.synced.wait()
        names = []
        for i in range(count):  # resources the fabric says are attached, waiting for the node
            name = f"hp-{i}"
            names.append(name)
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
            ("", n) not in reporter.resources.store
            or (reporter.resources.store[("", n)].get("status") or {}).get("state") != "Online"
            for n in names
        ):
            await asyncio.sleep(0.01)
        event_to_report, plug_to_report = [], []
        for i, name in enumerate(names):
            staging = root / "bus" / "pci" / "devices" / f".new-{i}"
            add_function(root, f".new-{i}", driver=None, iommu_group=None)
            t0 = time.monotonic()
            staging.rename(staging.with_name(f"0000:{0x41 + i:02x}:00.0"))  # the GPU appears
            # The reporter's own timestamps are what is measured; this poll only paces the loop.
            while name not in reporter.reported:  # noqa: ASYNC110
                await asyncio.sleep(0.0005)
            seen = reporter.events_seen[f"0000:{0x41 + i:02x}:00.0"]
            plug_to_report.append(reporter.reported[name] - t0)
            event_to_report.append(reporter.reported[name] - seen)
            assert condition(await kube.get(f"{RESOURCES}/{name}"), NODE_READY)
        return {
            "devices": count,
            "event_to_node_ready_written": _pct(event_to_report),
            "appear_to_node_ready_written": _pct(plug_to_report),
        }
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def idle_bench(cp: ControlPlane, tmp: Path, seconds: float) -> dict[str, Any]:
    root = tmp / "idle"
    tree(root, 16)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "run",
            "--roles",
            "node",
            "--kubeconfig",
            str(cp.kubeconfig),
            "--node-name",
            "idle-node",
            "--node-sysfs-root",
            str(root),
            "--node-nvml-path",
            str(tmp / "none"),
            "--node-kubelet-dir",
            str(tmp / "kl"),
            "--node-cdi-dir",
            str(tmp / "cdi"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(5)  # start-up done
        tick = os.sysconf("SC_CLK_TCK")

        def cpu() -> float:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick

        c0, t0 = cpu(), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu(), time.monotonic()
        rss = next(
            int(line.split()[1])
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
        return {
            "seconds": seconds,
            "cpu_percent": round((c1 - c0) / (t1 - t0) * 100, 3),
            "rss_mb": round(rss / 1024, 1),
        }
    finally:
        proc.terminate()
        proc.wait(10)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    doc: dict[str, Any] = {"benchmark": "node", "machine": describe()}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        doc["scan"] = await asyncio.to_thread(scan_bench, tmp, args.rounds)
        doc["nvml"] = await asyncio.to_thread(nvml_bench, tmp)
        binaries = await asyncio.to_thread(local.binaries, settings.Settings().cache_dir)
        cp = ControlPlane(binaries=binaries, state_dir=tmp / "cp", progress=local.progress)
        await asyncio.to_thread(cp.start)
        try:
            async with await Kube.connect(kubeconfig=str(cp.kubeconfig)) as kube:
                doc["hotplug"] = await hotplug_bench(kube, tmp, args.hotplugs)
            doc["idle"] = await asyncio.to_thread(idle_bench, cp, tmp, args.idle)
        finally:
            await asyncio.to_thread(cp.stop)
    shutil.rmtree(tmp, ignore_errors=True)
    return doc


def main() -> None:
    import uvloop

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--hotplugs", type=int, default=100)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/node.json"))
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        doc = runner.run(measure(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    for label, r in doc["scan"].items():
        print(
            f"scan {label} ({r['functions']} functions): floor {r['floor_us']} us, "
            f"C {r['c_us']} us ({r['c_over_floor']}x; the C call alone "
            f"{r['c_call_only_us']} us, {r['c_call_only_over_floor']}x), "
            f"Python {r['python_us']} us ({r['python_over_floor']}x) per function"
        )
    print(f"NVML query: {doc['nvml']['us_per_query']} us ({doc['nvml']['speedup']}x)")
    h = doc["hotplug"]
    print(
        f"hot-plug → NodeReady written: p50 {h['appear_to_node_ready_written']['p50_ms']} ms, "
        f"p99 {h['appear_to_node_ready_written']['p99_ms']} ms ({h['devices']} devices)"
    )
    print(
        f"idle node agent over {doc['idle']['seconds']} s: CPU {doc['idle']['cpu_percent']} %, "
        f"RSS {doc['idle']['rss_mb']} MB"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
