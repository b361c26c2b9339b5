"""ComposabilityRequests decided without I/O: CoHDI's "keep N GPUs of model M on node X" →
which member ComposableResources to create, delete or adopt, the request's status (CoHDI's
`state` / `error` / `resources` / `scalarResource`, unchanged on the wire, plus our `conditions`)
and the Events that explain it.

The controller (`agent.controllers.requesting`) observes — the request, the resources it owns,
the nodes wired to a fabric, the fabric's capacity — calls `decide`, and acts. Everything here is
a pure function of its arguments; time comes in as `now` (epoch seconds).

Ownership. A member carries, whatever the request's name (CoHDI names may have 253 characters,
label values only 63):
- an ownerReference to its request (`controller: true`; cluster-scoped owner and dependent), which
  is what ownership is decided on, by uid;
- `cohdi.io/request=<names.label_value(request)>` for selectors and people;
- `app.kubernetes.io/managed-by=cohdi-agent` (the label names the managing tool).
Resources CoHDI's operator made carry only `app.kubernetes.io/managed-by=<request name>`: they are
read as the request's and adopted (given the two above). A request named `cohdi-agent` cannot be
told apart from our label and adopts nothing that way.

Conditions of a request:
- `Ready`: `size` members Online.
- `Refused`: nothing is created for the spec as it stands — `TooLarge` (size over
  `--request-max-size`), `PolicyConflict` (`differentnode` with a `target_node`, which CoHDI's
  webhook forbids), `NoNode` (the target node, or every node, is not wired to a fabric),
  `UnknownModel` (no fabric those nodes reach has a usable device of the model), `UnsupportedType`
  (a type other than `gpu`, e.g. CoHDI's `cxlmemory`). CoHDI `state`
  is then `Failed` and `error` says why. Members that match the spec are left alone; members that
  do not are deleted.
- `Degraded`: the request runs below its size, and why — `ExceedsFabric` (the fabric has fewer
  devices of the model in all than asked: that many are kept), `NotEnoughNodes` (`differentnode`
  with fewer nodes than asked), `MemberFailed` (a member failed; it is replaced), `WaitingForDevice`
  (members the composer could not give a device, `NoFreeDevice`: the composer retries them when
  one frees), `CreateFailed` (the API server refused a member).

Failed members are never kept forever:
- `NoFreeDevice`: the composer attaches it as soon as the fabric has a free device of the model
  again. It is kept (it holds its place in the size) and reported as waiting. Should it still be
  Failed `replace_waiting_after` seconds after it failed while the fabric shows a free device for
  it, it is replaced (deleted, a new one created), so a composer that missed the change cannot
  strand it.
- any other reason (the device failed, is busy elsewhere, vanished, the fabric refused): the
  composer does not retry those, so it is replaced `replace_failed_after` seconds after it
  failed, doubled for every replacement since the request last ran (at most
  `replace_failed_max`), so a fabric that refuses every attach is not hammered.

Placement: `target_node` → every member there. `samenode` without a target → the node most
members already are on, else the wired node whose fabric has the most free devices of the model
(then most in all, then name). `differentnode` → at most one member a node, new members on unused
nodes in that same order. Surplus members are deleted Failed first, then those without a device,
Online last, and of the Online ones those no claim holds first (`Member.held`).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from agent.model import names
from agent.model.fabric import DeviceState, Inventory
from agent.model.objects import Obj, deleting, name_of, spec, state

#: The largest `spec.resource.size` the CRD accepts (its OpenAPI `maximum`).
SIZE_LIMIT: Final = 1024
KIND: Final = "ComposabilityRequest"
OWNER_LABEL: Final = "cohdi.io/request"
MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGER: Final = "cohdi-agent"
#: The composer's `status.reason` for a model-only resource that found no free device.
NO_FREE_DEVICE: Final = "NoFreeDevice"

# condition types
READY: Final = "Ready"
REFUSED: Final = "Refused"
DEGRADED: Final = "Degraded"
# reasons
TOO_LARGE: Final = "TooLarge"
POLICY_CONFLICT: Final = "PolicyConflict"
NO_NODE: Final = "NoNode"
UNKNOWN_MODEL: Final = "UnknownModel"
UNSUPPORTED_TYPE: Final = "UnsupportedType"
#: The device types this agent composes (`spec.resource.type`): GPUs (and accelerators the fabric
#: pools as such); CoHDI's CRD also allows `cxlmemory`, which no backend here offers.
SUPPORTED_TYPES: Final = frozenset({"gpu"})
EXCEEDS_FABRIC: Final = "ExceedsFabric"
NOT_ENOUGH_NODES: Final = "NotEnoughNodes"
MEMBER_FAILED: Final = "MemberFailed"
WAITING_FOR_DEVICE: Final = "WaitingForDevice"
CREATE_FAILED: Final = "CreateFailed"
RUNNING: Final = "Running"
CLEANING: Final = "Cleaning"


# --- names and ownership ------------------------------------------------------------------------


def owner_label(request: str) -> str:
    """The `cohdi.io/request` value for a request name: the name when it fits a label value
    (<= 63), else `<stem>-<hash of the name>` (`names.label_value`)."""
    return names.label_value(request)


def member_name(request: str, index: int) -> str:
    """The name of a request's member number `index`: `<request>-<index>`, the request part
    shortened to `<stem>-<hash>` when the whole would pass the 253 characters of an object name."""
    suffix = f"-{index}"
    return names.dns_subdomain(request, limit=names.DNS_SUBDOMAIN_MAX - len(suffix)) + suffix


def owner_of(obj: Obj) -> tuple[str, str] | None:
    """(request name, request uid) a resource belongs to: its ComposabilityRequest ownerReference,
    or for CoHDI's resources its `app.kubernetes.io/managed-by=<request>` label (uid "")."""
    meta = obj["metadata"]
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("name"):
            return str(ref["name"]), str(ref.get("uid") or "")
    labels = meta.get("labels") or {}
    legacy = labels.get(MANAGED_BY)
    if legacy and legacy != MANAGER and OWNER_LABEL not in labels:
        return str(legacy), ""
    return None


