"""What the benchmarks share: percentiles, the API server's request counts and CPU, process
figures from /proc, and a clock that timestamps every claim and pod transition from watches.

Instants are `time.perf_counter()` seconds taken on the benchmark's event loop as the watch event
is handled; every figure leaves here in milliseconds (`*_ms`), MiB (`*_mib`) or CPU seconds.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from agent.kube import config as kubeconfig_loader
from agent.kube.client import Kube, Obj, path_of
from agent.kube.resources import CLAIM_ANNOTATION, NODE_READY, RESOURCES, condition, state
from agent.kube.watching import Event, Informer
from agent.model import claims as claimmodel

NS = "default"
CLAIMS = path_of(group="resource.k8s.io", version="v1", plural="resourceclaims", namespace=NS)
PODS = path_of(group="", version="v1", plural="pods", namespace=NS)


def percentiles(samples_s: Iterable[float]) -> dict[str, float]:
    """n, p50, p90, p99, max and mean of `samples_s` (seconds) in milliseconds, nearest rank
    (the p99 of fewer than 100 samples is the largest); no samples → {"n": 0}."""
    s = sorted(samples_s)
    if not s:
        return {"n": 0}

    def pick(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))] * 1e3, 2)

    return {
        "n": len(s),
        "p50_ms": pick(0.5),
        "p90_ms": pick(0.9),
        "p99_ms": pick(0.99),
        "max_ms": round(s[-1] * 1e3, 2),
        "mean_ms": round(statistics.fmean(s) * 1e3, 2),
    }


# --- processes ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory(pid: int) -> dict[str, float]:
    """The process's memory from /proc/<pid>/status, in MiB (2**20 bytes): rss (VmRSS), its
    anonymous and file-backed parts, the peak (VmHWM); and its thread count."""
    wanted = {
        "VmRSS": "rss_mib",
        "RssAnon": "rss_anon_mib",
        "RssFile": "rss_file_mib",
        "VmHWM": "rss_peak_mib",
    }
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            out[wanted[key]] = round(int(value.split()[0]) / 1024, 1)
        elif key == "Threads":
            out["threads"] = int(value)
    return out


def mappings(pid: int, top: int = 12) -> dict[str, float]:
    """Resident MiB per mapping of the process (/proc/<pid>/smaps), largest first: each shared
    library by file name, "[anon]" for anonymous memory (Python's object arenas, thread
    stacks, C libraries' own allocations), "[heap]" for the brk heap (glibc malloc)."""
    per: Counter[str] = Counter()
    current = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split()
            current = os.path.basename(parts[5]) if len(parts) > 5 else "[anon]"
        elif line.startswith("Rss:"):
            per[current] += int(line.split()[1])
    return {name: round(kib / 1024, 2) for name, kib in per.most_common(top)}


def load() -> dict[str, Any]:
    """The machine's load now: load averages (1/5/15 min) and the `uptime` line."""
    one, five, fifteen = os.getloadavg()
    return {"loadavg": [round(one, 2), round(five, 2), round(fifteen, 2)]}


# --- the API server -------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
#: Requests every API server makes by itself, whatever the benchmark does: its own identity
#: Lease renewed every 10 s, and long-running watches (counted when they end, not when they
#: start, so they land in whichever window a reconnect happens to fall).
_IGNORED_RESOURCES = frozenset({"leases"})
_IGNORED_VERBS = frozenset({"WATCH", "CONNECT"})

RequestKey = tuple[str, str, str]  # (verb, resource, subresource)


@dataclass(frozen=True)
class Snapshot:
    at: float
    requests: Counter[RequestKey] | None
    cpu: dict[str, float]


@dataclass
class ApiServer:
    """The API server under measurement. Request counts come from its `apiserver_request_total`
    (GET /metrics with the kubeconfig's credentials; None where that is forbidden); CPU from
    /proc for the processes this suite started (`pids`: component → pid; empty for a cluster
    given with --kubeconfig, whose processes are not ours to read)."""

    kubeconfig: str
    pids: dict[str, int] = field(default_factory=dict)

    _access: kubeconfig_loader.Access | None = None

    async def request_counts(self) -> Counter[RequestKey] | None:
        if self._access is None:
            self._access = kubeconfig_loader.find(self.kubeconfig)[1]
        access = self._access
        if access is None:  # exec plugins: kubernetes-asyncio's loader, not worth it here
            return None
        headers = {"Accept": "text/plain"}
        token = await access.auth()
        if token:
            headers["Authorization"] = token
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=access.ssl)) as session,
            session.get(
                access.host + "/metrics",
                headers=headers,
                server_hostname=access.server_hostname,
                timeout=aiohttp.ClientTimeout(total=30),
            ) as resp,
        ):
            if resp.status != 200:
                return None
            text = await resp.text()
        counts: Counter[RequestKey] = Counter()
        for line in text.splitlines():
            m = _SAMPLE.match(line)
            if not m:
                continue
            labels = dict(_LABEL.findall(m["labels"]))
            verb, resource = labels.get("verb", ""), labels.get("resource", "")
            if verb in _IGNORED_VERBS or resource in _IGNORED_RESOURCES or not resource:
                continue
            counts[(verb, resource, labels.get("subresource", ""))] += int(float(m["value"]))
        return counts

    def cpu(self) -> dict[str, float]:
        out = {}
        for name, pid in self.pids.items():
            try:
                out[name] = cpu_seconds(pid)
            except OSError:
                continue
        return out

    async def snapshot(self) -> Snapshot:
        return Snapshot(time.perf_counter(), await self.request_counts(), self.cpu())


