"""The scaler's decisions (`agent.model.scaling`), one situation per test: scale-up of a claim
waiting for its binding conditions, claims stranded on a device that went away, scale-down of idle
devices, and the per-node limits. Pure functions: no clock, no server."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

from agent.model import claims as claimmodel
from agent.model import scaling
from agent.model.fabric import (
    DeviceId,
    DeviceState,
    FabricId,
    Inventory,
    Machine,
    MachineId,
    PoolDevice,
)
from agent.model.objects import CLAIM_ANNOTATION, NODE_READY, Obj
from agent.model.pool import FAILED, FULL_LABEL, READY
from agent.model.scaling import BindStep, IdleStep, Stranded

DRIVER = "gpu.cohdi.io"
POOL = "fabric-1"
FABRIC = FabricId("fabric-1")
#: allocationTimestamp of the claims below, and the same instant in epoch seconds
ALLOCATED = "2025-05-01T12:00:00Z"
T0 = dt.datetime(2025, 5, 1, 12, 0, 0, tzinfo=dt.UTC).timestamp()
DEADLINE = 120.0  # --claim-deadline
GRACE = 300.0  # --scale-down-grace


# --- builders ------------------------------------------------------------------------------------


def result(device: str, *, pool: str = POOL, driver: str = DRIVER, binding: bool = True) -> Obj:
    """One `status.allocation.devices.results[]` entry; `binding=False`: a device usable at once
    (attached when allocated), so the scheduler set no binding conditions."""
    r: Obj = {"request": "gpu", "driver": driver, "pool": pool, "device": device}
    if binding:
        r["bindingConditions"] = [READY]
        r["bindingFailureConditions"] = [FAILED]
    return r


def claim(
    *results: Obj,
    node: str | None = "node-a",
    name: str = "train",
    namespace: str = "ml",
    ready: tuple[str, ...] = (),
    failed: tuple[str, ...] = (),
    allocated: str | None = ALLOCATED,
) -> Obj:
    """A ResourceClaim allocated to `results` on `node` (bindsToNode: matchFields metadata.name),
    with FabricDeviceReady / FabricDeviceFailed set for the device names in `ready` / `failed`."""
    allocation: Obj = {"devices": {"results": list(results), "config": []}}
    if node is not None:
        allocation["nodeSelector"] = {
            "nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
            ]
        }
    if allocated is not None:
        allocation["allocationTimestamp"] = allocated
    devices = []
    for r in results:
        conditions = [
            {"type": ctype, "status": "True", "reason": "Test", "message": ""}
            for ctype, names in ((READY, ready), (FAILED, failed))
            if r["device"] in names
        ]
        if conditions:
            devices.append(
                {
                    "driver": r["driver"],
                    "pool": r["pool"],
                    "device": r["device"],
                    "conditions": conditions,
                }
            )
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}"},
        "spec": {"devices": {"requests": [{"name": "gpu"}]}},
        "status": {"allocation": allocation, "devices": devices},
    }


def binding(c: Obj) -> claimmodel.Binding:
    (b,) = claimmodel.bindings(c, DRIVER)
    return b


def resource(
    device: str,
    *,
    node: str = "node-a",
    state: str = "",
    made_for: str | None = "ml/train",
    node_ready: bool = False,
    deleting: bool = False,
    reason: str | None = None,
    message: str | None = None,
    labels: dict[str, str] | None = None,
) -> Obj:
    """A claim-made ComposableResource for `device` (named `gpu-<device>`), annotated with the claim
    it was made for (`made_for=None`: a hand-written one, no annotation)."""
    meta: Obj = {
        "name": f"gpu-{device}",
        "uid": f"uid-gpu-{device}",
        "creationTimestamp": ALLOCATED,
        "finalizers": ["cohdi.io/detach"],
        "labels": labels or {},
    }
    if made_for is not None:
        meta["annotations"] = {CLAIM_ANNOTATION: made_for}
    if deleting:
        meta["deletionTimestamp"] = "2025-05-01T12:00:30Z"
    status: Obj = {"state": state, "cdi_device_id": device if state else ""}
    if node_ready:
        status["conditions"] = [{"type": NODE_READY, "status": "True", "reason": "Seen"}]
    if reason is not None:
        status["reason"] = reason
    if message is not None:
        status["message"] = message
    return {
        "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
        "kind": "ComposableResource",
        "metadata": meta,
        "spec": {"type": "gpu", "model": "A100", "target_node": node, "fabric_device": device},
        "status": status,
    }


def decide(
    b: claimmodel.Binding,
    *,
    device: str | None = "GPU-1",
    inventory_known: bool = True,
    resource: Obj | None = None,
    room_on_node: bool = True,
    after_allocation: float = 10.0,
) -> scaling.BindDecision:
    """`decide_bind` at `after_allocation` seconds after the claim's allocationTimestamp."""
    return scaling.decide_bind(
        b,
        device=device,
        inventory_known=inventory_known,
        resource=resource,
        room_on_node=room_on_node,
        now=T0 + after_allocation,
        deadline=DEADLINE,
    )


