"""Prometheus metrics of the cluster role: leadership, decisions, failures, attach and detach
latency, the pool's devices, publication, the work queues. They live in the process's one
registry (`agent.health.REGISTRY`, re-exported here), beside the supervision metrics of both roles
and those of the API client, the fabric clients and the node role (`agent.health`).

Every counter is created with the label values known in advance (0 at start), so an alert on
`increase(...)` sees the first failure. A decision counted here is also one INFO line with
`decision=<kind>` (`agent.logs`) and, where an object is concerned, one Event.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Final, Protocol, TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.health import CALL_BUCKETS, REGISTRY, zeroed
from agent.model.fabric import DeviceState, Inventory

__all__ = [
    "ATTACH_SECONDS",
    "DECISIONS",
    "DETACH_SECONDS",
    "FAILURES",
    "LEADER",
    "POOL_DEVICES",
    "QUEUES",
    "READY_SECONDS",
    "REGISTRY",
    "SLICE_WRITES",
    "TAINTS",
    "UNHEALTHY_DEVICES",
    "pool_devices",
    "timed",
    "unhealthy_devices",
]

#: The decisions the cluster role counts (`cohdi_decisions_total{kind}`), each also logged at
#: INFO with `decision=<kind>`.
DECISION_KINDS: Final = (
    "attach-requested",  # scaler: a ComposableResource made for a claim's device
    "attached",  # composer: the fabric attached it
    "ready",  # scaler: FabricDeviceReady=True on the claim
    "failed",  # composer: the resource failed (see cohdi_failures_total{reason})
    "scale-down",  # scaler: an idle device's resource deleted
    "detached",  # composer: the fabric detached it
    "reattach",  # scaler: a claim holds a device not on its node: attached again
    "adopted",  # composer: a GPU whose attach answer was lost, adopted for its slot
    "orphan-adopted",  # scaler: a GPU attached with no resource, adopted
    "node-gone",  # composer: a resource of a Node gone for --node-gone-grace, released
    "warm",  # scaler: a GPU attached ahead of demand (warm capacity on a node)
    "node-pool",  # scaler: an attached idle device offered from its node's own pool
    "unhealthy-detach",  # scaler: an unhealthy device no claim holds, its resource deleted
)
#: Reasons of `cohdi_failures_total` known in advance (claims' and resources' failures).
FAILURE_REASONS: Final = (
    "AttachDeadline",
    "UnknownDevice",
    "DeviceOnOtherNode",
    "NodeDeviceLimit",
    "AttachFailed",
    "DeviceOwned",
    "NoFreeDevice",
    "NodeNotOnFabric",
    "DeviceBusy",
    "DeviceFailed",
    "DeviceNotFound",
    "FabricRejected",
    "NodeGone",
    "DeviceUnhealthy",
)

LEADER = Gauge(
    "cohdi_leader",
    "1 while this replica holds the Lease and runs the cluster role's controllers, else 0.",
    registry=REGISTRY,
)
DECISIONS = zeroed(
    Counter("cohdi_decisions", "Decisions taken by the cluster role.", ["kind"], registry=REGISTRY),
    *((k,) for k in DECISION_KINDS),
)
FAILURES = zeroed(
    Counter(
        "cohdi_failures",
        "Failures by reason (attach failed, deadline, limit...).",
        ["reason"],
        registry=REGISTRY,
    ),
    *((r,) for r in FAILURE_REASONS),
)
ATTACH_SECONDS = Histogram(
    "cohdi_fabric_attach_seconds",
    "Fabric attach time as the composer saw it.",
    buckets=CALL_BUCKETS,
    registry=REGISTRY,
)
DETACH_SECONDS = Histogram(
    "cohdi_fabric_detach_seconds",
    "Fabric detach time as the composer saw it (after the node's safe removal).",
    buckets=CALL_BUCKETS,
    registry=REGISTRY,
)
READY_SECONDS = Histogram(
    "cohdi_claim_ready_seconds",
    "Claim allocated (allocationTimestamp) to FabricDeviceReady set.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
    registry=REGISTRY,
)
SLICE_WRITES = zeroed(
    Counter(
        "cohdi_resourceslice_writes",
        "ResourceSlice writes by operation.",
        ["op"],
        registry=REGISTRY,
    ),
    ("create",),
    ("update",),
    ("delete",),
)
POOL_DEVICES = Gauge(
    "cohdi_pool_devices",
    "Devices of the fabric by fabric, model and state (free, attaching, attached, detaching, "
    "failed), as the leader last read them; absent on a standby.",
    ["fabric", "model", "state"],
    registry=REGISTRY,
)
UNHEALTHY_DEVICES = Gauge(
    "cohdi_unhealthy_devices",
    "Devices the leader holds unhealthy (tainted cohdi.io/unhealthy, or withheld), by the source "
    "that said so (node, fabric) and its reason (Xid79, DoubleBitEcc, FellOffBus, "
    "FabricCritical...); recovering devices (clear, within --health-grace) are not counted.",
    ["source", "reason"],
    registry=REGISTRY,
)
TAINTS = zeroed(
    Counter(
        "cohdi_device_taints",
        "DRA device taints (cohdi.io/unhealthy) the leader added to or removed from devices.",
        ["change"],
        registry=REGISTRY,
    ),
    ("added",),
    ("removed",),
)
WORK_SECONDS = Histogram(
    "cohdi_workqueue_work_seconds",
    "Time one handler of a cluster-role work queue took for one key, by queue.",
    ["queue"],
    buckets=CALL_BUCKETS,
    registry=REGISTRY,
)


def pool_devices(inventory: Inventory | None) -> None:
    """Set `cohdi_pool_devices` from an inventory (every state of every (fabric, model) that
    has a device, 0 where none is in that state); None clears it (leadership lost)."""
    POOL_DEVICES.clear()
    if inventory is None:
        return
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for d in inventory.devices:
        states = counts.setdefault((str(d.fabric), d.model), {s.value: 0 for s in DeviceState})
        states[d.state.value] += 1
    for (fabric, model), states in counts.items():
        for state, n in states.items():
            POOL_DEVICES.labels(fabric, model, state).set(n)


def unhealthy_devices(devices: Iterable[tuple[str, str]]) -> None:
    """Set `cohdi_unhealthy_devices` from (source, reason) of every unhealthy device."""
    counts: dict[tuple[str, str], int] = {}
    for key in devices:
        counts[key] = counts.get(key, 0) + 1
    UNHEALTHY_DEVICES.clear()
    for (source, reason), n in counts.items():
        UNHEALTHY_DEVICES.labels(source, reason).set(n)


class _Queue(Protocol):
    name: str
    retries: int

    @property
    def depth(self) -> int: ...


class QueueCollector(Collector):
    """`cohdi_workqueue_depth{queue}` and `cohdi_workqueue_retries_total{queue}`, read from the
    work queues when scraped. Queues are tracked weakly by name (the newest of a name wins: a
    new leadership term's queues replace the old ones); the names known in advance report 0
    until a queue of that name exists."""

    KNOWN: Final = (
        "scaler",
        "scale-down",
        "node-labels",
        "orphans",
        "node-pool-moves",
        "warm-capacity",
        "device-health",
        "composer",
        "requests",
    )

    def __init__(self) -> None:
        self._queues: dict[str, weakref.ref[_Queue]] = {}

    def track(self, *queues: _Queue) -> None:
        for queue in queues:
            self._queues[queue.name] = weakref.ref(queue)

    def _live(self) -> Iterator[tuple[str, _Queue | None]]:
        names = dict.fromkeys(self.KNOWN) | dict.fromkeys(self._queues)
        for name in names:
            ref = self._queues.get(name)
            yield name, ref() if ref is not None else None

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "cohdi_workqueue_depth",
            "Keys waiting in a cluster-role work queue (queued, marked again, or on a retry "
            "timer), by queue.",
            labels=["queue"],
        )
        retries = CounterMetricFamily(
            "cohdi_workqueue_retries",
            "Retries scheduled after transient failures in a cluster-role work queue, by queue "
            "(resets with each leadership term's new queues).",
            labels=["queue"],
        )
        for name, queue in self._live():
            depth.add_metric([name], queue.depth if queue is not None else 0)
            retries.add_metric([name], queue.retries if queue is not None else 0)
        yield depth
        yield retries


QUEUES = QueueCollector()
REGISTRY.register(QUEUES)

K = TypeVar("K")


def timed(queue: str, handle: Callable[[K], Awaitable[None]]) -> Callable[[K], Awaitable[None]]:
    """`handle`, observing each call's duration in `cohdi_workqueue_work_seconds{queue}`."""
    histogram = WORK_SECONDS.labels(queue)

    async def measured(key: K) -> None:
        started = time.monotonic()
        try:
            await handle(key)
        finally:
            histogram.observe(time.monotonic() - started)

    return measured