def difference(before: Snapshot, after: Snapshot, claims: int) -> dict[str, Any]:
    """What happened on the API server between two snapshots, for `claims` claims: requests
    (total, per claim, and the ten most frequent kinds), and CPU seconds per component (with
    milliseconds per claim for the API server)."""
    out: dict[str, Any] = {"window_s": round(after.at - before.at, 2)}
    if before.requests is not None and after.requests is not None:
        delta = after.requests - before.requests
        total = sum(delta.values())
        out["api_requests"] = total
        out["api_requests_per_claim"] = round(total / max(claims, 1), 2)
        out["api_requests_by_kind"] = {
            " ".join(k for k in key if k): n for key, n in delta.most_common(10)
        }
    else:
        out["api_requests"] = None
    if before.cpu and after.cpu:
        cpu = {k: round(after.cpu[k] - before.cpu[k], 2) for k in after.cpu if k in before.cpu}
        out["cpu_s"] = cpu
        if "kube-apiserver" in cpu:
            out["apiserver_cpu_ms_per_claim"] = round(cpu["kube-apiserver"] * 1e3 / claims, 1)
    return out


# --- claims and pods, from watches ---------------------------------------------------------------


class ClaimClock:
    """Timestamps (perf_counter) of every claim this benchmark submits: submitted, allocated
    (any device of `driver`), ready (`FabricDeviceReady` on every device waiting for it),
    bound (the pod has a node); a claim allocated a device with no binding conditions is
    `warm`. The ComposableResource of a claim (the scaler's annotation) adds attaching,
    online (the fabric attached it) and node_ready (the node reported it): fabric attach and
    hot-plug → ready as the API shows them, also on a cluster whose agent is not ours."""

    def __init__(self, kube: Kube, driver: str) -> None:
        self.kube = kube
        self.driver = driver
        self.submitted: dict[str, float] = {}
        self.allocated: dict[str, float] = {}
        self.ready: dict[str, float] = {}
        self.bound: dict[str, float] = {}
        self.device: dict[str, tuple[str, str]] = {}
        self.warm: set[str] = set()
        self.attaching: dict[str, float] = {}
        self.online: dict[str, float] = {}
        self.node_ready: dict[str, float] = {}
        self.claims = Informer(kube, CLAIMS, name="bench-claims")
        self.pods = Informer(kube, PODS, name="bench-pods")
        self.resources = Informer(kube, RESOURCES, name="bench-resources")
        self.claims.add_handler(self._on_claim)
        self.pods.add_handler(self._on_pod)
        self.resources.add_handler(self._on_resource)
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(i.run()) for i in (self.claims, self.pods, self.resources)
        ]
        for i in (self.claims, self.pods, self.resources):
            await i.synced.wait()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_claim(self, e: Event) -> None:
        name = e.obj["metadata"]["name"]
        if name not in self.submitted or e.type == "DELETED":
            return
        now = time.perf_counter()
        held = claimmodel.allocated_devices(e.obj, self.driver)
        waiting = claimmodel.bindings(e.obj, self.driver)
        if held and name not in self.allocated:
            self.allocated[name] = now
            self.device[name] = min(held)
            if not waiting:
                self.warm.add(name)
        if waiting and all(b.ready for b in waiting) and name not in self.ready:
            self.ready[name] = now
        self._changed.set()

    def _on_pod(self, e: Event) -> None:
        name = e.obj["metadata"]["name"]
        if name in self.submitted and e.obj.get("spec", {}).get("nodeName"):
            self.bound.setdefault(name, time.perf_counter())
            self._changed.set()

    def _on_resource(self, e: Event) -> None:
        ref = (e.obj["metadata"].get("annotations") or {}).get(CLAIM_ANNOTATION, "")
        name = ref.rpartition("/")[2]
        if name not in self.submitted or e.type == "DELETED":
            return
        now = time.perf_counter()
        if state(e.obj) == "Attaching":
            self.attaching.setdefault(name, now)
        if state(e.obj) == "Online":
            self.online.setdefault(name, now)
        if condition(e.obj, NODE_READY):
            self.node_ready.setdefault(name, now)

    async def until(self, done: Callable[[], bool], timeout: float) -> None:  # noqa: ASYNC109
        """Return once `done()` holds after some watch event (checked at once, then after each
        claim or pod event); TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while not done():
                self._changed.clear()
                await self._changed.wait()

    def settled(self, name: str) -> bool:
        """The claim needs nothing more from the driver: ready, or allocated warm."""
        return name in self.ready or name in self.warm

    def spans(self, names: list[str], start: str, end: str) -> list[float]:
        """Seconds from instant `start` to instant `end` of each claim that has both."""
        a, b = getattr(self, start), getattr(self, end)
        return [b[n] - a[n] for n in names if n in a and n in b]

    def figures(self, names: list[str]) -> dict[str, Any]:
        """Percentiles of every phase over `names`, cold (an attach was needed) and warm apart."""
        cold = [n for n in names if n not in self.warm]
        warm = [n for n in names if n in self.warm]
        return {
            "claims": len(names),
            "warm": len(warm),
            "submit_to_allocated": percentiles(self.spans(names, "submitted", "allocated")),
            "allocated_to_ready": percentiles(self.spans(cold, "allocated", "ready")),
            "attaching_to_online": percentiles(self.spans(cold, "attaching", "online")),
            "online_to_node_ready": percentiles(self.spans(cold, "online", "node_ready")),
            "ready_to_bound": percentiles(self.spans(cold, "ready", "bound")),
            "submit_to_bound_cold": percentiles(self.spans(cold, "submitted", "bound")),
            "submit_to_bound_warm": percentiles(self.spans(warm, "submitted", "bound")),
        }


async def bounded(coros: Iterable[Awaitable[Any]], limit: int = 32) -> list[Any]:
    """Run the awaitables with at most `limit` in flight; results in order."""
    sem = asyncio.Semaphore(limit)

    async def one(c: Awaitable[Any]) -> Any:
        async with sem:
            return await c

    return list(await asyncio.gather(*(one(c) for c in coros)))


def strip(obj: Obj) -> Obj:
    """The object without managedFields (smaller in logs and JSON)."""
    meta = {k: v for k, v in obj.get("metadata", {}).items() if k != "managedFields"}
    return {**obj, "metadata": meta}