def owned_by(obj: Obj, request: str, uid: str) -> bool:
    """Does `obj` belong to the request (`request`, `uid`)? An ownerReference must carry its uid
    (a reference to an earlier request of the same name is not this one's)."""
    owner = owner_of(obj)
    if owner is None or owner[0] != request:
        return False
    return owner[1] == "" or owner[1] == uid


def member_labels(request: str) -> dict[str, str]:
    return {OWNER_LABEL: owner_label(request), MANAGED_BY: MANAGER}


def owner_reference(api_version: str, request: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": api_version,
        "kind": KIND,
        "name": request,
        "uid": uid,
        "controller": True,
    }


# --- what is observed ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Want:
    """`spec.resource` of a request."""

    type: str
    model: str
    size: int
    policy: str = "samenode"
    target_node: str = ""
    force_detach: bool = False

    @classmethod
    def of(cls, resource: Mapping[str, Any]) -> Want:
        return cls(
            type=str(resource.get("type") or ""),
            model=str(resource.get("model") or ""),
            size=int(resource.get("size") or 0),
            policy=str(resource.get("allocation_policy") or "samenode"),
            target_node=str(resource.get("target_node") or ""),
            force_detach=bool(resource.get("force_detach", False)),
        )


@dataclass(frozen=True, slots=True)
class Request:
    name: str
    uid: str
    generation: int
    want: Want
    #: `spec.resource` as written (copied to `status.scalarResource`).
    resource: Mapping[str, Any]
    #: The request's current status (the last one written, as far as we know).
    status: Mapping[str, Any]
    deleting: bool = False
    has_finalizer: bool = True
    #: Members replaced since the request last ran (for the replacement backoff).
    replacements: int = 0

    @classmethod
    def of(cls, obj: Obj, *, finalizer: str, replacements: int = 0) -> Request:
        resource = dict(spec(obj).get("resource") or {})
        meta = obj["metadata"]
        return cls(
            name=str(meta["name"]),
            uid=str(meta.get("uid") or ""),
            generation=int(meta.get("generation") or 0),
            want=Want.of(resource),
            resource=resource,
            status=dict(obj.get("status") or {}),
            deleting=deleting(obj),
            has_finalizer=finalizer in (meta.get("finalizers") or []),
            replacements=replacements,
        )