def pool_device(
    device: str, state: DeviceState = DeviceState.FREE, machine: str | None = None
) -> PoolDevice:
    return PoolDevice(
        DeviceId(device),
        FABRIC,
        "A100",
        state,
        machine=MachineId(machine) if machine else None,
    )


def inventory(*devices: PoolDevice) -> Inventory:
    return Inventory(
        (
            Machine(MachineId("m-a"), "server-a", FABRIC, "node-a"),
            Machine(MachineId("m-b"), "server-b", FABRIC, "node-b"),
        ),
        devices,
    )


def node(labels: dict[str, str] | None) -> Obj:
    meta: Obj = {"name": "node-a"}
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "Node", "metadata": meta}


# --- scale up: decide_bind -----------------------------------------------------------------------


def test_bind_waits_for_the_first_fabric_read_before_judging_an_unknown_device() -> None:
    d = decide(binding(claim(result("gpu-1"))), device=None, inventory_known=False)
    assert d == scaling.BindDecision(BindStep.WAIT, after=scaling.RECHECK)


def test_bind_fails_unknown_device_once_the_fabric_was_read() -> None:
    d = decide(binding(claim(result("gpu-1"))), device=None, inventory_known=True)
    assert d.step == BindStep.FAIL
    assert d.reason == "UnknownDevice"
    assert d.message == "device fabric-1/gpu-1 is not in the fabric's inventory any more"
    assert d.delete_resource is False


def test_bind_creates_the_resource_when_none_exists_and_the_node_has_room() -> None:
    d = decide(binding(claim(result("gpu-1"))), after_allocation=20.0)
    # after: look again at the deadline
    assert d == scaling.BindDecision(BindStep.CREATE, after=DEADLINE - 20.0)


def test_bind_fails_when_the_node_is_at_its_device_maximum() -> None:
    d = decide(binding(claim(result("gpu-1"))), room_on_node=False)
    assert d.step == BindStep.FAIL
    assert d.reason == "NodeDeviceLimit"
    assert d.message == "node node-a is at its device maximum"
    assert d.delete_resource is False


def test_bind_waits_until_the_deadline_while_the_fabric_attaches() -> None:
    d = decide(
        binding(claim(result("gpu-1"))),
        resource=resource("GPU-1", state="Attaching"),
        after_allocation=30.0,
    )
    assert d == scaling.BindDecision(BindStep.WAIT, after=DEADLINE - 30.0)


def test_bind_waits_for_node_ready_after_the_fabric_attached() -> None:
    d = decide(
        binding(claim(result("gpu-1"))),
        resource=resource("GPU-1", state="Online", node_ready=False),
        after_allocation=30.0,
    )
    assert d == scaling.BindDecision(BindStep.WAIT, after=DEADLINE - 30.0)


def test_bind_is_ready_once_the_device_is_online_and_the_node_saw_it() -> None:
    d = decide(
        binding(claim(result("gpu-1"))),
        resource=resource("GPU-1", state="Online", node_ready=True),
    )
    assert d == scaling.BindDecision(BindStep.READY)


def test_bind_is_ready_on_a_device_attached_there_for_an_earlier_claim() -> None:
    d = decide(
        binding(claim(result("gpu-1"))),
        resource=resource("GPU-1", state="Online", node_ready=True, made_for="ml/earlier"),
    )
    assert d == scaling.BindDecision(BindStep.READY)


