"""Metrics an operator can alert on: both roles' `/metrics` pass Prometheus's own text parser and
the linter `promtool check metrics` runs (tests/promlint, built from the Go module proxy), the
process and Python collectors are there, every counter whose labels are known is there from the
start at 0, and every query of the Grafana dashboard names a metric that exists.

Before: no process_*/python_* series; no leader status, pool devices by state and model, detach
latency, fabric HTTP errors and latency, API errors, work-queue depth and retries; nothing from the
node role; failure series absent until the first failure."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import settings
from agent.devcluster.controlplane import free_port
from agent.simulated import stubnvml
from agent.simulated.sysfs import add_function
from tests import promlint

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "packaging" / "grafana" / "cohdi-agent.json"

DEAD_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: u, user: {token: not-used}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
"""

#: Series that must exist at 0 in a process that has done nothing yet.
ZERO_AT_START = (
    'cohdi_decisions_total{kind="detached"}',
    'cohdi_decisions_total{kind="attach-requested"}',
    'cohdi_failures_total{reason="AttachDeadline"}',
    'cohdi_failures_total{reason="NodeGone"}',
    'cohdi_kube_api_errors_total{code="409",verb="patch"}',
    'cohdi_kube_api_errors_total{code="none",verb="watch"}',
    'cohdi_fabric_operation_errors_total{backend="redfish",error="FabricUnavailable",'
    'operation="attach"}',
    'cohdi_fabric_http_errors_total{backend="fti",code="503",method="POST"}',
    'cohdi_node_claim_errors_total{operation="prepare"}',
    'cohdi_node_claims_total{operation="unprepare"}',
    'cohdi_node_hotplug_events_total{action="add",source="kernel"}',
    'cohdi_node_reports_total{report="NodeReleased"}',
    "cohdi_nvml_errors_total",
    "cohdi_events_dropped_total",
    'cohdi_resourceslice_writes_total{op="create"}',
    'cohdi_workqueue_retries_total{queue="composer"}',
    'cohdi_workqueue_depth{queue="scaler"}',
    "cohdi_leader",
    'cohdi_role_restarts_total{role="node"}',
    'cohdi_role_restarts_total{role="cluster"}',
)


def samples(exposition: str) -> dict[str, float]:
    """`name{label="value",...}` (labels sorted) -> value, via prometheus_client's parser."""
    out = {}
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def names(exposition: str) -> set[str]:
    """Every series name an exposition declares, with or without samples yet (a gauge by role
    has none until a role runs): family names and their type's suffixes (_total; _bucket, _sum,
    _count)."""
    out = set()
    for family in text_string_to_metric_families(exposition):
        out |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
        out |= {s.name for s in family.samples}
    return out


@pytest.fixture(scope="module")
def linter() -> Path:
    return promlint.build()


def _fresh_exposition() -> str:
    """What a process that has imported both roles and done nothing exposes."""
    code = (
        "import agent.app, agent.controllers.running, agent.node.plugin, agent.fabric.backends;"
        "from prometheus_client import generate_latest;"
        "from agent.health import REGISTRY;"
        "import sys; sys.stdout.write(generate_latest(REGISTRY).decode())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return done.stdout


def test_every_known_counter_is_there_from_the_start_at_zero(linter: Path) -> None:
    exposition = _fresh_exposition()
    found = samples(exposition)
    for series in ZERO_AT_START:
        assert series in found, f"{series} missing at start"
        assert found[series] == 0, series
    assert any(n.startswith("process_") for n in found), "process collector"
    assert any(n.startswith("python_") for n in found), "python collector"
    report = promlint.lint(linter, exposition)
    counters = sum(1 for s, v in found.items() if s.startswith("cohdi_") and "_total" in s)
    print(
        f"{report['families']} families, {len(found)} series ({counters} cohdi counters), "
        f"lint problems: {report['problems']} ({report['library']})"
    )
    assert report["problems"] == []


# --- both roles' endpoints, served by real processes --------------------------------------------


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--log-format", "json", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "COHDI_FABRIC_PASSWORD": "not-used"},
        )


def _scrape(port: int, log: Path, deadline: float) -> str:
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return str(r.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"no /metrics on {port}:\n{log.read_text()[-2000:]}") from None
            time.sleep(0.2)