@dataclass(frozen=True, slots=True)
class Member:
    """One owned ComposableResource, as far as the request cares."""

    name: str
    node: str
    type: str
    model: str
    state: str = ""
    reason: str = ""
    error: str = ""
    device_id: str = ""
    cdi_device_id: str = ""
    force_detach: bool = False
    deleting: bool = False
    #: Owned through CoHDI's label only: to be given our labels and ownerReference.
    legacy: bool = False
    #: When it was first seen Failed (epoch seconds); None when it is not Failed.
    failed_since: float | None = None
    #: A claim holds its GPU (a pod may be using it): kept before any other member.
    held: bool = False

    @classmethod
    def of(cls, obj: Obj, *, failed_since: float | None = None, held: bool = False) -> Member:
        s, st = spec(obj), obj.get("status") or {}
        return cls(
            name=name_of(obj),
            node=str(s.get("target_node") or ""),
            type=str(s.get("type") or ""),
            model=str(s.get("model") or ""),
            state=state(obj),
            reason=str(st.get("reason") or ""),
            error=str(st.get("error") or st.get("message") or ""),
            device_id=str(st.get("device_id") or ""),
            cdi_device_id=str(st.get("cdi_device_id") or ""),
            force_detach=bool(s.get("force_detach", False)),
            deleting=deleting(obj),
            legacy=not any(
                r.get("kind") == KIND for r in obj["metadata"].get("ownerReferences") or []
            ),
            failed_since=failed_since if state(obj) == "Failed" else None,
            held=held,
        )


@dataclass(frozen=True, slots=True)
class Fabric:
    """What the fabrics can give, for placing members."""

    #: node name -> fabric id, for nodes that exist and are wired to a fabric.
    nodes: Mapping[str, str]
    #: (fabric, model) -> devices of the model there that are not failed.
    total: Mapping[tuple[str, str], int] = field(default_factory=dict)
    #: (fabric, model) -> free devices no resource, claim or withholding has taken.
    free: Mapping[tuple[str, str], int] = field(default_factory=dict)

    @classmethod
    def of(
        cls, inventory: Inventory | None, node_of_machine: Mapping[str, str], taken: Set[str]
    ) -> Fabric:
        """From the fabric's inventory, machine id -> node name, and the device ids taken."""
        if inventory is None:
            return cls({})
        nodes = {
            node_of_machine[m.id]: str(m.fabric)
            for m in inventory.machines
            if m.id in node_of_machine
        }
        total: Counter[tuple[str, str]] = Counter()
        free: Counter[tuple[str, str]] = Counter()
        for d in inventory.devices:
            if d.state != DeviceState.FAILED:
                total[(str(d.fabric), d.model)] += 1
            if d.state == DeviceState.FREE and d.id not in taken:
                free[(str(d.fabric), d.model)] += 1
        return cls(nodes, dict(total), dict(free))

    def models(self, fabrics: Iterable[str]) -> list[str]:
        wanted = set(fabrics)
        return sorted({m for (f, m), n in self.total.items() if f in wanted and n > 0})


@dataclass(frozen=True, slots=True)
class Limits:
    #: `--request-max-size`: larger requests are refused.
    max_size: int = 64
    #: Seconds a member failed for another reason than NoFreeDevice stays before it is replaced
    #: (doubled per replacement since the request last ran).
    replace_failed_after: float = 5.0
    replace_failed_max: float = 300.0
    #: Seconds a NoFreeDevice member may stay Failed while a device is free for it.
    replace_waiting_after: float = 60.0
    #: Seconds until a request that waits on the fabric (refused for it, short of devices) is
    #: looked at again even if no event comes.
    recheck: float = 30.0