def test_bind_is_ready_even_past_the_deadline_when_the_device_made_it() -> None:
    d = decide(
        binding(claim(result("gpu-1"))),
        resource=resource("GPU-1", state="Online", node_ready=True),
        after_allocation=DEADLINE + 5,
    )
    assert d == scaling.BindDecision(BindStep.READY)


def test_bind_rechecks_soon_while_the_devices_resource_is_being_deleted() -> None:
    d = decide(
        binding(claim(result("gpu-1"))),
        resource=resource("GPU-1", state="Online", node_ready=True, deleting=True),
        after_allocation=30.0,
    )
    # not READY: the device is on its way out; look again soon, it may be re-created then
    assert d == scaling.BindDecision(BindStep.WAIT, after=scaling.RECHECK)


def test_bind_recheck_of_a_deleting_resource_never_overshoots_the_deadline() -> None:
    d = decide(
        binding(claim(result("gpu-1"))),
        resource=resource("GPU-1", state="Detaching", deleting=True),
        after_allocation=DEADLINE - 0.05,
    )
    assert d.step == BindStep.WAIT
    assert d.after == pytest.approx(0.05)


def test_bind_past_the_deadline_behind_a_deleting_resource_fails_without_deleting_it() -> None:
    d = decide(
        binding(claim(result("gpu-1"))),
        resource=resource("GPU-1", state="Detaching", deleting=True),  # made for this claim
        after_allocation=DEADLINE + 1,
    )
    assert d.step == BindStep.FAIL
    assert d.reason == "AttachDeadline"
    assert d.message == "GPU-1 was not ready on node-a within 120 s of allocation"
    assert d.delete_resource is False  # it is being deleted already


@pytest.mark.parametrize("made_for", ["ml/train", "ml/other", None])
def test_bind_fails_when_the_device_is_composed_to_another_node(made_for: str | None) -> None:
    d = decide(
        binding(claim(result("gpu-1"), node="node-a")),
        resource=resource("GPU-1", node="node-b", state="Online", made_for=made_for),
    )
    assert d.step == BindStep.FAIL
    assert d.reason == "DeviceOnOtherNode"
    assert d.message == "GPU-1 is composed to node-b, not node-a"
    assert d.delete_resource is False  # it serves node-b: never ours to delete


def test_bind_fails_with_the_resources_reason_and_deletes_the_resource_made_for_it() -> None:
    d = decide(
        binding(claim(result("gpu-1"))),
        resource=resource(
            "GPU-1", state="Failed", reason="DeviceBusy", message="GPU-1 is attached to m-b"
        ),
    )
    assert d == scaling.BindDecision(
        BindStep.FAIL,
        reason="DeviceBusy",
        message="GPU-1 is attached to m-b",
        delete_resource=True,
    )


def test_bind_fails_on_a_failed_resource_without_a_reason_with_generic_words() -> None:
    d = decide(binding(claim(result("gpu-1"))), resource=resource("GPU-1", state="Failed"))
    assert d.step == BindStep.FAIL
    assert d.reason == "AttachFailed"
    assert d.message == "the fabric could not attach the device"
    assert d.delete_resource is True


def test_bind_fails_on_its_own_refused_resource_and_deletes_it() -> None:
    # Deleting a refused resource never touches the fabric (composing.decide_remove drops it).
    d = decide(
        binding(claim(result("gpu-1"))),
        resource=resource("GPU-1", state="Failed", reason="DeviceOwned", message="owned"),
    )
    assert (d.step, d.reason, d.delete_resource) == (BindStep.FAIL, "DeviceOwned", True)


def test_bind_fails_at_the_deadline_and_deletes_the_half_attached_resource_made_for_it() -> None:
    d = decide(
        binding(claim(result("gpu-1"))),
        resource=resource("GPU-1", state="Attaching"),
        after_allocation=DEADLINE,  # remaining == 0: the deadline has come
    )
    assert d == scaling.BindDecision(
        BindStep.FAIL,
        reason="AttachDeadline",
        message="GPU-1 was not ready on node-a within 120 s of allocation",
        delete_resource=True,
    )


