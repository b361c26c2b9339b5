"""The composer's decisions, as pure functions of the ComposableResources it observes, the fabric's
inventory and the time: who owns a device, which free device a model-only resource gets, and what
a resource being deleted must wait for.

The invariant kept here: **one owner per physical GPU**. Of all resources naming one fabric
device, the oldest (creation time, then name) that was not refused is its owner; any other is
refused with `DeviceOwned` and, when deleted, never touches the fabric. Claim-made resources are
named from their device, so two of them can never exist; a second owner can only come from a
request's model-only choice racing another, or from a person's hand-written resource.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from agent.model import slots
from agent.model.fabric import DeviceState, Inventory
from agent.model.objects import (
    DRIVER_LABEL,
    NODE_READY,
    NODE_RELEASED,
    Obj,
    age_key,
    attached_device,
    condition,
    deleting,
    devices_of,
    fabric_device,
    name_of,
    spec,
    state,
)

#: `status.reason` of a resource refused because another resource owns its device.
DEVICE_OWNED: Final = "DeviceOwned"
#: `status.reason` of a model-only resource for which no free device existed (retried when one
#: frees up).
NO_FREE_DEVICE: Final = "NoFreeDevice"


#: Labels CoHDI's operator puts on the ComposableResource its upstream syncer makes for a GPU the
#: fabric has attached with no resource (an orphan to reclaim): the GPU's UUID and the fabric's id.
READY_TO_DETACH_DEVICE: Final = "cohdi.io/ready-to-detach-device-id"
READY_TO_DETACH_CDI_DEVICE: Final = "cohdi.io/ready-to-detach-cdi-device-id"


def reclaimed_device(obj: Obj) -> str:
    """The fabric device a CoHDI orphan-reclaim resource stands for (its
    `cohdi.io/ready-to-detach-cdi-device-id` label), "" for any other resource. Such a resource
    names no device in its spec; it must take that GPU (attached already: the attach sends
    nothing), never a new one. It is then an idle GPU like any other, scaled down safely."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return str(labels.get(READY_TO_DETACH_CDI_DEVICE) or "")


#: Written with our driver label when a resource no deployment made is adopted: the state it was
#: in then (`Online`, `Detaching`...). A resource adopted with its GPU on the node may be in use
#: there (CoHDI hands GPUs to pods through the vendor's driver) while our node role has not
#: reported it (`NodeReady`: CoHDI writes no such condition).
ADOPTED_ANNOTATION: Final = "cohdi.io/adopted"


def adopted_in_use(obj: Obj) -> bool:
    """The resource was adopted while its GPU was on the node (`Online`, or `Detaching` — CoHDI's
    operator waits there while the GPU is loaded) and our node role has not reported it since
    (no `NodeReady`): "the node never saw it" cannot be assumed; the node must be asked before
    a detach."""
    adopted = ((obj.get("metadata") or {}).get("annotations") or {}).get(ADOPTED_ANNOTATION)
    return adopted in ("Online", "Detaching") and not condition(obj, NODE_READY)


def refused(obj: Obj) -> bool:
    """The composer refused this resource because another one owns its device."""
    return state(obj) == "Failed" and (obj.get("status") or {}).get("reason") == DEVICE_OWNED


#: States in which a resource has (or may have) its device on the fabric.
ACTIVE_STATES: Final = ("Attaching", "Online", "Detaching")


def active(obj: Obj) -> bool:
    """The resource has started attaching its device (or holds it, or is detaching it)."""
    return state(obj) in ACTIVE_STATES


def owner_of(
    device: str, resources: Iterable[Obj], *, claimed: Mapping[str, str] | None = None
) -> Obj | None:
    """The resource that owns `device`, of those naming it that were not refused (being deleted
    or not: a resource detaching its device still owns it until it is gone):

    1. the one the composer of this term started attaching it for (`claimed`: device → resource
       name, kept in memory; it is current where the informer may lag);
    2. else one that is attaching, holding or detaching it (the state says it acted), the oldest;
    3. else the oldest (creation second, then name).

    Creation time alone is not enough: it has whole seconds only, so within one second the name
    would decide, and a resource made later could take a device another one already attached."""
    named = [o for o in resources if device in devices_of(o) and not refused(o)]
    by_claim = (claimed or {}).get(device)
    for o in named:
        if name_of(o) == by_claim:
            return o
    return min(named, key=lambda o: (not active(o), *age_key(o)), default=None)