# --- what to do ---------------------------------------------------------------------------------


class Finalizer(StrEnum):
    KEEP = "keep"
    ADD = "add"
    REMOVE = "remove"


@dataclass(frozen=True, slots=True)
class NewMember:
    name: str
    node: str


@dataclass(frozen=True, slots=True)
class Note:
    """An Event to record on the request."""

    reason: str
    message: str
    warning: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    finalizer: Finalizer = Finalizer.KEEP
    create: tuple[NewMember, ...] = ()
    delete: tuple[str, ...] = ()
    #: CoHDI's members to give our labels and ownerReference.
    adopt: tuple[str, ...] = ()
    #: Members whose `spec.force_detach` is to be set to the request's.
    force_detach: tuple[str, ...] = ()
    #: The whole status the request should have; None: leave it as it is.
    status: dict[str, Any] | None = None
    #: Events for the status (conditions that became true), recorded once it is written.
    events: tuple[Note, ...] = ()
    #: Events for the creates and deletes, recorded once they succeeded.
    done: tuple[Note, ...] = ()
    #: Look at the request again after this many seconds, event or not.
    recheck_after: float | None = None
    #: Members replaced in this decision (the controller counts them until the request runs).
    replaced: int = 0
    #: Some member waits for a free device: look again whenever a device may have freed.
    waiting: bool = False


# --- deciding -----------------------------------------------------------------------------------


def decide(
    req: Request,
    members: Sequence[Member],
    fabric: Fabric,
    limits: Limits,
    *,
    now: float,
    reserved: Set[str] = frozenset(),
) -> Decision:
    """What to do for one request, given the members it owns (being deleted or not).
    `reserved`: object names that exist but are not the request's (never given to a new member).
    """
    if req.deleting:
        return _clean(req, members, now)
    if not req.has_finalizer:
        return Decision(finalizer=Finalizer.ADD)
    want = req.want
    live = [m for m in members if not m.deleting]
    adopt = tuple(m.name for m in live if m.legacy)
    matching = [m for m in live if _fits(m, want, fabric)]
    mismatched = [m for m in live if m not in matching]
    refusal = _refusal(want, fabric, limits)
    if refusal is not None:
        reason = refusal[0]
        status = _status(req, matching, (), now, refused=refusal)
        return Decision(
            delete=tuple(m.name for m in mismatched),
            adopt=adopt,
            force_detach=_force_detach(matching, want),
            status=status,
            events=tuple(_transitions(req.status, status)),
            done=tuple(_deleted_note(mismatched, "mismatch")),
            recheck_after=limits.recheck if reason in (NO_NODE, UNKNOWN_MODEL) else None,
        )
    home = _home(want, matching, fabric)
    if want.policy == "samenode" and home:
        mismatched += [m for m in matching if m.node != home]
        matching = [m for m in matching if m.node == home]
    matching.sort(key=_keep_rank)
    if want.policy == "differentnode":
        seen: set[str] = set()
        ordered: list[Member] = []
        extra: list[Member] = []
        for m in matching:
            (extra if m.node in seen else ordered).append(m)
            seen.add(m.node)
        matching, mismatched = ordered, mismatched + extra
    capacity, shortfall = _capacity(want, home, fabric)
    target = min(want.size, capacity)
    kept, surplus = matching[:target], matching[target:]
    degraded: list[tuple[str, str]] = [shortfall] if shortfall else []
    keep, replaced, notes, later, waiting = _judge_failed(req, kept, fabric, limits, now)
    if waiting:
        degraded.append(_waiting(kept, want, fabric))
    failed = [m for m in kept if m.state == "Failed" and m.reason != NO_FREE_DEVICE]
    if failed:
        degraded.insert(0, _failed(failed, replaced))
    used = {m.name for m in members} | set(reserved)
    create = _new_members(req, want, target - len(keep), keep, home, fabric, used)
    gone = [*mismatched, *surplus, *replaced]
    status = _status(req, keep, create, now, degraded=degraded, short=target < want.size)
    done = [*notes, *_deleted_note(mismatched, "mismatch"), *_deleted_note(surplus, "surplus")]
    if create:
        nodes = ", ".join(sorted({c.node for c in create}))
        done.append(Note("Creating", f"{len(create)} x {want.model} on {nodes}"))
    if shortfall or waiting:
        later = limits.recheck if later is None else min(later, limits.recheck)
    return Decision(
        create=tuple(create),
        delete=tuple(m.name for m in gone),
        adopt=adopt,
        force_detach=_force_detach(keep, want),
        status=status,
        events=tuple(_transitions(req.status, status)),
        done=tuple(done),
        recheck_after=later,
        replaced=len(replaced),
        waiting=waiting,
    )


