"""Health of this process: the one Prometheus registry, the readiness checks of each role, and the
HTTP endpoints that serve them (`/metrics`, `/healthz`, `/readyz`) on the metrics address.

- `/healthz` answers 200 `ok` whenever the event loop runs the handler: it says the process is
  alive and not wedged, nothing more (a kubelet liveness probe restarts us when it stops).
- `/readyz` runs every registered check. A check returns the reasons it is failing, one plain-text
  line each (an empty list means ready). 200 when none fails, else 503; the body has one line per
  check, `[+]name ok` or `[-]name: reason`, in the style of kube-apiserver's own `/readyz`.

The role checks (cluster: Lease campaign running and, while leading, informers synced and the
fabric reachable; node: plugin serving and first PCI scan done) are registered by `agent.app`;
this module knows nothing of roles, so every layer may import it.

Metrics. `REGISTRY` has the process and Python collectors (`process_*`, `python_*`), the
supervision metrics of both roles, and the metrics of the layers below the roles: the Kubernetes
API client, the Event recorder, the fabric clients and the node role. The cluster role's own are
in `agent.controllers.metrics`. Every counter whose label values are known is created with them
at import (value 0), so a rate() or an increase() alert sees the first failure, not an absent
series; `packaging/grafana/cohdi-agent.json` is a dashboard built on them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

#: No `<counter>_created` series: they would double every counter's series (timestamps of
#: when each label set was first seen), and nothing reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Every metric of the process (cluster and node role) lives here; `/metrics` serves it.
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes...
PlatformCollector(registry=REGISTRY)  # python_info
GCCollector(registry=REGISTRY)  # python_gc_*

#: Latency buckets (seconds) of calls to the API server, the fabric manager and kubelet's.
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def zeroed(counter: Counter, *label_sets: tuple[str, ...]) -> Counter:
    """Create `counter`'s series for the label sets known in advance (value 0)."""
    for labels in label_sets:
        counter.labels(*labels)
    return counter


ROLE_UP = Gauge(
    "cohdi_role_up",
    "1 while the role runs, 0 while it waits to be restarted after a failure.",
    ["role"],
    registry=REGISTRY,
)
ROLE_RESTARTS = zeroed(
    Counter(
        "cohdi_role_restarts",
        "Times a role failed (raised or returned) and was restarted with backoff.",
        ["role"],
        registry=REGISTRY,
    ),
    ("cluster",),
    ("node",),
)
LOOP_UP = Gauge(
    "cohdi_loop_up",
    "1 while a loop of the cluster role runs (leader only), 0 otherwise.",
    ["loop"],
    registry=REGISTRY,
)
LOOP_RESTARTS = Counter(
    "cohdi_loop_restarts",
    "Times a loop of a role failed and was restarted with backoff, by loop and error class.",
    ["loop", "error"],
    registry=REGISTRY,
)

#: A readiness check: the reasons it fails now, one line each; empty when ready.
Check = Callable[[], list[str]]


class Health:
    """The named readiness checks of this process. Checks are called on every `/readyz`, so
    they only read state (flags, events, counters); they never do I/O."""

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}

    def add(self, name: str, check: Check) -> None:
        self._checks[name] = check

    def remove(self, name: str) -> None:
        self._checks.pop(name, None)

    def failing(self) -> dict[str, list[str]]:
        """Check name -> its reasons, for the checks that fail now. A check that raises is a bug;
        it is reported as failing with the exception, never hidden."""
        out: dict[str, list[str]] = {}
        for name, check in self._checks.items():
            try:
                reasons = check()
            except Exception as exc:  # a broken check must not break the endpoint
                reasons = [f"the check itself failed: {type(exc).__name__}: {exc}"]
            if reasons:
                out[name] = reasons
        return out

    def report(self) -> tuple[bool, str]:
        """(ready, plain-text body): one line per check, then a summary line."""
        failing = self.failing()
        lines: list[str] = []
        for name in sorted(self._checks):
            if name in failing:
                lines += [f"[-]{name}: {reason}" for reason in failing[name]]
            else:
                lines.append(f"[+]{name} ok")
        ready = not failing
        lines.append("readyz check passed" if ready else "readyz check failed")
        return ready, "\n".join(lines) + "\n"


