"""Draw the benchmark plots from the JSON results in a directory (`python -m bench.report
[DIR]`, default bench/results): whatever results are present get their plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _load(directory: Path, name: str) -> dict[str, Any] | None:
    path = directory / f"{name}.json"
    return dict(json.loads(path.read_text())) if path.exists() else None


def draw(directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []
    cluster = _load(directory, "cluster")
    if cluster:
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
        for n, up in cluster["scale_up"].items():
            s = sorted(up["samples_ms"])
            a.plot(
                s,
                [i / len(s) for i in range(1, len(s) + 1)],
                marker="." if len(s) < 5 else None,
                label=f"burst of {n}: p50 {up['overhead']['p50_ms']:.0f} ms, "
                f"p99 {up['overhead']['p99_ms']:.0f} ms",
            )
        a.axvline(50, color="g", ls="--", lw=1, label="target p50 50 ms")
        a.axvline(250, color="r", ls="--", lw=1, label="target p99 250 ms")
        a.set_xscale("log")
        a.set_xlabel("agent overhead per claim, ms (allocated → FabricDeviceReady - fabric attach)")
        a.set_ylabel("fraction of claims")
        a.set_title("scale-up on the real API server")
        a.legend(fontsize=7)
        sizes = list(cluster["publication"])
        pubs = [cluster["publication"][n] for n in sizes]
        x = range(len(sizes))
        b.bar([i - 0.2 for i in x], [p["fabric_read_ms"] for p in pubs], 0.4, label="fabric read")
        b.bar(
            [i - 0.2 for i in x],
            [p["publish_ms"] for p in pubs],
            0.4,
            bottom=[p["fabric_read_ms"] for p in pubs],
            label="slices written",
        )
        b.bar(
            [i + 0.2 for i in x],
            [p["one_device_changed_ms"] for p in pubs],
            0.4,
            label="one device changed",
        )
        b.axhline(1000, color="r", ls="--", lw=1, label="target 1 s (2,000 devices)")
        b.set_xticks(
            list(x),
            [f"{n} devices\n{p['slices']} slices" for n, p in zip(sizes, pubs, strict=True)],
        )
        b.set_ylabel("ms")
        b.set_title("pool publication")
        b.legend(fontsize=7)
        fig.suptitle(
            f"cohdi-agent cluster role — {cluster['machine']['cpu']}, "
            f"{cluster['machine']['cores']} cores"
        )
        fig.tight_layout()
        made.append(directory / "cluster.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    node = _load(directory, "node")
    if node:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        labels = list(node["scan"])
        for i, key in enumerate(("floor_us", "c_us", "python_us")):
            a.bar(
                [j + (i - 1) * 0.27 for j in range(len(labels))],
                [node["scan"][lbl][key] for lbl in labels],
                0.27,
                label={
                    "floor_us": "syscall floor (C loop)",
                    "c_us": "C scan (cffi)",
                    "python_us": "pure Python",
                }[key],
            )
        a.set_xticks(range(len(labels)), labels)
        a.set_ylabel("µs per PCI function")
        a.set_title("PCI scan")
        a.legend(fontsize=8)
        per = node["nvml"]["us_per_query"]
        b.bar(list(per), list(per.values()), color=["#4a90d9", "#c8c8c8"])
        b.set_ylabel("µs per query (stub libnvidia-ml)")
        b.set_title(
            "NVML; hot-plug → NodeReady p50 "
            f"{node['hotplug']['appear_to_node_ready_written']['p50_ms']} ms"
        )
        fig.tight_layout()
        made.append(directory / "node.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    fabric = _load(directory, "fabric")
    if fabric:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        backends = list(fabric["results"])
        ax.bar(
            [f"{b}\np50" for b in backends],
            [fabric["results"][b]["round_trip"]["round_trip"]["p50_ms"] for b in backends],
        )
        ax.bar(
            [f"{b}\np99" for b in backends],
            [fabric["results"][b]["round_trip"]["round_trip"]["p99_ms"] for b in backends],
        )
        ax.set_ylabel("ms, attach + detach round trip")
        ax.set_title("fabric clients ↔ emulator (HTTPS, loopback)")
        fig.tight_layout()
        made.append(directory / "fabric.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    leader = _load(directory, "leader")
    if leader:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([s["t"] for s in leader["samples"]], [s["rss_mb"] for s in leader["samples"]])
        ax.axhline(200, color="r", ls="--", lw=1, label="target 200 MB")
        ax.set_xlabel("seconds")
        ax.set_ylabel("leader RSS, MB")
        ax.set_title(f"leader with {leader['nodes']} nodes, {leader['devices']} devices")
        ax.legend()
        fig.tight_layout()
        made.append(directory / "leader.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    return made


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/results")
    for path in draw(target):
        print(path)