def _clean(req: Request, members: Sequence[Member], now: float) -> Decision:
    """A request being deleted: delete every member; once none is left, drop the finalizer."""
    if not members:
        return Decision(finalizer=Finalizer.REMOVE if req.has_finalizer else Finalizer.KEEP)
    live = tuple(m.name for m in members if not m.deleting)
    status = dict(req.status)
    status["state"] = CLEANING
    status["conditions"] = _conditions(
        req.status,
        [(READY, "False", CLEANING, f"deleting {len(members)} member(s)")],
        now,
        req.generation,
    )
    done = (Note(CLEANING, f"deleting {len(live)} member(s)"),) if live else ()
    return Decision(delete=live, status=status, done=done)


def _fits(m: Member, want: Want, fabric: Fabric) -> bool:
    """Can `m` count towards `want`? Same type and model, on the target node (or, without one,
    on a node still wired to a fabric)."""
    if (m.type, m.model) != (want.type, want.model):
        return False
    if want.target_node:
        return m.node == want.target_node
    return m.node in fabric.nodes


def _refusal(want: Want, fabric: Fabric, limits: Limits) -> tuple[str, str] | None:
    if want.size > limits.max_size:
        return TOO_LARGE, (
            f"size {want.size} is above this agent's limit of {limits.max_size} "
            f"(--request-max-size); nothing is created"
        )
    if want.policy == "differentnode" and want.target_node:
        return POLICY_CONFLICT, "allocation_policy differentnode cannot name a target_node"
    if want.type not in SUPPORTED_TYPES:
        return UNSUPPORTED_TYPE, (
            f"type {want.type!r} is not composed by this agent (it composes "
            f"{', '.join(sorted(SUPPORTED_TYPES))}); nothing is created"
        )
    if want.size == 0:
        return None
    if want.target_node and want.target_node not in fabric.nodes:
        return NO_NODE, (
            f"node {want.target_node} is not wired to a fabric this agent manages "
            f"(or has no Node object)"
        )
    if not fabric.nodes:
        return NO_NODE, "no node is wired to a fabric this agent manages"
    fabrics = [fabric.nodes[want.target_node]] if want.target_node else fabric.nodes.values()
    if not any(fabric.total.get((f, want.model), 0) for f in fabrics):
        where = want.target_node or "any node"
        have = ", ".join(fabric.models(fabrics)) or "none"
        return UNKNOWN_MODEL, (
            f"no fabric reachable from {where} has a usable {want.model} (models there: {have})"
        )
    return None


def _node_rank(node: str, model: str, fabric: Fabric) -> tuple[int, int, str]:
    f = fabric.nodes[node]
    return (-fabric.free.get((f, model), 0), -fabric.total.get((f, model), 0), node)


def _candidates(model: str, fabric: Fabric) -> list[str]:
    """Wired nodes whose fabric has the model, best first."""
    nodes = [n for n, f in fabric.nodes.items() if fabric.total.get((f, model), 0) > 0]
    return sorted(nodes, key=lambda n: _node_rank(n, model, fabric))


