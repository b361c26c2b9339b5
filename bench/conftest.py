"""The latency suite's options and fixtures (`pytest bench/`; see bench/README.md).

By default everything runs on the embedded default: a local control plane (etcd,
kube-apiserver, kube-scheduler v1.36.3, built on first use) that the session starts, and the
fabric emulator. Given `--kubeconfig`, the cluster benchmarks measure that cluster and the agent
deployed on it (`--driver`, `--model`); given `--fabric-url` (and the other `--fabric-*`
options, the same as cohdi-agent's), the fabric benchmark measures that fabric manager
(`--fabric-machine`, `--fabric-device`). Benchmarks that cannot run on what was given skip
and say why.

Every benchmark puts its figures in `extra_info` (latency percentiles in ms, request counts, API
server CPU); the session adds the machine (CPU model, cores, memory), its load at the start and
the end, and the agent/floor ratios (`floor_ratios` in the --benchmark-json file and printed at
the end).
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent import KUBERNETES_VERSION, errors, settings
from agent.devcluster import local
from agent.devcluster.controlplane import ControlPlane
from bench.harness import ApiServer, load
from bench.machine import describe

RESULTS: pytest.StashKey[dict[str, dict[str, Any]]] = pytest.StashKey()


def results_of(config: pytest.Config) -> dict[str, dict[str, Any]]:
    """The session's figures by benchmark key (for the ratios), and the load at the start."""
    if RESULTS not in config.stash:
        config.stash[RESULTS] = {"_load_at_start": {**load(), "uptime": _uptime()}}
    return config.stash[RESULTS]


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("cohdi-bench", "cohdi-agent latency suite")
    g.addoption(
        "--kubeconfig",
        default="",
        help="measure this cluster and the agent deployed on it instead of starting the local "
        "control plane (the floor, hot-plug and leader benchmarks then skip)",
    )
    g.addoption(
        "--driver",
        default=settings.ClusterSettings().driver,
        help="with --kubeconfig: the deployed agent's driver name (default %(default)s)",
    )
    g.addoption(
        "--model",
        default="",
        help="with --kubeconfig: the GPU model (productName) the benchmark's claims ask for",
    )
    g.addoption(
        "--fabric-machine",
        default="",
        help="with --fabric-url: the machine (fabric id) the attach benchmark attaches to",
    )
    g.addoption(
        "--fabric-device",
        default="",
        help="with --fabric-url: a free device (fabric id) the attach benchmark attaches and "
        "detaches again",
    )
    for info in settings.describe():
        if info.group == "fabric":
            g.addoption(
                info.flag,
                default=None,
                help=f"as cohdi-agent's {info.flag}: {info.help} Default: {info.default or '-'}",
            )
    g.addoption(
        "--scheduler-qps",
        type=float,
        default=None,
        help="the local kube-scheduler's API client qps (default: its own, 50)",
    )
    g.addoption(
        "--scheduler-burst",
        type=int,
        default=None,
        help="the local kube-scheduler's API client burst (default: its own, 100)",
    )
    g.addoption("--single-claims", type=int, default=50, help="claims one after another (50)")
    g.addoption("--burst", type=int, default=200, help="claims in the burst (200)")
    g.addoption("--fabric-rounds", type=int, default=300, help="attach + detach round trips (300)")
    g.addoption("--hotplugs", type=int, default=100, help="hot-plugs timed (100)")
    g.addoption("--idle-seconds", type=float, default=60.0, help="idle node agent window (60)")
    g.addoption(
        "--demo-warm-devices",
        type=int,
        default=1,
        help="warm capacity of the demo's warm run, idle GPUs per node and model (1)",
    )
    g.addoption("--demo-pods", type=int, default=24, help="pods in each demo run (24)")
    g.addoption(
        "--leader-scales",
        default="1000x8,5000x8",
        help="leader benchmarks, NODESxGPUS_PER_NODE, comma-separated (1000x8,5000x8)",
    )
    g.addoption(
        "--leader-seconds",
        type=float,
        default=240.0,
        help="longest wait for the leader's publication per scale (240)",
    )


@dataclass(frozen=True)
class Site:
    """Where the suite measures: the embedded local control plane, or a given cluster."""

    kubeconfig: str
    control_plane: ControlPlane | None
    apiserver: ApiServer
    driver: str
    model: str

    @property
    def embedded(self) -> bool:
        return self.control_plane is not None