def test_bind_fails_at_the_deadline_without_a_resource() -> None:
    d = decide(binding(claim(result("gpu-1"))), after_allocation=DEADLINE + 1)
    assert (d.step, d.reason, d.delete_resource) == (BindStep.FAIL, "AttachDeadline", False)


def test_bind_counts_the_whole_deadline_when_the_claim_has_no_allocation_timestamp() -> None:
    b = binding(claim(result("gpu-1"), allocated=None))
    assert b.allocated_at == 0.0
    d = decide(b, after_allocation=10 * DEADLINE)
    assert d == scaling.BindDecision(BindStep.CREATE, after=DEADLINE)


@pytest.mark.parametrize(
    ("res", "after_allocation"),
    [
        (resource("GPU-1", state="Failed", made_for="ml/other"), 10.0),
        (resource("GPU-1", state="Failed", made_for=None), 10.0),
        (resource("GPU-1", state="Attaching", made_for="ml/other"), DEADLINE + 1),
        (resource("GPU-1", state="Online", made_for=None), DEADLINE + 1),
        (resource("GPU-1", state="Online", made_for="other/train"), DEADLINE + 1),
        (resource("GPU-1", state="Online", made_for="ml/other", deleting=True), DEADLINE + 1),
        (resource("GPU-1", node="node-b", state="Online", made_for="ml/other"), 10.0),
    ],
    ids=[
        "failed-other-claim",
        "failed-hand-written",
        "deadline-other-claim",
        "deadline-hand-written",
        "deadline-same-name-other-namespace",
        "deadline-deleting",
        "other-node",
    ],
)
def test_a_failed_claim_never_deletes_a_resource_made_for_another_claim(
    res: Obj, after_allocation: float
) -> None:
    d = decide(binding(claim(result("gpu-1"))), resource=res, after_allocation=after_allocation)
    assert d.step == BindStep.FAIL
    assert d.delete_resource is False


def test_only_a_fail_decision_ever_asks_to_delete_a_resource() -> None:
    states = ["", "Attaching", "Online", "Failed", "Detaching"]
    for st, ready, deleting, owner, room, when in itertools.product(
        states,
        (False, True),
        (False, True),
        ("ml/train", "ml/other", None),
        (False, True),
        (10.0, DEADLINE + 1),
    ):
        res = resource("GPU-1", state=st, node_ready=ready, deleting=deleting, made_for=owner)
        d = decide(
            binding(claim(result("gpu-1"))),
            resource=res,
            room_on_node=room,
            after_allocation=when,
        )
        if d.delete_resource:
            assert d.step == BindStep.FAIL
            assert owner == "ml/train"
            assert not deleting


def test_claim_ref_and_made_for_read_the_claim_annotation() -> None:
    b = binding(claim(result("gpu-1"), namespace="ml", name="train"))
    assert scaling.claim_ref(b) == "ml/train"
    assert scaling.made_for(resource("GPU-1", made_for="ml/train"), "ml/train")
    assert not scaling.made_for(resource("GPU-1", made_for="ml/other"), "ml/train")
    assert not scaling.made_for(resource("GPU-1", made_for=None), "ml/train")
    hand_written = resource("GPU-1", made_for=None)
    hand_written["metadata"]["annotations"] = None
    assert not scaling.made_for(hand_written, "ml/train")


# --- claims holding a device that is not on their node: stranded ---------------------------------


def find(
    c: Obj,
    inv: Inventory,
    *,
    resources: dict[str, Obj] | None = None,
    device_of: dict[tuple[str, str], str] | None = None,
) -> list[Stranded]:
    return scaling.stranded(
        c,
        driver=DRIVER,
        device_of=(
            device_of
            if device_of is not None
            else {(POOL, "gpu-1"): "GPU-1", (POOL, "gpu-2"): "GPU-2", (POOL, "gpu-3"): "GPU-3"}
        ),
        inventory=inv,
        machine_of_node={"node-a": "m-a", "node-b": "m-b"},
        resources=resources or {},
    )


def test_a_ready_claim_whose_device_was_detached_is_stranded() -> None:
    c = claim(result("gpu-1"), ready=("gpu-1",))
    assert find(c, inventory(pool_device("GPU-1"))) == [Stranded("GPU-1", "node-a", False)]