def _home(want: Want, matching: Sequence[Member], fabric: Fabric) -> str:
    """The node of a `samenode` request ("" for `differentnode`)."""
    if want.target_node:
        return want.target_node
    if want.policy == "differentnode":
        return ""
    counts = Counter(m.node for m in matching)
    if counts:
        return min(counts, key=lambda n: (-counts[n], n))
    best = _candidates(want.model, fabric)
    return best[0] if best else ""


def _capacity(want: Want, home: str, fabric: Fabric) -> tuple[int, tuple[str, str] | None]:
    """How many members the fabric could ever hold for `want`, and the Degraded reason when
    that is fewer than asked."""
    if want.policy == "differentnode":
        nodes = _candidates(want.model, fabric)
        fabrics = {fabric.nodes[n] for n in nodes}
        devices = sum(fabric.total.get((f, want.model), 0) for f in fabrics)
        capacity = min(len(nodes), devices)
        if capacity < want.size:
            return capacity, (
                NOT_ENOUGH_NODES,
                f"asks {want.size} x {want.model} on different nodes; {capacity} node(s) can "
                f"have one: keeping {capacity}",
            )
        return capacity, None
    if not home:
        return 0, None
    f = fabric.nodes.get(home, "")
    capacity = fabric.total.get((f, want.model), 0)
    if capacity < want.size:
        return capacity, (
            EXCEEDS_FABRIC,
            f"asks {want.size} x {want.model} on {home}; its fabric {f} has {capacity} in all: "
            f"keeping {capacity}",
        )
    return capacity, None


_RANK = {"Online": 0, "Attaching": 1, "": 2, "Failed": 4}


def _keep_rank(m: Member) -> tuple[int, int, str]:
    """Order in which members are kept (the reverse: deleted first): one a claim holds first
    (surplus must never take a GPU from a pod while an idle member can go), then by state."""
    rank = -1 if m.held and m.state == "Online" else _RANK.get(m.state, 3)
    if m.state == "Attaching" and not m.cdi_device_id:
        rank = 2
    if m.state == "Failed" and m.reason == NO_FREE_DEVICE:
        rank = 3
    return (rank, len(m.name), m.name)


def _judge_failed(
    req: Request, kept: Sequence[Member], fabric: Fabric, limits: Limits, now: float
) -> tuple[list[Member], list[Member], list[Note], float | None, bool]:
    """Split the kept members into those still kept and Failed ones to replace now. Returns
    (keep, replace, notes, seconds until the next replacement is due, any waiting)."""
    keep: list[Member] = []
    gone: list[Member] = []
    notes: list[Note] = []
    due: list[float] = []
    waiting = False
    spare = dict(fabric.free)
    backoff = min(
        limits.replace_failed_after * 2 ** min(req.replacements, 30), limits.replace_failed_max
    )
    for m in kept:
        if m.state != "Failed":
            keep.append(m)
            continue
        age = now - (m.failed_since if m.failed_since is not None else now)
        if m.reason == NO_FREE_DEVICE:
            slot = (fabric.nodes.get(m.node, ""), m.model)
            if spare.get(slot, 0) > 0 and age >= limits.replace_waiting_after:
                spare[slot] -= 1
                gone.append(m)
                notes.append(
                    Note(
                        "Replacing",
                        f"member {m.name} stayed NoFreeDevice for {age:.0f} s while a "
                        f"{m.model} is free: replaced",
                        warning=True,
                    )
                )
                continue
            keep.append(m)
            waiting = True
            if spare.get(slot, 0) > 0:
                due.append(limits.replace_waiting_after - age)
            continue
        if age >= backoff:
            gone.append(m)
            notes.append(
                Note(
                    "Replacing",
                    f"member {m.name} failed ({m.reason or 'Failed'}: {m.error}): replaced",
                    warning=True,
                )
            )
        else:
            keep.append(m)
            due.append(backoff - age)
    return keep, gone, notes, (max(min(due), 0.0) if due else None), waiting