@pytest.fixture(scope="session")
def site(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Site]:
    opt = request.config.getoption
    if opt("--kubeconfig"):
        path = str(Path(opt("--kubeconfig")).expanduser())
        yield Site(path, None, ApiServer(path), opt("--driver"), opt("--model"))
        return
    cp = ControlPlane(
        binaries=local.binaries(settings.Settings().cache_dir),
        state_dir=tmp_path_factory.mktemp("controlplane"),
        scheduler_qps=opt("--scheduler-qps"),
        scheduler_burst=opt("--scheduler-burst"),
        progress=local.progress,
    )
    cp.start()
    try:
        try:
            doc: Any = cp.scheduler_config()
            conn = doc["componentconfig"]["clientConnection"]
            client = {"qps": conn["qps"], "burst": conn["burst"]}
        except errors.DevClusterError as exc:  # a figure less, not a session lost
            client = {"unknown": str(exc)}
        results_of(request.config)["_scheduler_client"] = client
        yield Site(str(cp.kubeconfig), cp, ApiServer(str(cp.kubeconfig), cp.pids()), "", "")
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def fabric_settings(request: pytest.FixtureRequest) -> settings.FabricSettings:
    """The --fabric-* options as the agent's own FabricSettings (validated the same way)."""
    raw = {
        info.flag: value
        for info in settings.describe()
        if info.group == "fabric" and (value := request.config.getoption(info.flag)) is not None
    }
    return settings.load(raw).fabric


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    """One uvloop event loop for the whole benchmark: its set-up, every timed round and its
    clean-up run on it (`runner.run(coroutine)`); tasks started in set-up run on during rounds."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        yield r


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Any:
    """record(key, figures): keep a benchmark's figures for the session's ratios."""

    def keep(key: str, figures: dict[str, Any]) -> None:
        results_of(request.config)[key] = figures

    return keep


def pytest_configure(config: pytest.Config) -> None:
    results_of(config)  # the load before anything of ours starts


def _uptime() -> str:
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return ""


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """agent / floor for every case where both ran: p50 and p99 of allocated → ready (the agent
    also with the fabric's own attach time taken off: `overhead`), and API requests per claim
    (the difference, which the targets speak of)."""
    out: dict[str, Any] = {}
    for case in ("single", "burst"):
        agent, floor = results.get(f"agent_{case}"), results.get(f"floor_{case}")
        if not agent or not floor:
            continue
        f = floor["allocated_to_ready"]
        row: dict[str, Any] = {}
        for label, figures in (
            ("allocated_to_ready", agent["allocated_to_ready"]),
            ("overhead", agent.get("overhead", {})),
        ):
            for q in ("p50_ms", "p99_ms", "max_ms"):
                if figures.get(q) and f.get(q):
                    row[f"{label}_{q[:-3]}"] = round(figures[q] / f[q], 2)
        a_req, f_req = agent.get("api_requests_per_claim"), floor.get("api_requests_per_claim")
        if a_req is not None and f_req is not None:
            row["api_requests_per_claim"] = {
                "agent": a_req,
                "floor": f_req,
                "difference": round(a_req - f_req, 2),
            }
        a_cpu, f_cpu = (
            agent.get("apiserver_cpu_ms_per_claim"),
            floor.get("apiserver_cpu_ms_per_claim"),
        )
        if a_cpu and f_cpu:
            row["apiserver_cpu_per_claim"] = round(a_cpu / f_cpu, 2)
        out[case] = row
    return out


def pytest_benchmark_update_machine_info(
    config: pytest.Config, machine_info: dict[str, Any]
) -> None:
    results = results_of(config)
    machine_info["cohdi"] = {
        **describe(),
        "kubernetes": KUBERNETES_VERSION,
        "load_at_start": results.get("_load_at_start"),
        "load_at_end": {**load(), "uptime": _uptime()},
        "scheduler_client": results.get("_scheduler_client"),
    }


def pytest_benchmark_update_json(
    config: pytest.Config, benchmarks: list[Any], output_json: dict[str, Any]
) -> None:
    output_json["floor_ratios"] = ratios(results_of(config))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    found = ratios(results_of(config))
    if not found:
        return
    terminalreporter.section("agent / floor, same run")
    for case, row in found.items():
        parts = [
            f"allocated→ready p50 {row.get('allocated_to_ready_p50')}x "
            f"p99 {row.get('allocated_to_ready_p99')}x",
            f"without the fabric's attach p50 {row.get('overhead_p50')}x "
            f"p99 {row.get('overhead_p99')}x",
        ]
        req = row.get("api_requests_per_claim")
        if req:
            parts.append(
                f"API requests/claim {req['agent']} vs {req['floor']} ({req['difference']:+})"
            )
        if row.get("apiserver_cpu_per_claim"):
            parts.append(f"API-server CPU/claim {row['apiserver_cpu_per_claim']}x")
        terminalreporter.write_line(f"{case}: " + "; ".join(parts))
