"""Prometheus metrics of the cluster role: decisions, attach latency, failures, publication.
They live in the process's one registry (`agent.health.REGISTRY`, re-exported here), beside the
supervision metrics of both roles."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from agent.health import REGISTRY

__all__ = ["ATTACH_SECONDS", "DECISIONS", "FAILURES", "READY_SECONDS", "REGISTRY", "SLICE_WRITES"]

DECISIONS = Counter(
    "cohdi_decisions_total", "Decisions taken by the cluster role.", ["kind"], registry=REGISTRY
)
FAILURES = Counter(
    "cohdi_failures_total",
    "Failures by reason (attach failed, deadline, limit...).",
    ["reason"],
    registry=REGISTRY,
)
ATTACH_SECONDS = Histogram(
    "cohdi_fabric_attach_seconds",
    "Fabric attach time as the composer saw it.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
READY_SECONDS = Histogram(
    "cohdi_claim_ready_seconds",
    "Claim allocated (allocationTimestamp) to FabricDeviceReady set.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
    registry=REGISTRY,
)
SLICE_WRITES = Counter(
    "cohdi_resourceslice_writes_total",
    "ResourceSlice writes by operation.",
    ["op"],
    registry=REGISTRY,
)