def test_a_claim_on_a_device_usable_at_once_that_is_detached_is_stranded() -> None:
    c = claim(result("gpu-1", binding=False))
    free = inventory(pool_device("GPU-1", DeviceState.FREE))
    assert find(c, free) == [Stranded("GPU-1", "node-a", False)]


def test_a_claim_on_a_device_attached_to_its_node_is_not_stranded() -> None:
    c = claim(result("gpu-1", binding=False))
    assert find(c, inventory(pool_device("GPU-1", DeviceState.ATTACHED, "m-a"))) == []


@pytest.mark.parametrize("fabric_state", [DeviceState.ATTACHED, DeviceState.ATTACHING])
def test_a_claim_on_a_device_the_fabric_gave_another_machine_is_stranded_elsewhere(
    fabric_state: DeviceState,
) -> None:
    c = claim(result("gpu-1", binding=False), node="node-a")
    inv = inventory(pool_device("GPU-1", fabric_state, "m-b"))
    assert find(c, inv) == [Stranded("GPU-1", "node-a", True)]


def test_a_device_detaching_from_another_machine_can_be_attached_again() -> None:
    c = claim(result("gpu-1", binding=False), node="node-a")
    inv = inventory(pool_device("GPU-1", DeviceState.DETACHING, "m-b"))
    assert find(c, inv) == [Stranded("GPU-1", "node-a", False)]


def test_a_failed_fabric_device_held_by_a_claim_is_stranded_not_elsewhere() -> None:
    c = claim(result("gpu-1"), ready=("gpu-1",))
    inv = inventory(pool_device("GPU-1", DeviceState.FAILED))
    assert find(c, inv) == [Stranded("GPU-1", "node-a", False)]


def test_a_device_attaching_to_its_node_without_a_resource_is_stranded() -> None:
    # No resource brings it there (it was deleted mid-attach): the scaler creates one again,
    # and the composer's attach finds the fabric already at work for that machine.
    c = claim(result("gpu-1"), ready=("gpu-1",))
    inv = inventory(pool_device("GPU-1", DeviceState.ATTACHING, "m-a"))
    assert find(c, inv) == [Stranded("GPU-1", "node-a", False)]


def test_a_claim_on_a_node_not_wired_to_the_fabric_sees_every_attachment_as_elsewhere() -> None:
    c = claim(result("gpu-1", binding=False), result("gpu-2", binding=False), node="node-z")
    inv = inventory(
        pool_device("GPU-1", DeviceState.ATTACHED, "m-a"), pool_device("GPU-2", DeviceState.FREE)
    )
    assert find(c, inv) == [
        Stranded("GPU-1", "node-z", True),
        Stranded("GPU-2", "node-z", False),
    ]


def test_a_claim_still_in_the_scale_up_flow_is_left_to_decide_bind() -> None:
    waiting = claim(result("gpu-1"))  # no condition yet
    failed = claim(result("gpu-1"), failed=("gpu-1",))
    both = claim(result("gpu-1"), ready=("gpu-1",), failed=("gpu-1",))
    inv = inventory(pool_device("GPU-1"))
    assert find(waiting, inv) == []
    assert find(failed, inv) == []
    assert find(both, inv) == []


def test_a_device_with_a_live_or_deleting_resource_is_not_stranded_yet() -> None:
    c = claim(result("gpu-1"), ready=("gpu-1",))
    inv = inventory(pool_device("GPU-1"))
    attaching = {"GPU-1": resource("GPU-1", state="Attaching")}
    detaching = {"GPU-1": resource("GPU-1", state="Detaching", deleting=True)}
    assert find(c, inv, resources=attaching) == []
    assert find(c, inv, resources=detaching) == []


def test_devices_unknown_to_the_slices_or_the_fabric_are_not_stranded() -> None:
    c = claim(result("gpu-1", binding=False), result("gpu-2", binding=False))
    # gpu-1: no fabric device behind the slice name any more; GPU-2: not in the inventory
    inv = inventory(pool_device("GPU-3"))
    assert find(c, inv, device_of={(POOL, "gpu-2"): "GPU-2"}) == []


def test_other_drivers_devices_are_not_ours_to_strand() -> None:
    c = claim(result("gpu-1", driver="gpu.nvidia.com", binding=False))
    assert find(c, inventory(pool_device("GPU-1"))) == []