class OwnerCheck(StrEnum):
    OWNER = "owner"  # this resource owns the device (or names none yet)
    WAIT = "wait"  # the owner is detaching it: look again once it is gone
    REFUSE = "refuse"  # another live resource owns it: Failed DeviceOwned


def check_owner(
    obj: Obj, resources: Iterable[Obj], *, claimed: Mapping[str, str] | None = None
) -> tuple[OwnerCheck, Obj | None]:
    """May `obj` (not being deleted) attach the device it names? Returns the verdict and the
    owner when it is another resource. `claimed`: as for `owner_of`."""
    device = fabric_device(obj)
    if not device:
        return OwnerCheck.OWNER, None
    owner = owner_of(device, resources, claimed=claimed)
    if owner is None or name_of(owner) == name_of(obj):
        return OwnerCheck.OWNER, None
    if deleting(owner):
        return OwnerCheck.WAIT, owner
    return OwnerCheck.REFUSE, owner


def taken_devices(resources: Iterable[Obj], *, also: Set[str] = frozenset()) -> set[str]:
    """Devices no model-only resource may choose: those named by any resource that is not refused
    (live or detaching), plus `also` (pinned to claims, withheld, chosen but not yet recorded)."""
    return {d for o in resources if not refused(o) for d in devices_of(o)} | set(also)


def choose_device(
    inventory: Inventory | None, *, model: str, machine: str, taken: Set[str]
) -> str | None:
    """A free device of `model` on the fabric `machine` is wired to, not in `taken`; the lowest
    id, so the choice is reproducible. None when there is none (or the fabric is unread)."""
    if inventory is None:
        return None
    fabric = next((m.fabric for m in inventory.machines if m.id == machine), None)
    if fabric is None:
        return None
    for dev in sorted(inventory.devices, key=lambda d: d.id):
        if (
            dev.model == model
            and dev.fabric == fabric
            and dev.state == DeviceState.FREE
            and not dev.anonymous
            and dev.id not in taken
        ):
            return str(dev.id)
    # FTI names no free device: an anonymous slot of the model means the fabric has one to give.
    for dev in sorted(inventory.devices, key=lambda d: d.id):
        if (
            dev.anonymous
            and dev.model == model
            and dev.fabric == fabric
            and dev.state == DeviceState.FREE
            and dev.id not in taken
        ):
            return str(dev.id)
    return None


def free_count(inventory: Inventory | None, *, model: str, machine: str, taken: Set[str]) -> int:
    """How many devices `choose_device` could still hand out (for retrying NoFreeDevice)."""
    if inventory is None:
        return 0
    fabric = next((m.fabric for m in inventory.machines if m.id == machine), None)
    return sum(
        1
        for d in inventory.devices
        if d.model == model
        and d.fabric == fabric
        and d.state == DeviceState.FREE
        and d.id not in taken
    )


# --- removal -------------------------------------------------------------------------------------


class RemoveStep(StrEnum):
    DROP = "drop"  # remove our finalizer only: this resource never owned a device
    WAIT_RELEASE = "wait-release"  # the node must release the device first (NodeReleased)
    WAIT_NODE_GONE = "wait-node-gone"  # the Node is gone: detach without it after `after` s
    DETACH = "detach"  # detach through the fabric, then remove the finalizer


@dataclass(frozen=True, slots=True)
class RemoveDecision:
    step: RemoveStep
    after: float = 0.0
    why: str = ""


