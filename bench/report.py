"""Draw the suite's plots from a pytest-benchmark JSON file (`python -m bench.report
[FILE] [DIR]`, default bench/results/latest.json into its directory): whatever benchmarks the
file holds get their plot — cluster.png (allocated → ready per claim, agent beside floor, and
pool publication), node.png (PCI scan and NVML), fabric.png (attach round trips) and
leader.png (the leader's RSS over time at each scale)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

GOAL_RSS_MIB = 500e6 / 2**20  # the leader's goal, 500 MB, in MiB


def _by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in doc.get("benchmarks", [])}


def _title(doc: dict[str, Any]) -> str:
    m = doc.get("machine_info", {}).get("cohdi", {})
    load = (m.get("load_at_start") or {}).get("loadavg")
    return f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, load {load}"


def _cluster(plt: Any, benches: dict[str, dict[str, Any]], title: str, out: Path) -> bool:
    cases = [n for n in benches if n.startswith(("test_single_claim", "test_burst"))]
    pubs = [n for n in benches if n.startswith("test_publication")]
    if not cases and not pubs:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name in cases:
        info = benches[name]["extra_info"]
        s = sorted(info.get("allocated_to_ready_samples_ms") or [])
        if not s:
            continue
        p = info["allocated_to_ready"]
        a.plot(
            s,
            [i / len(s) for i in range(1, len(s) + 1)],
            ls="--" if "floor" in name else "-",
            label=f"{name.removeprefix('test_')}: p50 {p['p50_ms']:.0f} ms, "
            f"p99 {p['p99_ms']:.0f} ms, max {p['max_ms']:.0f} ms",
        )
    a.axvline(5000, color="r", ls=":", lw=1, label="5 s: the scheduler's next binding check")
    a.set_xscale("log")
    a.set_xlabel("claim allocated → FabricDeviceReady, ms (dashed: the floor)")
    a.set_ylabel("fraction of claims")
    a.set_title("scale-up, agent beside the raw API chain")
    a.legend(fontsize=7)
    infos = [benches[n]["extra_info"] for n in pubs]
    x = range(len(infos))
    b.bar([i - 0.2 for i in x], [p["fabric_read_ms"] for p in infos], 0.4, label="fabric read")
    b.bar(
        [i - 0.2 for i in x],
        [p["publish_ms"] for p in infos],
        0.4,
        bottom=[p["fabric_read_ms"] for p in infos],
        label="slices written",
    )
    b.bar(
        [i + 0.2 for i in x],
        [p["one_device_changed_ms"] for p in infos],
        0.4,
        label="one device changed",
    )
    b.set_xticks(list(x), [f"{p['devices']} devices\n{p['slices']} slices" for p in infos])
    b.set_ylabel("ms")
    b.set_title("pool publication")
    b.legend(fontsize=7)
    fig.suptitle(f"cohdi-agent cluster role — {title}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _node(plt: Any, benches: dict[str, dict[str, Any]], title: str, out: Path) -> bool:
    scans = [n for n in benches if n.startswith("test_pci_scan")]
    nvml = benches.get("test_nvml_query")
    if not scans and not nvml:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    keys = (
        ("floor_us_per_function", "syscall floor (C loop)"),
        ("c_us_per_function", "C scan (cffi)"),
        ("python_us_per_function", "pure Python"),
    )
    for i, (key, label) in enumerate(keys):
        a.bar(
            [j + (i - 1) * 0.27 for j in range(len(scans))],
            [benches[n]["extra_info"][key] for n in scans],
            0.27,
            label=label,
        )
    a.set_xticks(range(len(scans)), [n.split("[")[-1].rstrip("]") for n in scans])
    a.set_ylabel("µs per PCI function")
    a.set_title("PCI scan")
    a.legend(fontsize=8)
    if nvml:
        per = nvml["extra_info"]["us_per_query_worker"]
        b.bar(list(per), list(per.values()), color=["#4a90d9", "#c8c8c8"])
        b.set_ylabel(f"µs per query ({nvml['extra_info']['library']} libnvidia-ml)")
    hot = benches.get("test_hotplug_to_node_ready")
    if hot:
        p = hot["extra_info"]["appear_to_node_ready_written"]
        b.set_title(f"NVML; hot-plug → NodeReady p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms")
    fig.suptitle(f"cohdi-agent node role — {title}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _fabric(plt: Any, benches: dict[str, dict[str, Any]], title: str, out: Path) -> bool:
    trips = [n for n in benches if n.startswith("test_attach_detach_round_trip")]
    if not trips:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.8))
    labels, p50, p99 = [], [], []
    for n in trips:
        info = benches[n]["extra_info"]
        for op in ("attach", "detach"):
            labels.append(f"{n.split('[')[-1].rstrip(']')}\n{op}")
            p50.append(info[op]["p50_ms"])
            p99.append(info[op]["p99_ms"])
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], p50, 0.4, label="p50")
    ax.bar([i + 0.2 for i in x], p99, 0.4, label="p99")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("ms")
    ax.set_title(f"fabric clients ↔ fabric manager — {title}", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _leader(plt: Any, benches: dict[str, dict[str, Any]], title: str, out: Path) -> bool:
    runs = [n for n in benches if n.startswith("test_leader_at_scale")]
    if not runs:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for n in runs:
        info = benches[n]["extra_info"]
        ts = info.get("rss_samples") or []
        ax.plot(
            [t for t, _ in ts],
            [r for _, r in ts],
            label=f"{info['nodes']} nodes, {info['devices']} GPUs: published after "
            f"{info.get('published_after_s')} s",
        )
        if info.get("published_after_s"):
            ax.axvline(info["published_after_s"], ls=":", lw=1)
    ax.axhline(GOAL_RSS_MIB, color="r", ls="--", lw=1, label="goal 500 MB")
    ax.set_xlabel("seconds since the leader started")
    ax.set_ylabel("leader RSS, MiB")
    ax.set_title(f"the leader at scale — {title}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def draw(results: Path, directory: Path | None = None) -> list[Path]:
    """Every plot the JSON file at `results` has data for, into `directory` (default: the
    file's own directory); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(results.read_text())
    benches = _by_name(doc)
    title = _title(doc)
    where = directory or results.parent
    where.mkdir(parents=True, exist_ok=True)
    made = []
    for name, draw_one in (
        ("cluster", _cluster),
        ("node", _node),
        ("fabric", _fabric),
        ("leader", _leader),
    ):
        path = where / f"{name}.png"
        if draw_one(plt, benches, title, path):
            made.append(path)
    return made


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/results/latest.json")
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    for path in draw(source, target):
        print(path)