def test_unallocated_or_unpinned_claims_strand_nothing() -> None:
    inv = inventory(pool_device("GPU-1"))
    unallocated = claim(result("gpu-1", binding=False))
    unallocated["status"] = {}
    no_status = claim(result("gpu-1", binding=False))
    del no_status["status"]
    no_node = claim(result("gpu-1", binding=False), node=None)
    assert find(unallocated, inv) == []
    assert find(no_status, inv) == []
    assert find(no_node, inv) == []


def test_stranded_devices_come_in_a_stable_order() -> None:
    c = claim(
        result("gpu-3", binding=False),
        result("gpu-1", binding=False),
        result("gpu-2", binding=False),
    )
    inv = inventory(pool_device("GPU-1"), pool_device("GPU-2"), pool_device("GPU-3"))
    assert [s.device for s in find(c, inv)] == ["GPU-1", "GPU-2", "GPU-3"]


# --- scale down: decide_idle, held_devices -------------------------------------------------------


def idle(
    res: Obj | None,
    *,
    held: bool = False,
    request_owned: bool = False,
    idle_since: float | None = 0.0,
    now: float = 1000.0,
    on_node: int = 2,
    floor: int = 0,
) -> scaling.IdleDecision:
    return scaling.decide_idle(
        res,
        held=held,
        request_owned=request_owned,
        idle_since=idle_since,
        now=now,
        grace=GRACE,
        on_node=on_node,
        floor=floor,
    )


ONLINE = resource("GPU-1", state="Online", node_ready=True)


def test_scale_down_drains_an_online_device_idle_past_the_grace() -> None:
    assert idle(ONLINE, idle_since=0.0, now=1000.0) == scaling.IdleDecision(
        IdleStep.DRAIN, idle_for=1000.0
    )


def test_scale_down_drains_at_exactly_the_grace() -> None:
    assert idle(ONLINE, idle_since=700.0, now=1000.0).step == IdleStep.DRAIN


def test_scale_down_looks_again_when_the_grace_is_not_over() -> None:
    assert idle(ONLINE, idle_since=900.0, now=1000.0) == scaling.IdleDecision(
        IdleStep.LATER, after=GRACE - 100.0, idle_for=100.0
    )


def test_a_device_never_held_since_the_leader_started_counts_as_idle_for_the_grace() -> None:
    assert idle(ONLINE, idle_since=None) == scaling.IdleDecision(IdleStep.DRAIN, idle_for=GRACE)


def test_scale_down_keeps_a_device_held_by_a_claim() -> None:
    d = idle(ONLINE, held=True, idle_since=None)
    assert d == scaling.IdleDecision(IdleStep.KEEP, why="held by a claim")


def test_scale_down_keeps_a_device_a_composability_request_owns() -> None:
    d = idle(ONLINE, request_owned=True, idle_since=None)
    assert d == scaling.IdleDecision(IdleStep.KEEP, why="kept by a ComposabilityRequest")


def test_scale_down_keeps_the_last_devices_of_a_node_at_its_min_floor() -> None:
    d = idle(ONLINE, idle_since=0.0, now=1000.0, on_node=2, floor=2)
    assert d == scaling.IdleDecision(IdleStep.KEEP, idle_for=1000.0, why="node at its minimum 2")
    assert idle(ONLINE, idle_since=0.0, now=1000.0, on_node=3, floor=2).step == IdleStep.DRAIN


@pytest.mark.parametrize(
    "res",
    [
        None,
        resource("GPU-1", state="Online", node_ready=True, deleting=True),
        resource("GPU-1", state="Attaching"),
        resource("GPU-1", state=""),
        resource("GPU-1", state="Failed", reason="DeviceBusy"),
    ],
    ids=["gone", "deleting", "attaching", "new", "failed"],
)
def test_scale_down_keeps_what_is_not_an_online_resource(res: Obj | None) -> None:
    assert idle(res, idle_since=None) == scaling.IdleDecision(
        IdleStep.KEEP, why="not an online resource"
    )


