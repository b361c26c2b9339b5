"""Device health, as pure decisions: what the node and the fabric say about a GPU → whether it is
unhealthy, the DRA device taint that keeps new pods off it, when the taint lifts, and whether the
GPU is swapped out (detached) now, later, or not at all.

Two sources, one verdict per fabric device:
- the node role's `DeviceHealthy` condition on the GPU's ComposableResource (`objects.
  DEVICE_HEALTHY`: "False" with a CamelCase reason such as `Xid79`, `DoubleBitEcc`,
  `FellOffBus` — errors the node counts as fatal; "True" healthy; "Unknown" or absent: no word).
  A node's word outlives its resource: a GPU the node found broken and that was then detached
  stays unhealthy until a node has it again and finds it fine: it is attached again on purpose
  (a hand-written resource naming it) and its new node reports it NodeReady with no
  `DeviceHealthy=False` (`fresh_node_word`). A new leader reads the word back from the slice's
  taint (`recovered_word`);
- the fabric's `PoolDevice.health` ("Critical" unhealthy; "Warning" and "OK" are not: Redfish
  `Status.Health` Warning is "a condition requires attention", not an unusable device). The
  fabric's word is read on every inventory and lifts by itself.

A device is unhealthy while any source says so. The taint (KEP-5055, `resource.k8s.io/v1`
`ResourceSlice.spec.devices[].taints[]`: `key`, `value` (a label value), `effect` `NoSchedule` or
`NoExecute`, `timeAdded`) is `cohdi.io/unhealthy=<reason>`; its effect is `NoSchedule`, or
`NoExecute` for a node-reported (fatal) error when eviction is allowed (kube-controller-manager's
device taint eviction then evicts the pods). It stays until every source has been clear for the
grace period (`--health-grace`), so a flapping link does not flap the slices.

Swap: an unhealthy GPU attached through a live, Online resource that no claim holds is detached
(its resource deleted, through the scale-down's withhold/settle/fresh-read steps); one a claim
holds stays until the claim lets go, then goes the same way. A detached unhealthy GPU stays
tainted (or withheld) in the free pool until it is healthy again.

Times: `now` is any monotonic clock (seconds; only differences matter), `wall` epoch seconds
(the taint's `timeAdded`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Final

from agent.model import names
from agent.model.fabric import PoolDevice
from agent.model.objects import DEVICE_HEALTHY, NODE_READY, Obj, condition, deleting, state

#: The taint key of an unhealthy device (a qualified name under our domain).
TAINT_KEY: Final = "cohdi.io/unhealthy"
NO_SCHEDULE: Final = "NoSchedule"
NO_EXECUTE: Final = "NoExecute"
#: The reason of a fabric-reported unhealthy device (node reasons are the node's own words).
FABRIC_REASON_PREFIX: Final = "Fabric"


class Source(StrEnum):
    NODE = "node"
    FABRIC = "fabric"


@dataclass(frozen=True, slots=True)
class Word:
    """One source's current word on a device."""

    healthy: bool
    #: CamelCase, a valid label value (the taint's value): `Xid79`, `FabricCritical`.
    reason: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class Health:
    """A device known to be unhealthy (or recovering from it): what the taint says."""

    source: Source
    reason: str
    message: str
    #: Epoch seconds the device was first found unhealthy in this episode (the taint's
    #: `timeAdded`; kept while the reason changes, so the taint is not rewritten for it).
    added: float
    #: Monotonic time since when every source has been clear (None: still unhealthy).
    clear_since: float | None = None

    @property
    def recovering(self) -> bool:
        return self.clear_since is not None


