"""Do the three places that know about a GPU agree? The fabric (emulator), the API server
(ComposableResources, pool slices, claims) and each node's plugin checkpoint. Returns one row per
device and the disagreements found.

An attached GPU is published attached (`nodeName` of its node, in its node's own pool), or, while
a claim holds it through the free entry the claim was allocated, still as that entry (the
publisher keeps it exactly as allocated until the claim lets go). A free GPU is offered under its
own id, or — on a fabric that counts its free GPUs (FTI) — as one of the anonymous free slots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.controllers.publishing import SLICES
from agent.demo.objects import CLAIMS
from agent.demo.world import World
from agent.kube.resources import RESOURCES, deleting, state
from agent.model.fabric import DeviceState
from agent.model.objects import attached_device, fabric_device
from agent.model.pool import device_name
from agent.model.slots import is_slot
from agent.node.checkpoint import Checkpoint


@dataclass(frozen=True, slots=True)
class Row:
    device: str
    fabric: str  # free / attached:<node> / ...
    api: str  # the ComposableResource's state on a node, or "-"
    slice: str  # free / node:<n> / absent
    prepared: str  # claim uid(s) in a node checkpoint, or "-"


async def check(world: World) -> tuple[list[Row], list[str]]:
    machine_node = {f"m-{n}": n for n in world.nodes}
    crs = [
        o
        for o in (await world.kube.get(RESOURCES))["items"]
        if o["spec"]["target_node"] in world.nodes
    ]
    cr_of: dict[str, Any] = {}  # physical GPU -> the resource that attached it
    for o in crs:
        gpu = attached_device(o)
        if gpu:
            cr_of[gpu] = o
    entries: dict[str, dict[str, Any]] = {}
    pools: dict[str, str] = {}  # device id -> the pool its entry is in
    for s in (await world.kube.get(SLICES))["items"]:
        if s["spec"]["driver"] == world.driver:
            for d in s["spec"].get("devices") or []:  # a pool may have an empty slice
                did = d["attributes"]["fabricDeviceId"]["string"]
                # a node's own pool names its node once, on the slice, not on each device
                node_name = s["spec"].get("nodeName")
                entries[did] = {"nodeName": node_name, **d} if node_name else d
                pools[did] = s["spec"]["pool"]["name"]
    held = {  # (pool, device name) a claim is allocated
        (r["pool"], r["device"])
        for c in (await world.kube.get(CLAIMS))["items"]
        for r in (((c.get("status") or {}).get("allocation") or {}).get("devices") or {}).get(
            "results"
        )
        or []
        if r.get("driver") == world.driver
    }
    prepared: dict[str, list[str]] = {}
    for node in world.nodes:
        path = world.checkpoint(node)
        if path.exists():
            for uid, c in Checkpoint(path).load().items():
                for d in c.devices:
                    prepared.setdefault(f"{node}/{d['device']}", []).append(uid)
    # a fabric that counts its free GPUs (FTI) offers them as anonymous slots, not by their ids:
    # so many free slots offered cover so many free GPUs
    free_slots = sum(
        1
        for did, e in entries.items()
        if is_slot(did) and e.get("bindsToNode") and (pools.get(did), e["name"]) not in held
    )
    rows, problems = [], []
    for dev in sorted(world.emulator.state.devices.values(), key=lambda d: d.spec.id):
        did = dev.spec.id
        node = machine_node.get(dev.machine or "", "")
        fabric = dev.state.value + (f":{node}" if node else "")
        cr = cr_of.get(did)
        api = f"{state(cr) or 'new'}:{cr['spec']['target_node']}" if cr is not None else "-"
        # the name it is published and prepared under: its own, or the anonymous slot its
        # resource was made for (a fabric that names no free device)
        identity = fabric_device(cr) if cr is not None else did
        entry = entries.get(identity)
        slice_view = (
            "absent"
            if entry is None
            else (f"node:{entry['nodeName']}" if "nodeName" in entry else "free")
        )
        if slice_view == "free" and (pools.get(identity), device_name(identity)) in held:
            slice_view = "free, held by a claim"
        if entry is None and cr is None and dev.state == DeviceState.FREE and free_slots:
            free_slots -= 1
            slice_view = "free (a slot)"
        uids = prepared.get(f"{node}/{device_name(identity)}", []) if node else []
        rows.append(Row(did, fabric, api, slice_view, ",".join(uids) or "-"))
        if dev.state == DeviceState.ATTACHED:
            if cr is None or deleting(cr) or cr["spec"]["target_node"] != node:
                problems.append(
                    f"{did}: attached to {node} on the fabric, but no live resource for it"
                )
            if slice_view not in (f"node:{node}", "free, held by a claim"):
                problems.append(f"{did}: attached to {node}, the slice says {slice_view}")
        elif dev.state == DeviceState.FREE:
            if cr is not None and not deleting(cr) and state(cr) == "Online":
                problems.append(f"{did}: free on the fabric, but its resource is Online")
            if uids:
                problems.append(f"{did}: free on the fabric, but prepared for claims {uids}")
            if slice_view not in ("free", "free (a slot)", "absent", "free, held by a claim"):
                problems.append(f"{did}: free on the fabric, the slice says {slice_view}")
    return rows, problems


def table(rows: list[Row]) -> str:
    out = [f"{'device':<18} {'fabric':<26} {'api server':<26} {'slice':<22} prepared"]
    out += [f"{r.device:<18} {r.fabric:<26} {r.api:<26} {r.slice:<22} {r.prepared}" for r in rows]
    return "\n".join(out)
