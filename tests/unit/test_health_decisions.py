"""`agent.model.health`, branch by branch: the sources' words, the unhealthy/recovering/healthy
steps with the grace, the taint, what a new leader recovers, and the swap decision."""

from __future__ import annotations

from typing import Any

import pytest

from agent.model import health as h
from agent.model import scaling as decide
from agent.model.claims import Binding
from agent.model.fabric import DeviceId, DeviceState, FabricId, PoolDevice
from agent.model.objects import DEVICE_HEALTHY, Obj

NODE, FABRIC = h.Source.NODE, h.Source.FABRIC


def resource(*conditions: dict[str, Any], state: str = "Online", deleting: bool = False) -> Obj:
    meta: dict[str, Any] = {"name": "gpu-x"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"state": state, "conditions": list(conditions)}}


def cond(status: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": DEVICE_HEALTHY, "status": status, "reason": reason, "message": message}


def dev(health: str = "OK", reason: str = "") -> PoolDevice:
    return PoolDevice(
        DeviceId("gpu-0"),
        FabricId("f"),
        "A100",
        DeviceState.FREE,
        health=health,
        health_reason=reason,
    )


def test_node_word_reads_the_condition() -> None:
    assert h.node_word(None) is None
    assert h.node_word(resource()) is None  # never reported
    assert h.node_word(resource(cond("Unknown"))) is None  # no word: an earlier one stands
    assert h.node_word(resource(cond("True"))) == h.Word(True)
    assert h.node_word(resource(cond("False", "Xid79", "fell off the bus"))) == h.Word(
        False, "Xid79", "fell off the bus"
    )
    assert h.node_word(resource(cond("False"))) == h.Word(False, "Unhealthy", "")
    # a reason that is no label value is made one (it becomes the taint's value)
    word = h.node_word(resource(cond("False", "Xid 79 / bus")))
    assert word is not None
    assert word.reason != "Xid 79 / bus"
    assert len(word.reason) <= 63


def test_fabric_word_only_critical_is_unhealthy() -> None:
    assert h.fabric_word(None) is None
    assert h.fabric_word(dev()) == h.Word(True)
    assert h.fabric_word(dev("Warning", "needs attention")) == h.Word(True)
    assert h.fabric_word(dev("Critical", "link down")) == h.Word(
        False, "FabricCritical", "link down"
    )
    assert h.fabric_word(dev("Critical")) == h.Word(
        False, "FabricCritical", "the fabric says Critical"
    )


def test_step_unhealthy_recovering_healthy() -> None:
    sick = h.Word(False, "Xid79", "m")
    first = h.step(None, {NODE: sick}, now=10.0, wall=1000.0, grace=5.0)
    assert first == h.Health(NODE, "Xid79", "m", added=1000.0)
    assert h.step(None, {NODE: h.Word(True), FABRIC: None}, now=0, wall=0, grace=5) is None
    # still unhealthy: the first time is kept
    again = h.step(first, {NODE: sick}, now=20.0, wall=2000.0, grace=5.0)
    assert again == first
    # clear: recovering from now on, the taint kept for the grace
    rec = h.step(first, {NODE: h.Word(True)}, now=30.0, wall=3000.0, grace=5.0)
    assert rec is not None
    assert rec.recovering
    assert rec.clear_since == 30.0
    assert h.lifts_in(rec, now=32.0, grace=5.0) == 3.0
    assert h.step(rec, {NODE: h.Word(True)}, now=34.9, wall=0, grace=5.0) == rec
    assert h.step(rec, {NODE: h.Word(True)}, now=35.0, wall=0, grace=5.0) is None
    # sick again within the grace: unhealthy, same timeAdded
    back = h.step(rec, {FABRIC: h.Word(False, "FabricCritical", "x")}, now=33.0, wall=9, grace=5)
    assert back == h.Health(FABRIC, "FabricCritical", "x", added=1000.0)
    assert h.lifts_in(back, now=33.0, grace=5.0) is None


def test_step_node_word_first_and_any_source_keeps_it_unhealthy() -> None:
    both = {NODE: h.Word(False, "Xid79"), FABRIC: h.Word(False, "FabricCritical")}
    got = h.step(None, both, now=0, wall=0, grace=1)
    assert got is not None
    assert got.source == NODE
    fabric_only = h.step(got, {NODE: h.Word(True), FABRIC: h.Word(False, "FabricCritical")},
                         now=1, wall=1, grace=1)  # fmt: skip
    assert fabric_only is not None
    assert fabric_only.source == FABRIC
    assert not fabric_only.recovering


def test_zero_grace_lifts_at_once() -> None:
    first = h.step(None, {FABRIC: h.Word(False, "FabricCritical")}, now=0, wall=0, grace=0)
    assert h.step(first, {FABRIC: h.Word(True)}, now=1, wall=1, grace=0) is None


@pytest.mark.parametrize(
    ("source", "evict", "effect"),
    [
        (NODE, False, "NoSchedule"),
        (NODE, True, "NoExecute"),
        (FABRIC, True, "NoSchedule"),
        (FABRIC, False, "NoSchedule"),
    ],
)
def test_taint(source: h.Source, evict: bool, effect: str) -> None:
    health = h.Health(source, "Xid79", "m", added=1767225600.7)
    assert h.taints(health, evict=evict) == [
        {
            "key": "cohdi.io/unhealthy",
            "value": "Xid79",
            "effect": effect,
            "timeAdded": "2026-01-01T00:00:00Z",
        }
    ]
    assert h.taints(None, evict=evict) == []


def test_recovered_word_only_for_node_taints_of_ours() -> None:
    assert h.recovered_word({"key": "cohdi.io/unhealthy", "value": "Xid79"}) == h.Word(
        False, "Xid79", "recovered from the ResourceSlice's taint"
    )
    assert h.recovered_word({"key": "cohdi.io/unhealthy", "value": "FabricCritical"}) is None
    assert h.recovered_word({"key": "example.com/other", "value": "Xid79"}) is None


def test_decide_swap() -> None:
    online = resource()
    assert h.decide_swap(False, resource=online, held=False) == h.SwapStep.NONE
    assert h.decide_swap(True, resource=None, held=False) == h.SwapStep.NONE  # free: tainted only
    assert h.decide_swap(True, resource=resource(state="Attaching"), held=True) == h.SwapStep.NONE
    assert h.decide_swap(True, resource=resource(deleting=True), held=False) == h.SwapStep.NONE
    assert h.decide_swap(True, resource=online, held=True) == h.SwapStep.WAIT
    assert h.decide_swap(True, resource=online, held=False) == h.SwapStep.DETACH


def test_decide_bind_fails_a_waiting_claim_on_an_unhealthy_device() -> None:
    b = Binding(
        namespace="ns",
        claim="c",
        uid="u",
        pool="p",
        device="gpu-0",
        node="n",
        ready=False,
        failed=False,
        allocated_at=100.0,
    )
    ours = resource(state="Attaching")
    ours["metadata"]["annotations"] = {"cohdi.io/claim": "ns/c"}
    ours["spec"] = {"target_node": "n"}
    d = decide.decide_bind(
        b,
        device="gpu-0",
        inventory_known=True,
        resource=ours,
        room_on_node=True,
        now=101.0,
        deadline=480.0,
        unhealthy="Xid79",
    )
    assert d.step == decide.BindStep.FAIL
    assert d.reason == "DeviceUnhealthy"
    assert d.delete_resource
    healthy = decide.decide_bind(
        b,
        device="gpu-0",
        inventory_known=True,
        resource=ours,
        room_on_node=True,
        now=101.0,
        deadline=480.0,
    )
    assert healthy.step == decide.BindStep.WAIT


def test_a_pool_with_a_tainted_device_has_at_most_64_devices_a_slice() -> None:
    from agent.model import pool
    from agent.model.fabric import Inventory, Machine, MachineId

    f = FabricId("f")
    inv = Inventory(
        (Machine(MachineId("m0"), "n0", f, "n0"),),
        tuple(
            PoolDevice(DeviceId(f"gpu-{i:03d}"), f, "A100", DeviceState.FREE) for i in range(130)
        ),
    )
    plain = pool.desired_slices(driver="d.example.com", inventory=inv, node_of_machine={})
    assert [len(s.spec["devices"]) for s in plain["f"]] == [128, 2]
    sick = h.taints(h.Health(NODE, "Xid79", "", added=0), evict=False)
    tainted = pool.desired_slices(
        driver="d.example.com", inventory=inv, node_of_machine={}, taints={"gpu-007": sick}
    )
    assert [len(s.spec["devices"]) for s in tainted["f"]] == [64, 64, 2]
    entry = next(d for s in tainted["f"] for d in s.spec["devices"] if d["name"] == "gpu-007")
    assert entry["taints"] == sick
    assert sum("taints" in d for s in tainted["f"] for d in s.spec["devices"]) == 1