def node_word(resource: Obj | None) -> Word | None:
    """The node's word from a resource's `DeviceHealthy` condition: None when absent or
    "Unknown" (no word: an earlier word stands)."""
    for c in ((resource or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") != DEVICE_HEALTHY:
            continue
        status = c.get("status")
        if status == "True":
            return Word(True)
        if status == "False":
            return Word(False, node_reason(str(c.get("reason") or "")), str(c.get("message") or ""))
        return None
    return None


def spoken_for(resource: Obj) -> str:
    """The GPU whose health a resource's `DeviceHealthy` speaks for: the one the fabric answered
    its attach with (`status.cdi_device_id`, a slot's resource the GPU behind it); "" for a
    resource that never got one (refused for a GPU another resource owns, still attaching): no
    node has a GPU through it, so a condition written there is nobody's word."""
    return str((resource.get("status") or {}).get("cdi_device_id") or "")


def fresh_node_word(resource: Obj, *, said_by: str) -> Word | None:
    """The word of a node that has the GPU now and found nothing wrong with it: healthy when
    `resource` is live, NodeReady, carries no `DeviceHealthy` condition (the node writes none
    for a GPU it never found unhealthy) and is not the resource the standing unhealthy word came
    from (`said_by`: its uid; "" when the word was recovered from a slice's taint). None
    otherwise: no new word. This is how a GPU a node found broken comes back when it is attached
    again (on purpose) and its new node finds it fine; were the new node to find it broken too,
    it writes `DeviceHealthy=False` and the taint, held through the grace, never lifts."""
    uid = str(resource.get("metadata", {}).get("uid") or "")
    if (
        not uid
        or uid == said_by
        or deleting(resource)
        or not condition(resource, NODE_READY)
        or any(
            c.get("type") == DEVICE_HEALTHY
            for c in (resource.get("status") or {}).get("conditions") or []
        )
    ):
        return None
    return Word(True)


def fabric_word(dev: PoolDevice | None) -> Word | None:
    """The fabric's word from `PoolDevice.health`: None when the device is not in the inventory;
    unhealthy only when "Critical"."""
    if dev is None:
        return None
    if dev.health == "Critical":
        return Word(
            False,
            f"{FABRIC_REASON_PREFIX}Critical",
            dev.health_reason or "the fabric says Critical",
        )
    return Word(True)


def node_reason(reason: str) -> str:
    """A node's reason as a taint value that never passes for the fabric's (`recovered_word`
    tells them apart by the `FABRIC_REASON_PREFIX`): `Node` is put before one that begins with
    it ("FabricLinkDown" -> "NodeFabricLinkDown"); an empty one is "Unhealthy"."""
    value = taint_value(reason)
    if value.startswith(FABRIC_REASON_PREFIX):
        value = taint_value("Node" + value)
    return value


def taint_value(reason: str) -> str:
    """A reason as a taint value: a label value (at most 63 characters of `[A-Za-z0-9._-]`,
    alphanumeric at both ends; `names.label_value`)."""
    return names.label_value(reason) or "Unhealthy"


def step(
    prev: Health | None,
    words: Mapping[Source, Word | None],
    *,
    now: float,
    wall: float,
    grace: float,
) -> Health | None:
    """The device's health after its sources' latest words. `words[source]`: that source's
    latest word (None: none yet, or no longer any — for the node, its last word is passed in by
    the caller, since a detached GPU has no node to speak for it). Returns None when the device
    is (again) healthy: never unhealthy, or clear for `grace` seconds."""
    sick = [(s, w) for s in (Source.NODE, Source.FABRIC) if (w := words.get(s)) and not w.healthy]
    if sick:
        source, word = sick[0]  # the node's word first: it names the error
        if prev is None:
            return Health(source, word.reason, word.message, added=wall)
        return replace(
            prev, source=source, reason=word.reason, message=word.message, clear_since=None
        )
    if prev is None:
        return None
    if prev.clear_since is None:
        prev = replace(prev, clear_since=now)
    assert prev.clear_since is not None
    if now - prev.clear_since >= grace:
        return None
    return prev


def lifts_in(h: Health | None, *, now: float, grace: float) -> float | None:
    """Seconds until a recovering device's taint lifts (None: not recovering)."""
    if h is None or h.clear_since is None:
        return None
    return max(0.0, h.clear_since + grace - now)


def effect(h: Health, *, evict: bool) -> str:
    """`NoExecute` for a node-reported error when eviction is allowed, else `NoSchedule`."""
    return NO_EXECUTE if evict and h.source == Source.NODE else NO_SCHEDULE


def taints(h: Health | None, *, evict: bool) -> list[dict[str, Any]]:
    """The device's `taints` in a slice entry ([] when healthy)."""
    if h is None:
        return []
    added = dt.datetime.fromtimestamp(int(h.added), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return [
        {
            "key": TAINT_KEY,
            "value": taint_value(h.reason),
            "effect": effect(h, evict=evict),
            "timeAdded": added,
        }
    ]


def recovered_word(taint: Mapping[str, Any]) -> Word | None:
    """A node's word a new leader recovers from one of our slice taints (a GPU the node found
    broken and that was detached has no node to say so again); None for a fabric-reported taint
    (the fabric says it again) or another key."""
    if taint.get("key") != TAINT_KEY:
        return None
    value = str(taint.get("value") or "")
    if value.startswith(FABRIC_REASON_PREFIX):
        return None
    return Word(False, value or "Unhealthy", "recovered from the ResourceSlice's taint")


#: Annotations on a Node that keep the node-reported word on a GPU it had (`kept_word`).
KEPT_PREFIX: Final = "unhealthy.cohdi.io/"


def kept_key(driver_label: str, device: str) -> str:
    """The Node annotation that keeps the node's word on `device` (a qualified name: the
    prefix, then `<driver label>.<device>` as a name part of at most 63 characters)."""
    return KEPT_PREFIX + names.qualified_name_part(f"{driver_label}.{device}")


def kept_value(driver_label: str, device: str, word: Word, added: float) -> str:
    """The annotation's value: JSON `{"driver", "device", "reason", "message", "timeAdded"}`
    (the message cut to 256 characters: an annotation is no log)."""
    stamp = dt.datetime.fromtimestamp(int(added), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return json.dumps(
        {
            "driver": driver_label,
            "device": device,
            "reason": word.reason,
            "message": word.message[:256],
            "timeAdded": stamp,
        },
        sort_keys=True,
    )


def kept_word(key: str, value: str, *, driver_label: str) -> tuple[str, Word, str] | None:
    """(device, the node's unhealthy word, timeAdded) from one Node annotation, or None when it
    is not one of ours for this driver (another key, another deployment, malformed)."""
    if not key.startswith(KEPT_PREFIX):
        return None
    try:
        doc = json.loads(value)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("driver") != driver_label:
        return None
    device, reason = doc.get("device"), doc.get("reason")
    if not isinstance(device, str) or not device or not isinstance(reason, str):
        return None
    message = doc.get("message") if isinstance(doc.get("message"), str) else ""
    word = Word(False, node_reason(reason), str(message))
    return device, word, str(doc.get("timeAdded") or "")


class SwapStep(StrEnum):
    NONE = "none"  # healthy, or not attached through a live Online resource: nothing to swap
    WAIT = "wait"  # a claim holds it: it stays until the claim lets go
    DETACH = "detach"  # held by no claim: withhold, settle, fresh read, delete its resource


def decide_swap(unhealthy: bool, *, resource: Obj | None, held: bool) -> SwapStep:
    """Whether an unhealthy GPU is swapped out of its node now. Node minimum, warm capacity and
    requests do not keep it: a broken GPU is no capacity (a request's member is made again and
    gets a healthy device)."""
    if not unhealthy or resource is None or deleting(resource) or state(resource) != "Online":
        return SwapStep.NONE
    return SwapStep.WAIT if held else SwapStep.DETACH