async def serve(health: Health, *, address: str, port: int) -> Any:
    """Start `/metrics`, `/healthz` and `/readyz` on address:port (port 0 picks a free one; read
    it back with `bound_port`). Returns the aiohttp runner; `await runner.cleanup()` stops it.
    Raises OSError when the address cannot be bound (the caller reports it as a config error)."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_request: web.Request) -> web.Response:
        ready, body = health.report()
        return web.Response(text=body, status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, address, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: Any) -> int:
    """The TCP port a runner from `serve` listens on."""
    return int(runner.addresses[0][1])


# --- the Kubernetes API client and the Event recorder -------------------------------------------

#: The verbs `kube_api_verb` gives, and the answers worth an alert from the start.
KUBE_VERBS = ("get", "list", "watch", "create", "update", "patch", "delete")
KUBE_CODES = ("none", "403", "404", "409", "410", "422", "429", "500", "503")

KUBE_API_ERRORS = zeroed(
    Counter(
        "cohdi_kube_api_errors",
        "Requests to the Kubernetes API server that failed, by verb and HTTP status code "
        "('none': no answer — a timeout, a refused or reset connection).",
        ["verb", "code"],
        registry=REGISTRY,
    ),
    *((verb, code) for verb in KUBE_VERBS for code in KUBE_CODES),
)
EVENTS_DROPPED = Counter(
    "cohdi_events_dropped",
    "Occurrences of Kubernetes Events that could not be written (RBAC, API server away).",
    registry=REGISTRY,
)


def kube_api_verb(method: str, path: str, params: object = None) -> str:
    """The Kubernetes verb of a request: GET of a collection is list (of one object get),
    WATCH (a streaming GET) watch, POST create, PUT update, PATCH patch, DELETE delete."""
    method = method.upper()
    if method == "WATCH":
        return "watch"
    if method == "GET":
        segments = [p for p in path.split("?", 1)[0].strip("/").split("/") if p]
        # /api/v1/<plural>, /api/v1/namespaces/<ns>/<plural>, /apis/<g>/<v>/... : a collection
        # path has an odd number of segments after the group/version prefix
        prefix = 2 if segments[:1] == ["api"] else 3
        rest = segments[prefix:]
        if rest[:1] == ["namespaces"] and len(rest) >= 3:
            rest = rest[2:]
        return "list" if len(rest) == 1 else "get"
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
        method, method.lower()
    )


# --- the fabric clients -------------------------------------------------------------------------

FABRIC_BACKENDS = ("redfish", "fti")
#: What the cluster role asks a fabric manager for (the FabricManager protocol's calls).
FABRIC_OPERATIONS = ("attach", "detach", "inventory")
#: The fabric branch of the error tree (agent.errors): what an operation may fail with.
FABRIC_ERRORS = (
    "FabricUnavailable",
    "FabricTimeout",
    "FabricProtocolError",
    "FabricAuthError",
    "FabricRejected",
    "DeviceBusy",
    "DeviceFailed",
    "DeviceNotFound",
)

FABRIC_OPERATION_SECONDS = Histogram(
    "cohdi_fabric_operation_seconds",
    "Time of one fabric operation as the cluster role saw it (retries and task polling "
    "included), by backend, operation and outcome (ok or error).",
    ["backend", "operation", "outcome"],
    buckets=CALL_BUCKETS,
    registry=REGISTRY,
)
FABRIC_OPERATION_ERRORS = zeroed(
    Counter(
        "cohdi_fabric_operation_errors",
        "Fabric operations that failed, by backend, operation and error class.",
        ["backend", "operation", "error"],
        registry=REGISTRY,
    ),
    *((b, op, e) for b in FABRIC_BACKENDS for op in FABRIC_OPERATIONS for e in FABRIC_ERRORS),
)
FABRIC_HTTP_SECONDS = Histogram(
    "cohdi_fabric_http_request_seconds",
    "Time of one HTTP request to the fabric manager, by backend, method and status code "
    "('none': no answer).",
    ["backend", "method", "code"],
    buckets=CALL_BUCKETS,
    registry=REGISTRY,
)
FABRIC_HTTP_ERRORS = zeroed(
    Counter(
        "cohdi_fabric_http_errors",
        "HTTP requests to the fabric manager that got no answer ('none') or an error status "
        "(4xx, 5xx), by backend, method and code.",
        ["backend", "method", "code"],
        registry=REGISTRY,
    ),
    *(
        (b, m, c)
        for b in FABRIC_BACKENDS
        for m in ("GET", "POST", "PATCH", "DELETE")
        for c in ("none", "401", "404", "409", "500", "503")
    ),
)


# --- the node role ------------------------------------------------------------------------------

NODE_OPERATIONS = ("prepare", "unprepare")

NODE_CLAIM_SECONDS = Histogram(
    "cohdi_node_claim_seconds",
    "Time of one NodePrepareResources / NodeUnprepareResources for one claim, by operation and "
    "outcome (ok or error).",
    ["operation", "outcome"],
    buckets=CALL_BUCKETS,
    registry=REGISTRY,
)
NODE_CLAIM_ERRORS = zeroed(
    Counter(
        "cohdi_node_claim_errors",
        "Claims whose prepare or unprepare failed (the error went back to kubelet, which "
        "retries), by operation.",
        ["operation"],
        registry=REGISTRY,
    ),
    *((op,) for op in NODE_OPERATIONS),
)
NODE_CLAIMS = zeroed(
    Counter(
        "cohdi_node_claims",
        "Claims prepared or unprepared by this node's kubelet plugin, by operation.",
        ["operation"],
        registry=REGISTRY,
    ),
    *((op,) for op in NODE_OPERATIONS),
)
HOTPLUG_EVENTS = zeroed(
    Counter(
        "cohdi_node_hotplug_events",
        "PCI hot-plug events the node role received, by source (kernel uevents or, on a "
        "synthetic tree, inotify) and action (add, remove, change...).",
        ["source", "action"],
        registry=REGISTRY,
    ),
    *((src, a) for src in ("kernel", "inotify") for a in ("add", "remove")),
)
NODE_REPORTS = zeroed(
    Counter(
        "cohdi_node_reports",
        "Reports the node role wrote on ComposableResources: NodeReady (device seen), "
        "NodeReleased (removed safely), Busy (a process or open handle holds it).",
        ["report"],
        registry=REGISTRY,
    ),
    *((r,) for r in ("NodeReady", "NodeReleased", "Busy")),
)
NODE_UNHEALTHY_DEVICES = Gauge(
    "cohdi_node_unhealthy_devices",
    "GPUs the node role reports unhealthy (DeviceHealthy=False on their ComposableResource), by "
    "reason: Xid<n>, DoubleBitEcc, GpuUnavailable, FellOffBus...",
    ["reason"],
    registry=REGISTRY,
)
NVML_ERRORS = Counter(
    "cohdi_nvml_errors",
    "NVML calls that failed on this node (a re-init follows; a GPU NVML cannot see has no "
    "UUID and no process check).",
    registry=REGISTRY,
)
