"""The emulator's FTI cluster-manager side: node groups and per-machine resource specs with the
min/max device counts per model that CoHDI's Composable DRA Driver reads when `USE_CM` is on.

Paths and fields as CoHDI's clients use them:

- `GET /cluster_manager/cluster_autoscaler/v2/tenants/<T>/clusters/<C>/nodegroups`
  → `{"nodegroups": [{"uuid", "name"}]}`
- `GET .../v2/tenants/<T>/clusters/<C>/nodegroups/<NG>` → `{"uuid", "name", "mach_ids": [<uuid>]}`
- `GET .../v3/tenants/<T>/clusters/<C>/machines/<M>` → `{"data": {"cluster": {"machine":
  {"uuid", "resspecs": [{"spec_uuid", "type", "selector": {"expression": {"conditions":
  [{"column": "model", "operator": "eq", "value"}]}}, "min_resspec_count", "max_resspec_count",
  "device_count", "devices": [...]}]}}}}`

The node groups are configuration (`ClusterManagerConfig`; in the emulator's file, the key
`cluster_manager`, read by `parse_config`); tests change them while the emulator runs. Without
any, every fabric is one node group of all its machines with no limits (the counts are `null`,
which CoHDI reads as "no label")::

    cluster_manager:
      cluster: 6c0e1c2a-...               # CoHDI's CLUSTER_ID
      node_groups:
        - {uuid: ng-1, name: gpu-workers, machines: [m-node-0, m-node-1],
           resspecs: [{model: NVIDIA-A100-PCIE-40GB, min: 0, max: 2}]}
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from agent.fabric.emulator.config import EmulatorConfigError
from agent.fabric.emulator.fti_api import fm_error, op_status
from agent.fabric.emulator.http import Credentials, json_response
from agent.fabric.emulator.state import EmulatorState

CM = "/cluster_manager/cluster_autoscaler"
DEFAULT_CLUSTER = "00000000-0000-4000-8000-0000000000c1"


@dataclass(frozen=True, slots=True)
class ResSpec:
    """One model's bounds on every machine of a node group; None: no bound (`null` on the wire)."""

    model: str
    min: int | None = None
    max: int | None = None


@dataclass(frozen=True, slots=True)
class NodeGroup:
    uuid: str
    name: str
    machines: tuple[str, ...]
    resspecs: tuple[ResSpec, ...] = ()


@dataclass
class ClusterManagerConfig:
    """The cluster (`CLUSTER_ID`) and its node groups; empty `groups`: one per fabric."""

    cluster: str = DEFAULT_CLUSTER
    groups: list[NodeGroup] = field(default_factory=list)


class CmApi:
    def __init__(
        self, state: EmulatorState, creds: Credentials, config: ClusterManagerConfig
    ) -> None:
        self.state = state
        self.creds = creds
        self.config = config

    def routes(self, app: web.Application) -> None:
        r = app.router
        base = f"{CM}/v2/tenants/{{t}}/clusters/{{c}}"
        r.add_get(f"{base}/nodegroups", self.nodegroups)
        r.add_get(f"{base}/nodegroups/{{ng}}", self.nodegroup)
        r.add_get(f"{CM}/v3/tenants/{{t}}/clusters/{{c}}/machines/{{m}}", self.machine)

    def groups(self) -> list[NodeGroup]:
        if self.config.groups:
            return list(self.config.groups)
        by_fabric: dict[str, list[str]] = {}
        for m in self.state.machines.values():
            by_fabric.setdefault(m.fabric, []).append(m.id)
        return [
            NodeGroup(str(uuid.uuid5(uuid.NAMESPACE_URL, f"cohdi-emulator/ng/{f}")), f, tuple(ms))
            for f, ms in sorted(by_fabric.items())
        ]

    def _denied(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not self.creds.token_ok(auth.removeprefix("Bearer ")):
            return fm_error(401, "E40100", "the access token is missing, invalid or expired")
        if request.match_info["t"] != self.state.config.tenant:
            return fm_error(403, "E40300", f"unknown tenant {request.match_info['t']!r}")
        if request.match_info["c"] != self.config.cluster:
            return fm_error(404, "E40400", f"no cluster {request.match_info['c']!r}")
        return None

    async def nodegroups(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        return json_response(
            {"nodegroups": [{"uuid": g.uuid, "name": g.name} for g in self.groups()]}
        )

    async def nodegroup(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        wanted = request.match_info["ng"]
        for g in self.groups():
            if g.uuid == wanted:
                return json_response({"uuid": g.uuid, "name": g.name, "mach_ids": list(g.machines)})
        return fm_error(404, "E40400", f"no node group {wanted!r}")

    async def machine(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        mid = request.match_info["m"]
        if mid not in self.state.machines:
            return fm_error(404, "E40400", f"no machine {mid!r} in cluster {self.config.cluster}")
        group = next((g for g in self.groups() if mid in g.machines), None)
        specs = group.resspecs if group is not None else ()
        return json_response(
            {
                "data": {
                    "cluster": {
                        "uuid": self.config.cluster,
                        "machine": {"uuid": mid, "resspecs": [self._spec(mid, s) for s in specs]},
                    }
                }
            }
        )

    def _spec(self, machine: str, spec: ResSpec) -> dict[str, Any]:
        devices = [d for d in self.state.attached_to(machine) if d.spec.model == spec.model]
        return {
            "spec_uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"cohdi-emulator/{machine}/{spec}")),
            "type": "gpu",
            "selector": {
                "version": "v1",
                "expression": {
                    "conditions": [{"column": "model", "operator": "eq", "value": spec.model}]
                },
            },
            "min_resspec_count": spec.min,
            "max_resspec_count": spec.max,
            "device_count": len(devices),
            "devices": [
                {
                    "device_id": d.spec.serial,
                    "status": "ADD_COMPLETE",
                    "status_reason": "",
                    "detail": {
                        "res_uuid": d.spec.id,
                        "res_op_status": op_status(d),
                        "fabric_id": self.state.config.fabrics.index(d.spec.fabric),
                    },
                }
                for d in devices
            ],
        }


def parse_config(doc: Any) -> ClusterManagerConfig:
    """The `cluster_manager` key of the emulator's configuration file (None: the default);
    `EmulatorConfigError` naming the path of a bad value."""
    if doc is None:
        return ClusterManagerConfig()
    if not isinstance(doc, dict):
        raise EmulatorConfigError("cluster_manager: must be a mapping")
    groups = []
    for i, g in enumerate(doc.get("node_groups") or []):
        where = f"cluster_manager.node_groups[{i}]"
        try:
            specs = tuple(
                ResSpec(str(r["model"]), _bound(r.get("min"), where), _bound(r.get("max"), where))
                for r in g.get("resspecs") or []
            )
            groups.append(
                NodeGroup(
                    str(g["uuid"]), str(g.get("name", g["uuid"])), tuple(g["machines"]), specs
                )
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise EmulatorConfigError(
                f"{where}: needs uuid, machines and resspecs ({exc})"
            ) from exc
    return ClusterManagerConfig(str(doc.get("cluster", DEFAULT_CLUSTER)), groups)


def _bound(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EmulatorConfigError(f"{where}.resspecs: min/max must be integers >= 0 or null")
    return value


def from_file(path: Path) -> ClusterManagerConfig:
    """The `cluster_manager` key of the emulator's configuration file at `path`."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise EmulatorConfigError(f"cannot read {path}: {exc}") from exc
    return parse_config(doc.get("cluster_manager") if isinstance(doc, dict) else None)