def _waiting(kept: Sequence[Member], want: Want, fabric: Fabric) -> tuple[str, str]:
    waiting = [m for m in kept if m.state == "Failed" and m.reason == NO_FREE_DEVICE]
    free = sum(
        fabric.free.get((f, want.model), 0) for f in {fabric.nodes.get(m.node, "") for m in waiting}
    )
    return WAITING_FOR_DEVICE, (
        f"{len(waiting)} of {len(kept)} member(s) wait for a free {want.model} "
        f"({free} free now); each is attached when one frees"
    )


def _failed(failed: Sequence[Member], replaced: Sequence[Member]) -> tuple[str, str]:
    first = failed[0]
    now = sum(1 for m in failed if m in replaced)
    later = len(failed) - now
    parts = []
    if now:
        parts.append(f"{now} replaced now")
    if later:
        parts.append(f"{later} to be replaced")
    return MEMBER_FAILED, (
        f"{len(failed)} member(s) failed, e.g. {first.name} ({first.reason or 'Failed'}: "
        f"{first.error}): {', '.join(parts)}"
    )


def _new_members(
    req: Request,
    want: Want,
    count: int,
    keep: Sequence[Member],
    home: str,
    fabric: Fabric,
    used: Set[str],
) -> list[NewMember]:
    if count <= 0:
        return []
    if want.policy == "differentnode":
        taken = {m.node for m in keep}
        nodes = [n for n in _candidates(want.model, fabric) if n not in taken][:count]
    else:
        nodes = [home] * count
    out: list[NewMember] = []
    index = 0
    taken_names = set(used)
    for node in nodes:
        while member_name(req.name, index) in taken_names:
            index += 1
        name = member_name(req.name, index)
        taken_names.add(name)
        out.append(NewMember(name, node))
    return out


def _force_detach(members: Iterable[Member], want: Want) -> tuple[str, ...]:
    return tuple(m.name for m in members if m.force_detach != want.force_detach)


def _deleted_note(members: Sequence[Member], why: str) -> list[Note]:
    if not members:
        return []
    names_ = ", ".join(m.name for m in members[:5]) + (" ..." if len(members) > 5 else "")
    what = "no longer match the spec" if why == "mismatch" else "are more than the size"
    return [Note("Deleting", f"{len(members)} member(s) {what}: {names_}")]


# --- status -------------------------------------------------------------------------------------


def _entry(m: Member) -> dict[str, str]:
    return {
        "state": m.state or "Attaching",
        "device_id": m.device_id,
        "cdi_device_id": m.cdi_device_id,
        "node_name": m.node,
        "error": m.error if m.state == "Failed" else "",
    }


def _status(
    req: Request,
    keep: Sequence[Member],
    create: Sequence[NewMember],
    now: float,
    *,
    refused: tuple[str, str] | None = None,
    degraded: Sequence[tuple[str, str]] = (),
    short: bool = False,
) -> dict[str, Any]:
    want = req.want
    resources = {m.name: _entry(m) for m in keep}
    for c in create:
        resources[c.name] = {
            "state": "Attaching",
            "device_id": "",
            "cdi_device_id": "",
            "node_name": c.node,
            "error": "",
        }
    online = sum(1 for m in keep if m.state == "Online")
    running = refused is None and not short and online == want.size == len(resources)
    if refused is not None:
        phase, error = "Failed", refused[1]
    elif running:
        phase, error = "Running", ""
    else:
        phase = "Updating" if keep else "NodeAllocating"
        error = "; ".join(message for _, message in degraded)
    if degraded:
        degraded_c = (DEGRADED, "True", degraded[0][0], error)
    else:
        degraded_c = (DEGRADED, "False", "AsRequested", "")
    if refused is not None:
        ready = (READY, "False", refused[0], refused[1])
        refused_c = (REFUSED, "True", refused[0], refused[1])
        degraded_c = (DEGRADED, "False", "AsRequested", "")
    else:
        refused_c = (REFUSED, "False", "Accepted", "")
        if running:
            where = ", ".join(sorted({m.node for m in keep})) or "no node"
            ready = (READY, "True", RUNNING, f"{want.size} x {want.model} Online on {where}")
        elif degraded:
            ready = (READY, "False", degraded[0][0], f"{online} of {want.size} Online")
        else:
            ready = (READY, "False", "Attaching", f"{online} of {want.size} Online")
    return {
        "state": phase,
        "error": error,
        "resources": resources,
        "scalarResource": dict(req.resource),
        "conditions": _conditions(req.status, [ready, refused_c, degraded_c], now, req.generation),
    }