def decide_remove(
    obj: Obj,
    resources: Iterable[Obj],
    *,
    node_exists: bool,
    node_missing_since: float | None,
    now: float,
    node_gone_grace: float,
    deleting_for: float = 0.0,
    claimed: Mapping[str, str] | None = None,
    fabric_machine: str | None = None,
    own_machine: str | None = None,
) -> RemoveDecision:
    """What a resource being deleted (with our finalizer) must do next.

    `node_missing_since`: monotonic time the composer first saw its Node missing (None when the
    Node exists); `now`: the same clock; `node_gone_grace`: `--node-gone-grace` in seconds;
    `deleting_for`: seconds since the resource's deletionTimestamp (for an adopted resource, since
    this composer first saw it deleting: CoHDI may have deleted it long before). A node agent
    that has not answered at all (no `NodeReleased` condition, True or False) for the grace is
    taken as gone too; one that answered "busy" (`NodeReleased=False`) is alive and is waited
    for. Without `NodeReady` the node never saw the device and it is detached at once — except
    for a resource adopted with its GPU on the node (`adopted_in_use`), whose node is asked.
    `claimed`: as for `owner_of`; `fabric_machine`: the machine the fabric has the device
    attached to (None: free, or unknown); `own_machine`: the machine of this resource's node — a
    resource never detaches a device from another machine."""
    device = fabric_device(obj)
    if not device or refused(obj):
        return RemoveDecision(RemoveStep.DROP, why="it never owned a device")
    if slots.is_slot(attached_device(obj)):
        # made for an anonymous slot and nothing arrived: there is nothing to detach (a GPU that
        # arrived with its answer lost is an orphan, adopted and scaled down by the scaler)
        return RemoveDecision(RemoveStep.DROP, why="no device arrived through its slot")
    owner = owner_of(device, resources, claimed=claimed)
    if owner is not None and name_of(owner) != name_of(obj):
        return RemoveDecision(RemoveStep.DROP, why=f"{device} belongs to {name_of(owner)}")
    if fabric_machine and own_machine and fabric_machine != own_machine:
        return RemoveDecision(
            RemoveStep.DROP,
            why=f"the fabric has {device} on {fabric_machine}, not on this resource's "
            f"{own_machine}",
        )
    if (
        (not condition(obj, NODE_READY) and not adopted_in_use(obj))
        or condition(obj, NODE_RELEASED)
        or spec(obj).get("force_detach")
    ):
        return RemoveDecision(RemoveStep.DETACH)
    if node_exists:
        answered = any(
            c.get("type") == NODE_RELEASED
            for c in (obj.get("status") or {}).get("conditions") or []
        )
        if answered or deleting_for < node_gone_grace:
            return RemoveDecision(
                RemoveStep.WAIT_RELEASE,
                after=max(0.0, node_gone_grace - deleting_for) if not answered else 0.0,
            )
        return RemoveDecision(
            RemoveStep.DETACH,
            why=f"its node agent has not answered for {deleting_for:.0f} s: detaching without it",
        )
    gone_for = 0.0 if node_missing_since is None else now - node_missing_since
    if gone_for < node_gone_grace:
        return RemoveDecision(RemoveStep.WAIT_NODE_GONE, after=node_gone_grace - gone_for)
    return RemoveDecision(
        RemoveStep.DETACH, why=f"its node is gone (for {gone_for:.0f} s): detaching without it"
    )


# --- which deployment acts on an object no deployment has labelled ------------------------------

#: Seconds an unlabelled ComposableResource or ComposabilityRequest that this deployment cannot
#: serve is left for another deployment (another --driver and fabric) to label as its own, before
#: this one acts on it as a lone deployment would (and refuses it: not on our fabric).
UNCLAIMED_GRACE: Final = 10.0


class Adoption(StrEnum):
    OURS = "ours"  # labelled with our driver: act
    FOREIGN = "foreign"  # labelled with another deployment's driver: never touch
    LABEL = "label"  # unlabelled and on our fabric: label it ours (adopt), then act
    WAIT = "wait"  # unlabelled, not ours to serve: give another deployment time to take it
    UNCLAIMED = "unclaimed"  # nobody took it within the grace: act (refuse) without labelling


def adoption(
    obj: Obj, driver_label: str, *, serves: bool, unclaimed_for: float, grace: float
) -> tuple[Adoption, float]:
    """Whose is `obj` (a ComposableResource or a ComposabilityRequest), and what may this
    deployment do with it? Returns the verdict and, for WAIT, the seconds left of the grace.

    The `cohdi.io/driver` label names the deployment that owns an object. Objects without it are
    hand-written or CoHDI's operator's (it writes no such label): the deployment that can serve
    one (`serves`: its node is wired to one of our fabrics, or it names a device of ours) labels
    it as its own — that is the adoption, and from then on every other deployment leaves it
    alone. One that cannot serve it waits `grace` seconds (`unclaimed_for`: since it first saw
    it) for another deployment to do so, and only then acts on it (a lone deployment's
    refusal: node not on the fabric), still unlabelled so a deployment that comes later may take
    it. Two deployments that can both serve it race on the label's write (resourceVersion
    precondition): one wins, the other sees the winner's label."""
    made_by = ((obj.get("metadata") or {}).get("labels") or {}).get(DRIVER_LABEL)
    if made_by is not None:
        return (Adoption.OURS if made_by == driver_label else Adoption.FOREIGN), 0.0
    if serves:
        return Adoption.LABEL, 0.0
    if unclaimed_for < grace:
        return Adoption.WAIT, grace - unclaimed_for
    return Adoption.UNCLAIMED, 0.0
