"""The scaler's decisions, as pure functions of what it observed, the limits and the time.

The scaler (`agent.controllers.scaling`) observes claims, ComposableResources, Nodes and the
fabric's inventory, asks these functions what to do, and does it. Nothing here reads a clock or
talks to a server, so every branch has a fast test (`tests/unit/test_scaling_decisions.py`).

Times: `now` is epoch seconds where it is compared with a claim's `allocationTimestamp`
(`decide_bind`), and any monotonic clock where only differences matter (`decide_idle`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from agent.model import claims as claimmodel
from agent.model.fabric import DeviceState, Inventory
from agent.model.objects import (
    CLAIM_ANNOTATION,
    NODE_READY,
    Obj,
    condition,
    deleting,
    state,
    target_node,
)

#: How soon to look again at a claim whose device's resource is being deleted, or before the
#: first fabric read (seconds).
RECHECK: Final = 0.2

#: How long a claim may hold an anonymous slot the published view no longer lists before it
#: fails with UnknownDevice (seconds). The free count can drop a moment before the composer
#: records which slot the GPU came through; the view then offers one slot number fewer until it
#: does (`agent.model.slots.view`). A slot truly gone fails after this.
SLOT_VANISH_GRACE: Final = 10.0

MAX_LABEL: Final = "cohdi.io/max-devices"
MIN_LABEL: Final = "cohdi.io/min-devices"


class BindStep(StrEnum):
    WAIT = "wait"  # nothing to do now: look again after `after` seconds
    CREATE = "create"  # create the device's ComposableResource, then look again after `after`
    READY = "ready"  # set FabricDeviceReady in the claim's status
    FAIL = "fail"  # set FabricDeviceFailed, withhold the device (and delete our resource)


@dataclass(frozen=True, slots=True)
class BindDecision:
    step: BindStep
    after: float = 0.0
    reason: str = ""
    message: str = ""
    #: FAIL only: the device's resource was made for this claim and is to be deleted (the
    #: composer detaches whatever was half attached). Never a resource another claim owns.
    delete_resource: bool = False


def claim_ref(b: claimmodel.Binding) -> str:
    return f"{b.namespace}/{b.claim}"


def made_for(resource: Obj, ref: str) -> bool:
    """The resource was created by the scaler for the claim `<namespace>/<name>`."""
    return (resource["metadata"].get("annotations") or {}).get(CLAIM_ANNOTATION) == ref


def decide_bind(
    b: claimmodel.Binding,
    *,
    device: str | None,
    inventory_known: bool,
    resource: Obj | None,
    room_on_node: bool,
    now: float,
    deadline: float,
    unhealthy: str = "",
    slot_vanished_for: float | None = None,
) -> BindDecision:
    """What to do for one allocation waiting for its binding conditions.

    `device`: the fabric device behind (b.pool, b.device), None if unknown; `resource`: the
    live ComposableResource named from that device, if any; `room_on_node`: the node is below its
    `cohdi.io/max-devices`; `now`: epoch seconds; `deadline`: the `--claim-deadline` in seconds,
    counted from the claim's allocationTimestamp; `unhealthy`: why the device is unhealthy ("":
    it is not; `agent.model.health`) — a claim still waiting for it fails, so the scheduler
    gives it another; `slot_vanished_for`: seconds since the claim's device, an anonymous slot,
    stopped being offered (None: not a slot, or still offered) — waited for up to
    SLOT_VANISH_GRACE (within the claim's deadline) before UnknownDevice.
    """
    if device is None:
        if not inventory_known:
            return BindDecision(BindStep.WAIT, after=RECHECK)  # not synced with the fabric yet
        if slot_vanished_for is not None:
            left = SLOT_VANISH_GRACE - slot_vanished_for
            if b.allocated_at:
                left = min(left, b.allocated_at + deadline - now)
            if left > 0:
                return BindDecision(BindStep.WAIT, after=min(1.0, left))
        return BindDecision(
            BindStep.FAIL,
            reason="UnknownDevice",
            message=f"device {b.pool}/{b.device} is not in the fabric's inventory any more",
        )
    remaining = b.allocated_at + deadline - now if b.allocated_at else deadline
    ours = resource is not None and made_for(resource, claim_ref(b))
    if resource is not None and deleting(resource):
        if remaining <= 0:
            return _deadline(b, device, deadline, delete=False)
        return BindDecision(BindStep.WAIT, after=min(RECHECK, remaining))
    if resource is not None and target_node(resource) != b.node:
        return BindDecision(
            BindStep.FAIL,
            reason="DeviceOnOtherNode",
            message=f"{device} is composed to {target_node(resource)}, not {b.node}",
        )
    if unhealthy:
        return BindDecision(
            BindStep.FAIL,
            reason="DeviceUnhealthy",
            message=f"{device} is unhealthy ({unhealthy})",
            delete_resource=ours,
        )
    if resource is not None and state(resource) == "Failed":
        st = resource.get("status") or {}
        return BindDecision(
            BindStep.FAIL,
            reason=str(st.get("reason") or "AttachFailed"),
            message=str(st.get("message") or "the fabric could not attach the device"),
            delete_resource=ours,
        )
    if resource is not None and state(resource) == "Online" and condition(resource, NODE_READY):
        return BindDecision(BindStep.READY)
    if remaining <= 0:
        return _deadline(b, device, deadline, delete=ours)
    if resource is None:
        if not room_on_node:
            return BindDecision(
                BindStep.FAIL,
                reason="NodeDeviceLimit",
                message=f"node {b.node} is at its device maximum",
            )
        return BindDecision(BindStep.CREATE, after=remaining)
    return BindDecision(BindStep.WAIT, after=remaining)  # the deadline check


def _deadline(b: claimmodel.Binding, device: str, deadline: float, *, delete: bool) -> BindDecision:
    return BindDecision(
        BindStep.FAIL,
        reason="AttachDeadline",
        message=f"{device} was not ready on {b.node} within {deadline:.0f} s of allocation",
        delete_resource=delete,
    )


# --- holding: claims that hold a device that is not on their node ---------------------------------


@dataclass(frozen=True, slots=True)
class Stranded:
    """A claim holds `device` on `node` (usable at once, or FabricDeviceReady already set), but the
    device is neither attached to that node's machine nor being attached there."""

    device: str
    node: str
    #: The fabric has the device attached to another machine: it cannot be re-attached here.
    elsewhere: bool


def stranded(
    claim: Obj,
    *,
    driver: str,
    device_of: Mapping[tuple[str, str], str],
    inventory: Inventory,
    machine_of_node: Mapping[str, str],
    resources: Mapping[str, Obj],
) -> list[Stranded]:
    """The devices a claim holds that must be on its node and are not, with no live resource
    bringing them there. The last line of defence against a scale-down that raced the scheduler:
    the caller re-attaches them (kubelet retries the prepare until the device is there).

    `device_of`: (pool, device name) → fabric device; `resources`: fabric device → the live
    ComposableResource naming it. A device whose resource is being deleted is not reported yet
    (it is reported once the detach is done and the resource gone)."""
    allocation = (claim.get("status") or {}).get("allocation") or {}
    node = claimmodel.node_of(allocation)
    if not node:
        return []
    pending = {
        (b.pool, b.device) for b in claimmodel.bindings(claim, driver) if not b.ready or b.failed
    }
    machine = machine_of_node.get(node)
    out = []
    for pool, name in sorted(claimmodel.allocated_devices(claim, driver)):
        if (pool, name) in pending:
            continue  # still in the scale-up flow (decide_bind's business)
        device = device_of.get((pool, name))
        if device is None or device in resources:
            continue
        dev = inventory.device(device)
        if dev is None:
            continue
        if dev.state == DeviceState.ATTACHED and dev.machine == machine:
            continue
        elsewhere = (
            dev.machine is not None
            and dev.machine != machine
            and dev.state
            in (
                DeviceState.ATTACHED,
                DeviceState.ATTACHING,
            )
        )
        out.append(Stranded(device, node, elsewhere))
    return out


# --- scale down ----------------------------------------------------------------------------------


class IdleStep(StrEnum):
    KEEP = "keep"  # not a candidate (held, owned by a request, not Online, at the node's floor)
    LATER = "later"  # idle, but not for long enough: look again after `after` seconds
    DRAIN = "drain"  # withhold it, let it settle, re-check with a fresh read, then detach


@dataclass(frozen=True, slots=True)
class IdleDecision:
    step: IdleStep
    after: float = 0.0
    idle_for: float = 0.0
    why: str = ""


def decide_idle(
    resource: Obj | None,
    *,
    held: bool,
    request_owned: bool,
    idle_since: float | None,
    now: float,
    grace: float,
    on_node: int,
    floor: int,
    idle_alike: int = 0,
    warm: int = 0,
) -> IdleDecision:
    """Whether an attached device is to be scaled down. `idle_since`: when a claim last held it
    (None: not since this leader started — idle for at least the grace); `on_node`: live
    resources on its node; `floor`: the node's `cohdi.io/min-devices` (0 when unset);
    `idle_alike`: idle attached devices of its model on its node, itself included; `warm`: how
    many of those the node keeps (`--warm-devices` / `cohdi.io/warm-devices`)."""
    if resource is None or deleting(resource) or state(resource) != "Online":
        return IdleDecision(IdleStep.KEEP, why="not an online resource")
    if request_owned:
        return IdleDecision(IdleStep.KEEP, why="kept by a ComposabilityRequest")
    if held:
        return IdleDecision(IdleStep.KEEP, why="held by a claim")
    idle_for = grace if idle_since is None else now - idle_since
    if idle_for < grace:
        return IdleDecision(IdleStep.LATER, after=grace - idle_for, idle_for=idle_for)
    if on_node <= floor:
        return IdleDecision(IdleStep.KEEP, idle_for=idle_for, why=f"node at its minimum {floor}")
    if warm and idle_alike <= warm:
        return IdleDecision(IdleStep.KEEP, idle_for=idle_for, why=f"warm capacity {warm}")
    return IdleDecision(IdleStep.DRAIN, idle_for=idle_for)


def warm_shortfall(*, warm: int, idle: int, coming: int, free: int) -> int:
    """How many GPUs of a model to attach to a node now to keep `warm` of them idle there:
    `idle` attached and held by no claim, `coming` warm ones attaching; never more than the
    `free` the fabric has."""
    return max(0, min(warm - idle - coming, free))


class MoveStep(StrEnum):
    STAY = "stay"  # offered where it should be, or must not move now
    MOVE = "move"  # to its node's own pool: withhold, settle, fresh read, then place


def decide_move(
    *, attached_on: str | None, placed_on: str | None, held: bool, busy: bool, owned: bool
) -> MoveStep:
    """Whether an attached device should move to its node's pool (where the scheduler takes it
    before any GPU that needs an attach). `attached_on`: its node (None: not attached to a node
    of ours); `placed_on`: the node whose pool offers it now; `held`: a claim holds it (under
    whatever identity: it stays where the claim has it); `busy`: a scale-down or a move of it is
    under way, or it is withheld; `owned`: a live resource owns it (orphans are adopted first)."""
    if attached_on is None or placed_on == attached_on or held or busy or not owned:
        return MoveStep.STAY
    return MoveStep.MOVE


def held_devices(
    claims: Iterable[Obj], driver: str, device_of: Mapping[tuple[str, str], str]
) -> set[str]:
    """Fabric devices allocated to any of `claims` (conditions met or not)."""
    held = set()
    for claim in claims:
        for key in claimmodel.allocated_devices(claim, driver):
            device = device_of.get(key)
            if device:
                held.add(device)
    return held


# --- limits --------------------------------------------------------------------------------------


def node_limit(node: Obj | None, label: str) -> int | None:
    """An integer node label (`cohdi.io/max-devices`, `cohdi.io/min-devices`); None when unset or
    not a non-negative integer."""
    raw = (((node or {}).get("metadata") or {}).get("labels") or {}).get(label)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


def full_label(node: Obj | None, on_node: int, full_label_key: str) -> str | bool | None:
    """The value the node's full label must get: "true" (set it), None (remove it), or False
    (leave it as it is)."""
    if node is None:
        return False
    cap = node_limit(node, MAX_LABEL)
    full = cap is not None and on_node >= cap
    labelled = (node["metadata"].get("labels") or {}).get(full_label_key) == "true"
    if full == labelled:
        return False
    return "true" if full else None


# --- orphans -------------------------------------------------------------------------------------


def orphans(inventory: Inventory, owned: set[str]) -> list[str]:
    """Devices the fabric has attached (or attaching) to a machine that no ComposableResource
    names (`owned`: every id any resource names, `objects.devices_of`): attached behind the
    agent's back, or left by a lost answer. Anonymous placeholders are never orphans."""
    return sorted(
        d.id
        for d in inventory.devices
        if not d.anonymous
        and d.machine
        and d.model  # a block with no model is no pooled accelerator (e.g. a system's own block)
        and d.state in (DeviceState.ATTACHED, DeviceState.ATTACHING)
        and d.id not in owned
    )