def _stamp(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _conditions(
    old: Mapping[str, Any],
    new: Sequence[tuple[str, str, str, str]],
    now: float,
    generation: int,
) -> list[dict[str, Any]]:
    """Conditions (type, status, reason, message) in that order; `lastTransitionTime` kept from
    `old` when the status of a type did not change. Messages are cut to the CRD's limit."""
    before = {c.get("type"): c for c in old.get("conditions") or []}
    out = []
    for ctype, cstatus, reason, message in new:
        prev = before.get(ctype)
        since = (
            prev["lastTransitionTime"]
            if prev and prev.get("status") == cstatus and prev.get("lastTransitionTime")
            else _stamp(now)
        )
        out.append(
            {
                "type": ctype,
                "status": cstatus,
                "reason": reason,
                "message": message[:32768],
                "lastTransitionTime": since,
                "observedGeneration": generation,
            }
        )
    return out


def _transitions(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Note]:
    """Events for conditions that became true or changed reason while true."""
    before = {c.get("type"): c for c in old.get("conditions") or []}
    notes = []
    for c in new.get("conditions") or []:
        prev = before.get(c["type"]) or {}
        if c["status"] != "True":
            continue
        if prev.get("status") == "True" and prev.get("reason") == c["reason"]:
            continue
        notes.append(Note(c["reason"], c["message"], warning=c["type"] != READY))
    return notes


def create_failed(
    req: Request, status: Mapping[str, Any], failed: Set[str], message: str, now: float
) -> tuple[dict[str, Any], Note]:
    """The status to write when the API server refused to create members `failed` (a permanent
    error: it is not retried until something changes), and the Event saying so."""
    resources = {k: v for k, v in (status.get("resources") or {}).items() if k not in failed}
    out = {**status, "resources": resources, "state": "Failed", "error": message}
    online = sum(1 for v in resources.values() if v.get("state") == "Online")
    out["conditions"] = _conditions(
        req.status,
        [
            (READY, "False", CREATE_FAILED, f"{online} of {req.want.size} Online"),
            (REFUSED, "False", "Accepted", ""),
            (DEGRADED, "True", CREATE_FAILED, message),
        ],
        now,
        req.generation,
    )
    return out, Note(CREATE_FAILED, message, warning=True)


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch of `status` from `old` to `new`: members no longer listed are set to
    null (a merge patch merges maps; lists such as `conditions` are replaced whole)."""
    patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    old_res = old.get("resources") or {}
    if "resources" in patch:
        gone = {k: None for k in old_res if k not in new.get("resources", {})}
        patch["resources"] = {**patch["resources"], **gone}
    for k in old:
        if k not in new:
            patch[k] = None
    return patch


def serves(want: Want, fabric: Fabric, members: Iterable[Member]) -> bool:
    """Can this deployment serve a request no deployment has labelled yet (CoHDI's, or
    hand-written)? Its `target_node` is wired to one of our fabrics; without one, a member it
    already has is on such a node, or, with no members, one of our fabrics has its model."""
    if want.target_node:
        return want.target_node in fabric.nodes
    nodes = [m.node for m in members if m.node]
    if nodes:
        return any(n in fabric.nodes for n in nodes)
    return any(fabric.total.get((f, want.model), 0) for f in set(fabric.nodes.values()))
