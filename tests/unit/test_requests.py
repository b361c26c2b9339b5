"""The ComposabilityRequest decisions (`agent.model.requests`), every branch, without I/O: bounds,
refusals, placement, surplus, failed members, ownership, names, status and Events.

Reproductions of reported bugs: `size: 1000000` made ComposableResources without end (now refused
with a condition, nothing created); a 64+-character request name made a label the API server
refuses (now names and labels are valid for 253 characters); an unknown model left the request
`Updating` with the reason only on a member (now `Refused UnknownModel` on the request); Failed
members counted as kept forever (now replaced or retried, and said so).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from agent.model import requests as rq
from agent.model.fabric import (
    DeviceId,
    DeviceState,
    FabricId,
    Inventory,
    Machine,
    MachineId,
    PoolDevice,
)

A100 = "NVIDIA-A100-PCIE-40GB"
H100 = "NVIDIA-H100"
NOW = 1_000_000.0
SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
LABEL_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"


def fabric(
    nodes: dict[str, str] | None = None,
    total: int = 8,
    free: int | None = None,
    model: str = A100,
) -> rq.Fabric:
    nodes = {"n1": "f1", "n2": "f1", "n3": "f1"} if nodes is None else nodes
    fabrics = set(nodes.values())
    return rq.Fabric(
        nodes,
        {(f, model): total for f in fabrics},
        {(f, model): total if free is None else free for f in fabrics},
    )


def request(
    size: int = 2,
    *,
    node: str = "n1",
    model: str = A100,
    policy: str = "samenode",
    status: dict[str, Any] | None = None,
    finalizer: bool = True,
    deleting: bool = False,
    force_detach: bool = False,
    replacements: int = 0,
    name: str = "req",
) -> rq.Request:
    resource = {
        "type": "gpu",
        "model": model,
        "size": size,
        "allocation_policy": policy,
        "target_node": node,
        "force_detach": force_detach,
    }
    return rq.Request(
        name=name,
        uid="uid-1",
        generation=3,
        want=rq.Want.of(resource),
        resource=resource,
        status=status or {},
        deleting=deleting,
        has_finalizer=finalizer,
        replacements=replacements,
    )


def member(
    name: str,
    state: str = "Online",
    *,
    node: str = "n1",
    model: str = A100,
    reason: str = "",
    failed_for: float | None = None,
    deleting: bool = False,
    legacy: bool = False,
    device: str = "",
    force_detach: bool = False,
) -> rq.Member:
    return rq.Member(
        name=name,
        node=node,
        type="gpu",
        model=model,
        state=state,
        reason=reason,
        error=f"{reason} happened" if reason else "",
        device_id=f"GPU-{name}" if state == "Online" else "",
        cdi_device_id=device or (f"dev-{name}" if state in ("Online", "Attaching") else ""),
        force_detach=force_detach,
        deleting=deleting,
        legacy=legacy,
        failed_since=None if failed_for is None else NOW - failed_for,
    )


def decide(
    req: rq.Request,
    members: list[rq.Member] | None = None,
    fab: rq.Fabric | None = None,
    limits: rq.Limits | None = None,
    **kw: Any,
) -> rq.Decision:
    return rq.decide(req, members or [], fab or fabric(), limits or rq.Limits(), now=NOW, **kw)


def condition(d: rq.Decision, ctype: str) -> dict[str, Any]:
    assert d.status is not None
    return next(c for c in d.status["conditions"] if c["type"] == ctype)


def notes(d: rq.Decision) -> list[rq.Note]:
    """The Events of a decision: for its status, then for its creates and deletes."""
    return [*d.events, *d.done]


def reasons(d: rq.Decision) -> list[str]:
    return [n.reason for n in notes(d)]


# --- names and ownership ------------------------------------------------------------------------


def test_names_and_labels_are_valid_whatever_the_request_name() -> None:
    # Reproduction: a 64-character name made `app.kubernetes.io/managed-by=<name>`, which the API
    # server refuses (label values have 63 characters at most); the request then did nothing.
    for name in ["r", "a" * 63, "a" * 64, "b" * 253, "x." * 126 + "y", "req-1.example.com"]:
        label = rq.owner_label(name)
        assert len(label) <= 63, name
        assert re.fullmatch(LABEL_VALUE, label), name
        for index in (0, 7, 1023):
            member_name = rq.member_name(name, index)
            assert len(member_name) <= 253, name
            assert re.fullmatch(SUBDOMAIN, member_name), name
    assert rq.owner_label("req") == "req"  # short names stay readable
    assert rq.member_name("req", 4) == "req-4"
    # two long names with one prefix get distinct labels and member names
    long_a, long_b = "a" * 200 + "x", "a" * 200 + "y"
    assert rq.owner_label(long_a) != rq.owner_label(long_b)
    assert rq.member_name(long_a, 0) != rq.member_name(long_b, 0)
    assert rq.member_name("b" * 253, 0) != rq.member_name("b" * 253, 1)
    assert rq.member_labels("b" * 253) == {
        rq.OWNER_LABEL: rq.owner_label("b" * 253),
        rq.MANAGED_BY: "cohdi-agent",
    }


def test_ownership_by_reference_and_by_cohdi_label() -> None:
    ref = rq.owner_reference("g/v1", "req", "uid-1")
    ours = {"metadata": {"name": "req-0", "ownerReferences": [ref], "labels": {}}}
    assert rq.owner_of(ours) == ("req", "uid-1")
    assert rq.owned_by(ours, "req", "uid-1")
    assert not rq.owned_by(ours, "req", "uid-2")  # an earlier request of the same name
    assert not rq.owned_by(ours, "other", "uid-1")
    cohdi = {"metadata": {"name": "gpu-abc", "labels": {rq.MANAGED_BY: "req"}}}
    assert rq.owner_of(cohdi) == ("req", "")
    assert rq.owned_by(cohdi, "req", "uid-1")  # CoHDI's: adopted by whoever has the name
    tool = {"metadata": {"name": "x", "labels": {rq.MANAGED_BY: "cohdi-agent"}}}
    assert rq.owner_of(tool) is None
    labelled = {"metadata": {"name": "x", "labels": {rq.MANAGED_BY: "req", rq.OWNER_LABEL: "req"}}}
    assert rq.owner_of(labelled) is None  # ours without a reference: not CoHDI's
    other_kind = {"metadata": {"name": "x", "ownerReferences": [{"kind": "Pod", "name": "p"}]}}
    assert rq.owner_of(other_kind) is None


def test_member_and_request_are_read_from_the_wire() -> None:
    obj = {
        "metadata": {
            "name": "req-0",
            "labels": {rq.MANAGED_BY: "req"},
            "deletionTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"type": "gpu", "model": A100, "target_node": "n1", "force_detach": True},
        "status": {"state": "Failed", "reason": "NoFreeDevice", "message": "none free"},
    }
    m = rq.Member.of(obj, failed_since=5.0)
    assert (m.name, m.node, m.state, m.reason, m.error) == (
        "req-0",
        "n1",
        "Failed",
        "NoFreeDevice",
        "none free",
    )
    assert m.deleting
    assert m.legacy
    assert m.force_detach
    assert m.failed_since == 5.0
    online = {**obj, "status": {"state": "Online"}, "metadata": {"name": "x"}}
    assert rq.Member.of(online, failed_since=5.0).failed_since is None
    req_obj = {
        "metadata": {"name": "req", "uid": "u", "generation": 4, "finalizers": ["f"]},
        "spec": {"resource": {"type": "gpu", "model": A100, "size": 3}},
        "status": {"state": "Running"},
    }
    req = rq.Request.of(req_obj, finalizer="f", replacements=2)
    assert req.want == rq.Want("gpu", A100, 3, "samenode", "", False)
    assert (req.name, req.uid, req.generation, req.has_finalizer, req.deleting) == (
        "req",
        "u",
        4,
        True,
        False,
    )
    assert req.replacements == 2
    assert req.status == {"state": "Running"}


def test_fabric_view_from_the_inventory() -> None:
    f1, f2 = FabricId("f1"), FabricId("f2")
    inv = Inventory(
        machines=(
            Machine(MachineId("m1"), "n1", f1),
            Machine(MachineId("m2"), "n2", f2),
            Machine(MachineId("m3"), "gone", f2),  # no Node for it
        ),
        devices=(
            PoolDevice(DeviceId("d1"), f1, A100, DeviceState.FREE),
            PoolDevice(DeviceId("d2"), f1, A100, DeviceState.FREE),  # taken
            PoolDevice(DeviceId("d3"), f1, A100, DeviceState.ATTACHED, machine=MachineId("m1")),
            PoolDevice(DeviceId("d4"), f1, A100, DeviceState.FAILED),
            PoolDevice(DeviceId("d5"), f2, H100, DeviceState.FREE),
        ),
    )
    view = rq.Fabric.of(inv, {"m1": "n1", "m2": "n2"}, {"d2"})
    assert view.nodes == {"n1": "f1", "n2": "f2"}
    assert view.total == {("f1", A100): 3, ("f2", H100): 1}
    assert view.free == {("f1", A100): 1, ("f2", H100): 1}
    assert view.models(["f1", "f2"]) == [A100, H100]
    assert rq.Fabric.of(None, {}, set()).nodes == {}


# --- finalizer and cleaning ---------------------------------------------------------------------


def test_a_new_request_gets_the_finalizer_first() -> None:
    d = decide(request(finalizer=False))
    assert d.finalizer is rq.Finalizer.ADD
    assert not d.create
    assert d.status is None


def test_deleting_a_request_deletes_every_member_then_drops_the_finalizer() -> None:
    req = request(deleting=True, status={"state": "Running"})
    d = decide(req, [member("req-0"), member("req-1", "Failed", reason="DeviceFailed")])
    assert set(d.delete) == {"req-0", "req-1"}
    assert d.finalizer is rq.Finalizer.KEEP
    assert d.status is not None
    assert d.status["state"] == "Cleaning"
    assert reasons(d) == ["Cleaning"]
    # members already on their way out: nothing more to delete, wait for them to go
    waiting = decide(req, [member("req-0", deleting=True)])
    assert waiting.delete == ()
    assert waiting.events == ()
    assert waiting.finalizer is rq.Finalizer.KEEP
    assert decide(req).finalizer is rq.Finalizer.REMOVE
    assert decide(request(deleting=True, finalizer=False)).finalizer is rq.Finalizer.KEEP


# --- bounds and refusals ------------------------------------------------------------------------


def test_a_size_over_the_limit_is_refused_and_nothing_is_created() -> None:
    # Reproduction: `size: 1000000` made 698, then 1,824 ComposableResources in 25 s, silently.
    d = decide(request(1_000_000), limits=rq.Limits(max_size=64))
    assert d.create == ()
    assert d.delete == ()
    assert d.status is not None
    assert d.status["state"] == "Failed"
    assert "above this agent's limit of 64" in d.status["error"]
    refused = condition(d, rq.REFUSED)
    assert (refused["status"], refused["reason"]) == ("True", rq.TOO_LARGE)
    assert condition(d, rq.READY)["status"] == "False"
    assert [(n.reason, n.warning) for n in d.events] == [(rq.TOO_LARGE, True)]
    # the next pass, with that status written, announces nothing again
    again = decide(request(1_000_000, status=d.status), limits=rq.Limits(max_size=64))
    assert again.events == ()
    assert again.status == d.status
    # members that match are left alone when the size alone is refused
    kept = decide(request(100), [member("req-0")], limits=rq.Limits(max_size=64))
    assert kept.delete == ()
    assert kept.status is not None
    assert "req-0" in kept.status["resources"]


def test_differentnode_with_a_target_node_is_refused() -> None:
    d = decide(request(2, policy="differentnode", node="n1"))
    assert condition(d, rq.REFUSED)["reason"] == rq.POLICY_CONFLICT
    assert d.create == ()


def test_no_node_when_the_target_is_not_on_a_fabric() -> None:
    d = decide(request(2, node="elsewhere"), [member("req-0", node="n1")])
    assert condition(d, rq.REFUSED)["reason"] == rq.NO_NODE
    assert "node elsewhere is not wired" in d.status["error"]  # type: ignore[index]
    assert d.create == ()
    assert d.delete == ("req-0",)
    assert d.recheck_after == rq.Limits().recheck  # the node may be wired later
    assert next((n.reason, n.warning) for n in d.events) == (rq.NO_NODE, True)
    nowhere = decide(request(2, node=""), fab=fabric(nodes={}))
    assert condition(nowhere, rq.REFUSED)["reason"] == rq.NO_NODE
    assert "no node is wired" in nowhere.status["error"]  # type: ignore[index]


def test_an_unknown_model_is_refused_on_the_request() -> None:
    # Reproduction: an unknown model left the request `Updating` forever, the reason only on a
    # member the composer had failed.
    d = decide(request(1, model="NVIDIA-B200"))
    assert d.create == ()
    assert condition(d, rq.REFUSED)["reason"] == rq.UNKNOWN_MODEL
    assert d.status is not None
    assert d.status["state"] == "Failed"
    assert f"usable NVIDIA-B200 (models there: {A100})" in d.status["error"]
    assert d.recheck_after == rq.Limits().recheck
    empty = decide(request(1, node=""), fab=fabric(total=0))
    assert "(models there: none)" in empty.status["error"]  # type: ignore[index]


def test_size_zero_needs_no_fabric_and_deletes_every_member() -> None:
    d = decide(request(0, node="elsewhere"), [member("req-0", node="elsewhere")])
    assert d.delete == ("req-0",)
    assert d.create == ()
    assert d.status is not None
    assert d.status["state"] == "Running"
    assert d.status["resources"] == {}
    assert condition(d, rq.READY)["status"] == "True"
    nothing = decide(request(0, node=""), fab=fabric(nodes={}))
    assert nothing.status is not None
    assert nothing.status["state"] == "Running"


# --- creating and running -----------------------------------------------------------------------


def test_a_request_creates_its_members_on_the_target_node() -> None:
    d = decide(request(2))
    assert d.create == (rq.NewMember("req-0", "n1"), rq.NewMember("req-1", "n1"))
    assert d.status is not None
    assert d.status["state"] == "NodeAllocating"
    assert set(d.status["resources"]) == {"req-0", "req-1"}
    assert d.status["resources"]["req-0"]["node_name"] == "n1"
    assert d.status["scalarResource"]["size"] == 2
    assert reasons(d) == ["Creating"]
    assert condition(d, rq.READY)["reason"] == "Attaching"
    assert condition(d, rq.READY)["observedGeneration"] == 3


def test_all_members_online_is_running_once() -> None:
    members = [member("req-0"), member("req-1")]
    d = decide(request(2), members)
    assert d.create == ()
    assert d.delete == ()
    assert d.status is not None
    assert d.status["state"] == "Running"
    assert d.status["error"] == ""
    ready = condition(d, rq.READY)
    assert (ready["status"], ready["reason"]) == ("True", rq.RUNNING)
    assert [(n.reason, n.warning) for n in d.events] == [(rq.RUNNING, False)]
    assert d.status["resources"]["req-0"] == {
        "state": "Online",
        "device_id": "GPU-req-0",
        "cdi_device_id": "dev-req-0",
        "node_name": "n1",
        "error": "",
    }
    again = decide(request(2, status=d.status), members)
    assert again.events == ()
    assert again.status == d.status


def test_a_transition_time_is_kept_until_the_condition_changes() -> None:
    first = decide(request(2))
    stamp = condition(first, rq.READY)["lastTransitionTime"]
    later = rq.decide(
        request(2, status=first.status), [member("req-0")], fabric(), rq.Limits(), now=NOW + 60
    )
    assert condition(later, rq.READY)["lastTransitionTime"] == stamp  # still False
    done = rq.decide(
        request(2, status=first.status),
        [member("req-0"), member("req-1")],
        fabric(),
        rq.Limits(),
        now=NOW + 60,
    )
    assert condition(done, rq.READY)["lastTransitionTime"] != stamp


def test_more_than_the_fabric_has_keeps_what_it_has_and_says_so() -> None:
    d = decide(request(10), fab=fabric(total=8))
    assert len(d.create) == 8
    degraded = condition(d, rq.DEGRADED)
    assert (degraded["status"], degraded["reason"]) == ("True", rq.EXCEEDS_FABRIC)
    assert "has 8 in all: keeping 8" in degraded["message"]
    assert d.recheck_after == rq.Limits().recheck
    online = [member(f"req-{i}") for i in range(8)]
    full = decide(request(10, status=d.status), online, fab=fabric(total=8))
    assert full.status is not None
    assert full.status["state"] == "Updating"
    assert condition(full, rq.READY)["reason"] == rq.EXCEEDS_FABRIC


def test_names_in_use_or_reserved_are_not_reused() -> None:
    d = decide(
        request(3),
        [member("req-0"), member("req-2", deleting=True)],
        reserved={"req-1"},
    )
    assert [c.name for c in d.create] == ["req-3", "req-4"]


def test_a_253_character_request_gets_valid_member_names() -> None:
    name = "r" * 253
    d = decide(request(2, name=name))
    assert len(d.create) == 2
    for c in d.create:
        assert len(c.name) <= 253
        assert re.fullmatch(SUBDOMAIN, c.name)


# --- placement ----------------------------------------------------------------------------------


def test_samenode_without_a_target_goes_where_most_is_free_then_stays() -> None:
    fab = rq.Fabric(
        {"n1": "f1", "n2": "f2", "n3": "f3"},
        {("f1", A100): 4, ("f2", A100): 4, ("f3", H100): 9},
        {("f1", A100): 1, ("f2", A100): 3, ("f3", H100): 9},
    )
    d = decide(request(2, node=""), fab=fab)
    assert {c.node for c in d.create} == {"n2"}
    # members already on n1: the request stays there, strays elsewhere are deleted
    there = decide(
        request(2, node=""),
        [member("req-0", node="n1"), member("req-1", node="n1"), member("req-2", node="n2")],
        fab=fab,
    )
    assert there.delete == ("req-2",)
    assert there.create == ()


def test_differentnode_puts_one_member_a_node() -> None:
    d = decide(request(2, node="", policy="differentnode"))
    assert len({c.node for c in d.create}) == 2
    # two on one node: the second is surplus and a free node takes its place
    doubled = decide(
        request(2, node="", policy="differentnode"),
        [member("req-0", node="n1"), member("req-1", node="n1")],
    )
    assert doubled.delete == ("req-1",)
    assert [c.node for c in doubled.create] == ["n2"]
    assert reasons(doubled) == ["Deleting", "Creating"]


def test_differentnode_with_too_few_nodes_keeps_one_a_node_and_says_so() -> None:
    d = decide(request(5, node="", policy="differentnode"))
    assert sorted(c.node for c in d.create) == ["n1", "n2", "n3"]
    assert condition(d, rq.DEGRADED)["reason"] == rq.NOT_ENOUGH_NODES


# --- surplus, mismatch, adoption ----------------------------------------------------------------


def test_surplus_members_go_failed_first_online_last() -> None:
    members = [
        member("req-0", "Online"),
        member("req-1", "Attaching"),
        member("req-2", ""),
        rq.Member("req-5", "n1", "gpu", A100, state="Attaching"),  # no device chosen yet
        member("req-3", "Failed", reason="NoFreeDevice", failed_for=1),
        member("req-4", "Failed", reason="DeviceFailed", failed_for=1),
    ]
    d = decide(request(2), members)
    assert set(d.delete) == {"req-2", "req-3", "req-4", "req-5"}
    assert set(d.status["resources"]) == {"req-0", "req-1"}  # type: ignore[index]
    assert reasons(d) == ["Deleting"]
    one = decide(request(1), members)
    assert set(one.delete) == {"req-1", "req-2", "req-3", "req-4", "req-5"}


def test_members_of_another_model_are_replaced() -> None:
    d = decide(request(1, model=H100), [member("req-0", model=A100)], fab=fabric(model=H100))
    assert d.delete == ("req-0",)
    assert d.create == (rq.NewMember("req-1", "n1"),)
    assert "no longer match the spec" in d.done[0].message


def test_cohdi_members_are_adopted_and_counted() -> None:
    d = decide(request(2), [member("gpu-a", legacy=True), member("gpu-b", legacy=True)])
    assert set(d.adopt) == {"gpu-a", "gpu-b"}
    assert d.create == ()
    assert d.delete == ()


def test_force_detach_follows_the_request() -> None:
    d = decide(request(2, force_detach=True), [member("req-0"), member("req-1", force_detach=True)])
    assert d.force_detach == ("req-0",)


# --- failed members -----------------------------------------------------------------------------


def test_a_member_without_a_free_device_waits_and_says_so() -> None:
    members = [member("req-0"), member("req-1", "Failed", reason="NoFreeDevice", failed_for=1)]
    d = decide(request(2), members, fab=fabric(free=0))
    assert d.create == ()
    assert d.delete == ()
    assert d.waiting
    degraded = condition(d, rq.DEGRADED)
    assert (degraded["status"], degraded["reason"]) == ("True", rq.WAITING_FOR_DEVICE)
    assert "1 of 2 member(s) wait for a free" in degraded["message"]
    assert d.status is not None
    assert d.status["state"] == "Updating"
    assert d.status["resources"]["req-1"]["error"] == "NoFreeDevice happened"
    assert d.recheck_after == rq.Limits().recheck
    # however long it waits, with nothing free it is not replaced (the composer retries it)
    long = decide(
        request(2),
        [members[0], member("req-1", "Failed", reason="NoFreeDevice", failed_for=3600)],
        fab=fabric(free=0),
    )
    assert long.delete == ()
    assert long.create == ()


def test_a_member_without_a_device_is_replaced_if_a_free_one_stays_unused() -> None:
    limits = rq.Limits(replace_waiting_after=60, recheck=100)
    fresh = member("req-1", "Failed", reason="NoFreeDevice", failed_for=10)
    d = decide(request(2), [member("req-0"), fresh], fab=fabric(free=1), limits=limits)
    assert d.delete == ()
    assert d.recheck_after == pytest.approx(50)
    stuck = member("req-1", "Failed", reason="NoFreeDevice", failed_for=61)
    d = decide(request(2), [member("req-0"), stuck], fab=fabric(free=1), limits=limits)
    assert d.delete == ("req-1",)
    assert d.create == (rq.NewMember("req-2", "n1"),)
    assert d.replaced == 1
    assert [(n.reason, n.warning) for n in notes(d) if n.reason == "Replacing"] == [
        ("Replacing", True)
    ]
    # one free device replaces one stuck member, not two
    two = [
        member("req-0", "Failed", reason="NoFreeDevice", failed_for=61),
        member("req-1", "Failed", reason="NoFreeDevice", failed_for=61),
    ]
    d = decide(request(2), two, fab=fabric(free=1), limits=limits)
    assert len(d.delete) == 1
    assert len(d.create) == 1
    assert d.waiting


def test_a_failed_member_is_replaced_after_a_backoff() -> None:
    limits = rq.Limits(replace_failed_after=5, replace_failed_max=300)
    early = member("req-1", "Failed", reason="DeviceFailed", failed_for=2)
    d = decide(request(2), [member("req-0"), early], limits=limits)
    assert d.delete == ()
    assert d.recheck_after == pytest.approx(3)
    degraded = condition(d, rq.DEGRADED)
    assert degraded["reason"] == rq.MEMBER_FAILED
    assert "1 to be replaced" in degraded["message"]
    due = member("req-1", "Failed", reason="DeviceFailed", failed_for=5)
    d = decide(request(2), [member("req-0"), due], limits=limits)
    assert d.delete == ("req-1",)
    assert d.create == (rq.NewMember("req-2", "n1"),)
    assert "1 replaced now" in condition(d, rq.DEGRADED)["message"]
    assert "DeviceFailed" in next(n.message for n in notes(d) if n.reason == "Replacing")
    # after 3 replacements in a row the wait is 5 * 2**3 = 40 s
    d = decide(request(2, replacements=3), [member("req-0"), due], limits=limits)
    assert d.delete == ()
    assert d.recheck_after == pytest.approx(35)
    capped = decide(request(2, replacements=20), [member("req-0"), due], limits=limits)
    assert capped.recheck_after == pytest.approx(295)
    # a Failed member never seen failing before counts from now
    unseen = rq.Member("req-1", "n1", "gpu", A100, state="Failed", reason="DeviceFailed")
    assert decide(request(2), [member("req-0"), unseen], limits=limits).delete == ()


# --- status writes ------------------------------------------------------------------------------


def test_status_patch_removes_members_that_are_gone() -> None:
    old = {"state": "Running", "error": "", "resources": {"a": {"state": "Online"}}, "x": 1}
    new = {"state": "Updating", "error": "", "resources": {"b": {"state": "Attaching"}}}
    assert rq.status_patch(old, new) == {
        "state": "Updating",
        "resources": {"b": {"state": "Attaching"}, "a": None},
        "x": None,
    }
    assert rq.status_patch(new, new) == {}


def test_a_refused_create_is_reported_on_the_request() -> None:
    d = decide(request(2))
    assert d.status is not None
    status, note = rq.create_failed(request(2), d.status, {"req-1"}, "422 no", NOW)
    assert set(status["resources"]) == {"req-0"}
    assert status["state"] == "Failed"
    assert status["error"] == "422 no"
    degraded = next(c for c in status["conditions"] if c["type"] == rq.DEGRADED)
    assert (degraded["status"], degraded["reason"]) == ("True", rq.CREATE_FAILED)
    assert (note.reason, note.warning) == (rq.CREATE_FAILED, True)
