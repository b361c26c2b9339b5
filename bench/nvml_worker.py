"""Run by bench/test_node.py in a process whose LD_LIBRARY_PATH finds the stub libnvidia-ml.so.1 (so
nvidia-ml-py's own CDLL("libnvidia-ml.so.1") loads it too): one NVML query through our cffi
binding and through nvidia-ml-py, interleaved; prints microseconds per query as JSON.
Usage: python -m bench.nvml_worker <stub library> <bus id>"""

from __future__ import annotations

import json
import statistics
import sys
import time

import pynvml

from agent.native.nvml import Nvml


def main() -> None:
    path, bus = sys.argv[1], sys.argv[2]
    n = Nvml(path)
    n.init()
    pynvml.nvmlInit()

    def ours() -> None:
        h = n.handle_by_bus_id(bus)
        n.uuid(h)
        n.name(h)
        n.memory(h)
        n.pci_info(h)
        n.compute_processes(h)

    def theirs() -> None:
        h = pynvml.nvmlDeviceGetHandleByPciBusId(bus)
        pynvml.nvmlDeviceGetUUID(h)
        pynvml.nvmlDeviceGetName(h)
        pynvml.nvmlDeviceGetMemoryInfo(h)
        pynvml.nvmlDeviceGetPciInfo_v3(h)
        pynvml.nvmlDeviceGetComputeRunningProcesses(h)

    pairs = (("cffi (ours)", ours), ("nvidia-ml-py (ctypes)", theirs))
    samples: dict[str, list[float]] = {name: [] for name, _ in pairs}
    for _, f in pairs:
        for _ in range(500):
            f()
    for _ in range(30):  # interleaved, so drift hits both alike
        for name, f in pairs:
            t = time.perf_counter_ns()
            for _ in range(500):
                f()
            samples[name].append((time.perf_counter_ns() - t) / 500)
    print(json.dumps({k: round(statistics.median(v) / 1e3, 2) for k, v in samples.items()}))


if __name__ == "__main__":
    main()