@pytest.fixture
def roles() -> Iterator[dict[str, tuple[int, Path]]]:
    """A node-role and a cluster-role process with --metrics-port, against an API server that
    does not answer: role -> (port, log)."""
    # short: the plugin's sockets live under it (unix socket paths < 108 bytes)
    tmp_path = Path(tempfile.mkdtemp(prefix="met-", dir="/tmp"))
    kubeconfig = tmp_path / "dead.kubeconfig"
    kubeconfig.write_text(DEAD_KUBECONFIG)
    add_function(tmp_path / "sys", "0000:41:00.0")
    (tmp_path / "nvml-gpus").touch()
    stub = stubnvml.build(settings.Settings().cache_dir)
    common = ["--kubeconfig", str(kubeconfig), "--kube-backoff-max", "1"]
    node_port, cluster_port = free_port(), free_port()
    procs = {
        "node": _spawn(
            [
                *common,
                "--roles",
                "node",
                "--node-name",
                "n1",
                "--node-sysfs-root",
                str(tmp_path / "sys"),
                "--node-nvml-path",
                str(stub),
                "--node-kubelet-dir",
                str(tmp_path / "kubelet"),
                "--node-cdi-dir",
                str(tmp_path / "cdi"),
                "--metrics-port",
                str(node_port),
            ],
            tmp_path / "node.log",
        ),
        "cluster": _spawn(
            [
                *common,
                "--roles",
                "cluster",
                "--fabric-url",
                "https://127.0.0.1:9",
                "--metrics-port",
                str(cluster_port),
            ],
            tmp_path / "cluster.log",
        ),
    }
    try:
        yield {
            "node": (node_port, tmp_path / "node.log"),
            "cluster": (cluster_port, tmp_path / "cluster.log"),
        }
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_both_roles_endpoints_parse_and_lint(
    roles: dict[str, tuple[int, Path]], linter: Path
) -> None:
    deadline = time.monotonic() + 60
    scraped: dict[str, dict[str, float]] = {}
    for role, (port, log) in roles.items():
        # the API server never answers: wait until that is counted, then check the exposition
        while True:
            exposition = _scrape(port, log, deadline)
            found = samples(exposition)  # prometheus_client's parser: raises if malformed
            failed = sum(
                v for s, v in found.items() if s.startswith("cohdi_kube_api_errors_total{")
            )
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        report = promlint.lint(linter, exposition)  # Prometheus's own parser, promtool's linter
        print(
            f"{role}: {report['families']} families, {len(found)} series, "
            f"{failed:.0f} API errors counted, lint problems: {report['problems']}"
        )
        assert report["problems"] == []
        assert failed > 0, f"{role}: an API server that never answers is counted"
        assert found[f'cohdi_role_up{{role="{role}"}}'] in (0.0, 1.0)
        assert "process_resident_memory_bytes" in found
        scraped[role] = found
    assert scraped["cluster"]["cohdi_leader"] == 0  # no Lease without an API server
    assert 'cohdi_role_up{role="cluster"}' not in scraped["node"]


# --- the Grafana dashboard ------------------------------------------------------------------------

#: Words of PromQL that look like metric names but are not.
_PROMQL = {
    "sum",
    "by",
    "without",
    "rate",
    "increase",
    "irate",
    "histogram_quantile",
    "le",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "avg",
    "max",
    "min",
    "count",
    "label_values",
}


def dashboard_queries(dashboard: dict[str, object]) -> list[str]:
    out: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                out.append(node["expr"])
            for key, value in node.items():
                if key == "definition" and isinstance(value, str):
                    out.append(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    return out


def metric_names(query: str) -> set[str]:
    """The metric names a PromQL query reads: identifiers outside {...} label matchers, outside
    `by (...)` groupings and [...] ranges, that are not PromQL's own words."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", query)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", bare)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare))
    return {w for w in words if w not in _PROMQL and not w.startswith("__") and "_" in w}


def test_every_dashboard_query_names_an_existing_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    existing = names(_fresh_exposition())
    used: set[str] = set()
    for query in queries:
        read = metric_names(query)
        assert read, f"names no metric: {query}"
        missing = read - existing
        assert not missing, f"{query} reads {sorted(missing)}, which /metrics does not have"
        used |= read
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]  # type: ignore[attr-defined]
    print(f"{len(panels)} panels, {len(queries)} queries over {len(used)} metrics")
    # what an operator alerts on is on it
    for metric in (
        "cohdi_leader",
        "cohdi_failures_total",
        "cohdi_kube_api_errors_total",
        "cohdi_fabric_operation_errors_total",
        "cohdi_workqueue_depth",
        "cohdi_node_claim_errors_total",
        "cohdi_fabric_detach_seconds_bucket",
        "cohdi_pool_devices",
    ):
        assert metric in used, metric


def test_the_query_reader_sees_names_and_nothing_else() -> None:
    q = 'histogram_quantile(0.99, sum by (le, queue) (rate(x_seconds_bucket{a="b_c"}[5m])))'
    assert metric_names(q) == {"x_seconds_bucket"}
    assert metric_names('process_open_fds{i=~"$i"} / process_max_fds') == {
        "process_open_fds",
        "process_max_fds",
    }
