"""Reading ResourceClaims (raw JSON) into what the scaler decides on. Pure functions."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from agent.model.pool import FAILED, READY


@dataclass(frozen=True, slots=True)
class Binding:
    """One allocation result of our driver that waits for binding conditions."""

    namespace: str
    claim: str
    uid: str
    pool: str
    device: str  # the device's name in the slice
    node: str
    allocated_at: float  # epoch seconds (allocationTimestamp), 0 if absent
    ready: bool
    failed: bool


def node_of(allocation: dict[str, Any]) -> str:
    """The node a `bindsToNode` allocation is pinned to (matchFields metadata.name In [node])."""
    for term in (allocation.get("nodeSelector") or {}).get("nodeSelectorTerms") or []:
        for f in term.get("matchFields") or []:
            if f.get("key") == "metadata.name" and f.get("operator") == "In" and f.get("values"):
                return str(f["values"][0])
    return ""


def _condition(status: dict[str, Any], driver: str, pool: str, device: str, ctype: str) -> bool:
    for entry in status.get("devices") or []:
        if (entry.get("driver"), entry.get("pool"), entry.get("device")) == (driver, pool, device):
            return any(
                c.get("type") == ctype and c.get("status") == "True"
                for c in entry.get("conditions") or []
            )
    return False


def _epoch(ts: str | None) -> float:
    if not ts:
        return 0.0
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def bindings(claim: dict[str, Any], driver: str) -> list[Binding]:
    status = claim.get("status") or {}
    allocation = status.get("allocation")
    if not allocation:
        return []
    meta = claim["metadata"]
    node = node_of(allocation)
    out = []
    for r in (allocation.get("devices") or {}).get("results") or []:
        if r.get("driver") != driver or not r.get("bindingConditions"):
            continue
        out.append(
            Binding(
                namespace=meta.get("namespace", ""),
                claim=meta["name"],
                uid=meta.get("uid", ""),
                pool=r["pool"],
                device=r["device"],
                node=node,
                allocated_at=_epoch(allocation.get("allocationTimestamp")),
                ready=_condition(status, driver, r["pool"], r["device"], READY),
                failed=_condition(status, driver, r["pool"], r["device"], FAILED),
            )
        )
    return out


def allocated_devices(claim: dict[str, Any], driver: str) -> set[tuple[str, str]]:
    """(pool, device name) of every device of our driver this claim holds, conditions or not."""
    allocation = (claim.get("status") or {}).get("allocation") or {}
    return {
        (r["pool"], r["device"])
        for r in (allocation.get("devices") or {}).get("results") or []
        if r.get("driver") == driver
    }


def with_condition(
    claim: dict[str, Any],
    *,
    driver: str,
    pool: str,
    device: str,
    ctype: str,
    reason: str,
    message: str,
    now: float,
) -> dict[str, Any] | None:
    """The claim with `ctype=True` set in exactly our (driver, pool, device) entry of
    status.devices, other drivers' entries untouched; None if that allocation is gone. `now`:
    epoch seconds, written as the condition's lastTransitionTime."""
    status = claim.get("status") or {}
    results = ((status.get("allocation") or {}).get("devices") or {}).get("results") or []
    match = next(
        (
            r
            for r in results
            if (r.get("driver"), r.get("pool"), r.get("device")) == (driver, pool, device)
        ),
        None,
    )
    if match is None:
        return None
    stamp = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    condition = {
        "type": ctype,
        "status": "True",
        "reason": reason,
        "message": message[:1000],
        "lastTransitionTime": stamp,
    }
    devices = [dict(e) for e in status.get("devices") or []]
    for entry in devices:
        if (entry.get("driver"), entry.get("pool"), entry.get("device")) == (driver, pool, device):
            entry["conditions"] = [
                c for c in entry.get("conditions") or [] if c.get("type") != ctype
            ] + [condition]
            break
    else:
        entry = {"driver": driver, "pool": pool, "device": device, "conditions": [condition]}
        if match.get("shareID"):
            entry["shareID"] = match["shareID"]
        devices.append(entry)
    return {**claim, "status": {**status, "devices": devices}}