def test_a_device_held_by_any_claim_is_never_drained() -> None:
    for request_owned, since, now, on_node, floor in itertools.product(
        (False, True), (None, 0.0, 999.0), (1000.0, 1e9), (0, 1, 5), (0, 1)
    ):
        d = idle(
            ONLINE,
            held=True,
            request_owned=request_owned,
            idle_since=since,
            now=now,
            on_node=on_node,
            floor=floor,
        )
        assert d.step == IdleStep.KEEP


def test_held_devices_are_the_fabric_devices_of_our_allocations() -> None:
    claims = [
        claim(result("gpu-1"), name="a"),  # conditions not met yet: held all the same
        claim(result("gpu-2", binding=False), result("gpu-x"), name="b"),  # gpu-x: not indexed
        claim(result("gpu-3", driver="gpu.nvidia.com"), name="c"),  # another driver's
        claim(result("gpu-4"), name="d"),  # indexed to "" (no device): ignored
    ]
    unallocated = claim(result("gpu-5"), name="e")
    unallocated["status"] = {}
    device_of = {
        (POOL, "gpu-1"): "GPU-1",
        (POOL, "gpu-2"): "GPU-2",
        (POOL, "gpu-3"): "GPU-3",
        (POOL, "gpu-4"): "",
        (POOL, "gpu-5"): "GPU-5",
    }
    assert scaling.held_devices([*claims, unallocated], DRIVER, device_of) == {"GPU-1", "GPU-2"}
    assert scaling.held_devices([], DRIVER, device_of) == set()


# --- limits: node_limit, full_label --------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (None, None),
        ({}, None),
        ({scaling.MAX_LABEL: "4"}, 4),
        ({scaling.MAX_LABEL: "0"}, 0),
        ({scaling.MAX_LABEL: "-1"}, None),
        ({scaling.MAX_LABEL: "four"}, None),
        ({scaling.MAX_LABEL: ""}, None),
        ({scaling.MIN_LABEL: "2"}, None),  # the other label
    ],
)
def test_node_max_devices_label(labels: dict[str, str] | None, expected: int | None) -> None:
    assert scaling.node_limit(node(labels), scaling.MAX_LABEL) == expected


def test_node_limits_of_a_missing_node_are_unset() -> None:
    assert scaling.node_limit(None, scaling.MIN_LABEL) is None
    assert scaling.node_limit({"metadata": None}, scaling.MIN_LABEL) is None
    assert scaling.node_limit(node({scaling.MIN_LABEL: "1"}), scaling.MIN_LABEL) == 1


def test_node_limits_with_null_labels_are_unset() -> None:
    n = node(None)
    n["metadata"]["labels"] = None
    assert scaling.node_limit(n, scaling.MAX_LABEL) is None


def full(labels: dict[str, str] | None, on_node: int) -> str | bool | None:
    return scaling.full_label(node(labels), on_node, FULL_LABEL)


def test_full_label_is_set_when_a_node_reaches_its_maximum() -> None:
    assert full({scaling.MAX_LABEL: "2"}, 2) == "true"
    assert full({scaling.MAX_LABEL: "2"}, 3) == "true"
    assert full({scaling.MAX_LABEL: "0"}, 0) == "true"


def test_full_label_is_removed_when_a_node_drops_below_its_maximum() -> None:
    assert full({scaling.MAX_LABEL: "2", FULL_LABEL: "true"}, 1) is None


def test_full_label_is_removed_when_the_maximum_is_unset_or_invalid() -> None:
    assert full({FULL_LABEL: "true"}, 10) is None
    assert full({scaling.MAX_LABEL: "lots", FULL_LABEL: "true"}, 10) is None


def test_full_label_is_left_alone_when_it_already_says_the_truth() -> None:
    assert full({scaling.MAX_LABEL: "2", FULL_LABEL: "true"}, 2) is False
    assert full({scaling.MAX_LABEL: "2"}, 1) is False
    assert full({}, 5) is False
    assert full(None, 5) is False  # a Node without labels


def test_full_label_of_a_missing_node_is_left_alone() -> None:
    assert scaling.full_label(None, 3, FULL_LABEL) is False


def test_full_label_takes_only_true_as_labelled() -> None:
    assert full({scaling.MAX_LABEL: "1", FULL_LABEL: "false"}, 1) == "true"
