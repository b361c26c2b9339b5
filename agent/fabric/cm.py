"""The FTI cluster-manager client: per-machine, per-model minimum and maximum device counts, as
CoHDI's Composable DRA Driver reads them when `USE_CM` is on.

Reads, with the FM client's token (`FtiFabric.cm_get`):

1. `GET v2/tenants/<T>/clusters/<C>/nodegroups` → `nodegroups[].uuid`
2. per group, `GET v2/tenants/<T>/clusters/<C>/nodegroups/<NG>` → `mach_ids[]` (machine uuids; an
   integer `mach_id` is taken too and matched as its decimal string)
3. per group, `GET v3/tenants/<T>/clusters/<C>/machines/<M>` of one machine of the group (CoHDI
   reads one and applies it to the group) → `data.cluster.machine.resspecs[]`:
   `min_resspec_count`, `max_resspec_count` (null: no bound) and the model in
   `selector.expression.conditions[{column: model, operator: eq, value}]`.

A malformed answer is a `FabricProtocolError` naming the field; so is a model whose minimum is
above its maximum (the pass is refused and the labels stay as they were).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent import errors
from agent.fabric.fti import FtiFabric
from agent.model.fabric import MachineId


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """A model's bounds on one machine; None: the CM sets no bound."""

    min: int | None = None
    max: int | None = None


#: machine -> model -> bounds
Limits = dict[MachineId, dict[str, ModelLimits]]


class ClusterManager:
    def __init__(self, fti: FtiFabric, cluster: str) -> None:
        if not cluster:
            raise errors.ConfigError(
                "--fabric-cm-cluster", cluster, "the cluster manager needs the cluster uuid"
            )
        self.fti = fti
        self.cluster = cluster

    def _base(self, version: str) -> str:
        return f"{version}/tenants/{self.fti.tenant}/clusters/{self.cluster}"

    async def limits(self, machines: Iterable[MachineId] = ()) -> Limits:
        """Bounds per machine and model, for every machine of every node group. `machines`:
        the fabric's machines, preferred as the group's representative (CoHDI asks one machine
        of each group)."""
        known = set(machines)
        doc = await self.fti.cm_get(f"{self._base('v2')}/nodegroups")
        out: Limits = {}
        for g in _list(doc, "nodegroups", "GET nodegroups"):
            group = _str(g, "uuid", "nodegroups[]")
            detail = await self.fti.cm_get(f"{self._base('v2')}/nodegroups/{group}")
            members = [_machine_id(x) for x in _list(detail, "mach_ids", f"nodegroup {group}")]
            if not members:
                continue
            first = next((m for m in members if m in known), members[0])
            machine = await self.fti.cm_get(f"{self._base('v3')}/machines/{first}")
            bounds = parse_resspecs(machine, where=f"machine {first}")
            for m in members:
                out[m] = dict(bounds)
        return out


def parse_resspecs(doc: Any, *, where: str) -> dict[str, ModelLimits]:
    """model -> bounds from a v3 machine answer (`data.cluster.machine.resspecs[]`)."""
    try:
        specs = doc["data"]["cluster"]["machine"].get("resspecs") or []
        if not isinstance(specs, list):
            raise TypeError("resspecs is not a list")
    except (KeyError, TypeError, AttributeError) as exc:
        raise errors.FabricProtocolError(
            f"{where}: no data.cluster.machine.resspecs ({exc})"
        ) from None
    out: dict[str, ModelLimits] = {}
    for i, spec in enumerate(specs):
        at = f"{where}: resspecs[{i}]"
        try:
            conds = spec["selector"]["expression"]["conditions"]
            model = next(
                c["value"]
                for c in conds
                if c.get("column") == "model" and c.get("operator", "eq") == "eq"
            )
        except (KeyError, TypeError, AttributeError, StopIteration):
            raise errors.FabricProtocolError(
                f"{at}: no selector.expression.conditions[{{column: model, operator: eq}}]"
            ) from None
        if not isinstance(model, str):
            raise errors.FabricProtocolError(f"{at}: the model is not a string: {model!r}")
        low = _count(spec.get("min_resspec_count"), f"{at}.min_resspec_count")
        high = _count(spec.get("max_resspec_count"), f"{at}.max_resspec_count")
        if low is not None and high is not None and low > high:
            raise errors.FabricProtocolError(
                f"{at} ({model}): min_resspec_count {low} > max_resspec_count {high}; "
                "no bound honours both"
            )
        out[model] = ModelLimits(low, high)
    return out


def node_totals(bounds: Mapping[str, ModelLimits]) -> tuple[int | None, int | None]:
    """One machine's per-model bounds as the node's (min, max) device totals, which is how the
    scaler limits a node: min is the sum of the models' minimums; max the sum of their maximums,
    None (no bound) when any model has none or no model is bounded at all."""
    if not bounds:
        return None, None
    mins = [b.min for b in bounds.values() if b.min is not None]
    maxes = [b.max for b in bounds.values()]
    low = sum(mins) if mins else None
    high = None if any(m is None for m in maxes) else sum(m for m in maxes if m is not None)
    return low, high


def _count(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise errors.FabricProtocolError(f"{where}: a count >= 0 or null, got {value!r}")
    return value


def _list(doc: Any, key: str, where: str) -> list[Any]:
    value = doc.get(key) if isinstance(doc, dict) else None
    if value is None:
        return []
    if not isinstance(value, list):
        raise errors.FabricProtocolError(f"{where}: {key} is not a list: {value!r:.100}")
    return value


def _str(doc: Any, key: str, where: str) -> str:
    value = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(value, str) or not value:
        raise errors.FabricProtocolError(f"{where}: {key} must be a non-empty string")
    return value


def _machine_id(value: Any) -> MachineId:
    """A `mach_ids` entry: a machine uuid (string), or an integer id as its decimal string."""
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise errors.FabricProtocolError(f"nodegroup mach_ids: bad machine id {value!r}")
    return MachineId(str(value))
