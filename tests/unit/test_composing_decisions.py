"""The composer's decisions (`agent.model.composing`), one situation per test: who owns a device
(one owner per GPU), which free device a model-only resource gets, and what a resource being
deleted must wait for. Pure functions: no clock, no server, no fabric."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import pytest

from agent.model import composing
from agent.model.composing import OwnerCheck, RemoveStep
from agent.model.fabric import (
    DeviceId,
    DeviceState,
    FabricId,
    Inventory,
    Machine,
    MachineId,
    PoolDevice,
)
from agent.model.objects import CLAIM_ANNOTATION, NODE_READY, NODE_RELEASED, Obj

T0 = dt.datetime(2025, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
GRACE = 60.0  # --node-gone-grace


# --- builders ------------------------------------------------------------------------------------


def stamp(seconds: float) -> str:
    """A Kubernetes timestamp (RFC 3339, whole seconds) `seconds` after T0."""
    return (T0 + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def resource(
    name: str,
    *,
    device: str = "",
    chosen: str = "",
    node: str = "node-a",
    created: float = 0.0,
    state: str = "",
    reason: str | None = None,
    deleting: bool = False,
    node_ready: bool | None = None,
    node_released: bool | None = None,
    force_detach: bool = False,
    for_claim: str | None = None,
) -> Obj:
    """A ComposableResource created `created` seconds after T0. `device`: spec.fabric_device (a
    claim-made or hand-written resource); `chosen`: status.cdi_device_id (the device the composer
    chose for a model-only one, or recorded on attach). `node_ready` / `node_released`: the node
    role's conditions (None: not written)."""
    meta: Obj = {
        "name": name,
        "uid": f"uid-{name}",
        "creationTimestamp": stamp(created),
        "finalizers": ["cohdi.io/detach"],
        "resourceVersion": "7",
    }
    if for_claim is not None:
        meta["annotations"] = {CLAIM_ANNOTATION: for_claim}
    if deleting:
        meta["deletionTimestamp"] = stamp(created + 100)
    spec: Obj = {"type": "gpu", "model": "A100", "target_node": node}
    if device:
        spec["fabric_device"] = device
    if force_detach:
        spec["force_detach"] = True
    conditions = [
        {"type": ctype, "status": "True" if value else "False", "reason": "Test"}
        for ctype, value in ((NODE_READY, node_ready), (NODE_RELEASED, node_released))
        if value is not None
    ]
    status: Obj = {"state": state, "cdi_device_id": chosen, "conditions": conditions}
    if reason is not None:
        status["reason"] = reason
        status["message"] = status["error"] = f"{reason}: test"
    return {
        "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
        "kind": "ComposableResource",
        "metadata": meta,
        "spec": spec,
        "status": status,
    }


def refused_resource(name: str, device: str, **kw: Any) -> Obj:
    """A resource the composer refused: another resource owns `device`."""
    return resource(name, device=device, state="Failed", reason=composing.DEVICE_OWNED, **kw)


FAB1 = FabricId("fabric-1")
FAB2 = FabricId("fabric-2")


def pool_device(
    device: str,
    *,
    model: str = "A100",
    fabric: FabricId = FAB1,
    state: DeviceState = DeviceState.FREE,
    anonymous: bool = False,
) -> PoolDevice:
    return PoolDevice(DeviceId(device), fabric, model, state, anonymous=anonymous)


def inventory(*devices: PoolDevice) -> Inventory:
    return Inventory(
        (
            Machine(MachineId("m-a"), "server-a", FAB1, "node-a"),
            Machine(MachineId("m-z"), "server-z", FAB2, "node-z"),
        ),
        devices,
    )


def choose(
    inv: Inventory | None, taken: AbstractSet[str] = frozenset(), machine: str = "m-a"
) -> str | None:
    """`choose_device` for an A100 on `machine` (m-a: fabric-1, m-z: fabric-2)."""
    return composing.choose_device(inv, model="A100", machine=machine, taken=taken)


def count(
    inv: Inventory | None, taken: AbstractSet[str] = frozenset(), machine: str = "m-a"
) -> int:
    return composing.free_count(inv, model="A100", machine=machine, taken=taken)


def remove(
    obj: Obj,
    others: Sequence[Obj] = (),
    *,
    node_exists: bool = True,
    node_missing_since: float | None = None,
    now: float = 1000.0,
    deleting_for: float = 0.0,
) -> composing.RemoveDecision:
    return composing.decide_remove(
        obj,
        [obj, *others],
        node_exists=node_exists,
        node_missing_since=node_missing_since,
        now=now,
        node_gone_grace=GRACE,
        deleting_for=deleting_for,
    )


# --- refused, owner_of ---------------------------------------------------------------------------


def test_a_resource_failed_with_device_owned_is_refused() -> None:
    assert composing.refused(refused_resource("gpu-x-2", "GPU-X"))


@pytest.mark.parametrize(
    "obj",
    [
        resource("r", device="GPU-X", state="Failed", reason="DeviceBusy"),
        resource("r", device="GPU-X", state="Online", reason=composing.DEVICE_OWNED),
        resource("r", device="GPU-X", state="Failed"),
        resource("r", device="GPU-X"),
        {"metadata": {"name": "r"}, "spec": {}},  # no status at all
    ],
    ids=["failed-other-reason", "online", "failed-no-reason", "new", "no-status"],
)
def test_other_resources_are_not_refused(obj: Obj) -> None:
    assert not composing.refused(obj)


def test_the_owner_is_the_oldest_resource_naming_the_device() -> None:
    old = resource("zz-hand-written", device="GPU-X", created=0)
    new = resource("gpu-gpu-x", device="GPU-X", created=5)
    assert composing.owner_of("GPU-X", [new, old]) is old
    assert composing.owner_of("GPU-X", [old, new]) is old


def test_the_owner_among_resources_created_in_the_same_second_is_the_first_name() -> None:
    b = resource("b", device="GPU-X", created=0)
    a = resource("a", device="GPU-X", created=0)
    assert composing.owner_of("GPU-X", [b, a]) is a


def test_a_refused_resource_never_owns_even_when_older() -> None:
    refused = refused_resource("aa-old", "GPU-X", created=0)
    live = resource("gpu-gpu-x", device="GPU-X", created=30)
    assert composing.owner_of("GPU-X", [refused, live]) is live
    assert composing.owner_of("GPU-X", [refused]) is None


def test_a_resource_detaching_its_device_still_owns_it() -> None:
    detaching = resource("old", device="GPU-X", created=0, state="Detaching", deleting=True)
    newcomer = resource("new", device="GPU-X", created=30)
    assert composing.owner_of("GPU-X", [newcomer, detaching]) is detaching


def test_a_model_only_resource_owns_the_device_chosen_for_it() -> None:
    member = resource("train-0", chosen="GPU-X", created=0, state="Online")
    later = resource("gpu-gpu-x", device="GPU-X", created=10)
    assert composing.owner_of("GPU-X", [later, member]) is member


def test_nobody_owns_a_device_no_resource_names() -> None:
    assert composing.owner_of("GPU-X", [resource("r", device="GPU-Y")]) is None
    assert composing.owner_of("GPU-X", [resource("model-only-unchosen")]) is None
    assert composing.owner_of("GPU-X", []) is None


# --- check_owner ---------------------------------------------------------------------------------


def test_a_model_only_resource_that_chose_nothing_yet_may_attach() -> None:
    obj = resource("train-0")
    assert composing.check_owner(obj, [obj]) == (OwnerCheck.OWNER, None)


def test_the_only_resource_naming_a_device_owns_it() -> None:
    obj = resource("gpu-gpu-x", device="GPU-X")
    assert composing.check_owner(obj, [obj]) == (OwnerCheck.OWNER, None)
    # ... also before the informer has shown it to us
    assert composing.check_owner(obj, []) == (OwnerCheck.OWNER, None)


def test_the_oldest_of_two_resources_naming_a_device_owns_it() -> None:
    old = resource("zz-old", device="GPU-X", created=0)
    new = resource("aa-new", device="GPU-X", created=1)
    assert composing.check_owner(old, [old, new]) == (OwnerCheck.OWNER, None)


def test_second_resource_naming_an_owned_device_is_refused() -> None:
    owner = resource("gpu-gpu-x", device="GPU-X", created=0, state="Online", node_ready=True)
    second = resource("my-gpu", device="GPU-X", created=40, node="node-b")
    assert composing.check_owner(second, [owner, second]) == (OwnerCheck.REFUSE, owner)


def test_second_resource_naming_a_failed_owners_device_is_refused() -> None:
    # A failed (not refused) owner may have half-attached the device: it still owns it.
    owner = resource("gpu-gpu-x", device="GPU-X", created=0, state="Failed", reason="DeviceBusy")
    second = resource("my-gpu", device="GPU-X", created=40)
    assert composing.check_owner(second, [owner, second]) == (OwnerCheck.REFUSE, owner)


def test_a_model_only_choice_racing_an_older_resource_is_refused() -> None:
    owner = resource("gpu-gpu-x", device="GPU-X", created=0)
    member = resource("train-0", chosen="GPU-X", created=3)
    assert composing.check_owner(member, [owner, member]) == (OwnerCheck.REFUSE, owner)


def test_a_deleting_owner_makes_the_newcomer_wait() -> None:
    owner = resource("gpu-gpu-x", device="GPU-X", created=0, state="Detaching", deleting=True)
    newcomer = resource("my-gpu", device="GPU-X", created=40)
    assert composing.check_owner(newcomer, [owner, newcomer]) == (OwnerCheck.WAIT, owner)


def test_the_newcomer_owns_the_device_once_the_deleting_owner_is_gone() -> None:
    newcomer = resource("my-gpu", device="GPU-X", created=40)
    assert composing.check_owner(newcomer, [newcomer]) == (OwnerCheck.OWNER, None)


def test_an_older_refused_resource_does_not_block_the_owner() -> None:
    refused = refused_resource("aa-refused", "GPU-X", created=0)
    obj = resource("gpu-gpu-x", device="GPU-X", created=10)
    assert composing.check_owner(obj, [refused, obj]) == (OwnerCheck.OWNER, None)


# --- taken_devices -------------------------------------------------------------------------------


def test_taken_devices_are_those_named_by_live_or_detaching_resources_plus_also() -> None:
    resources = [
        resource("gpu-gpu-1", device="GPU-1", state="Online"),
        resource("train-0", chosen="GPU-2", state="Online"),
        resource("gpu-gpu-3", device="GPU-3", state="Detaching", deleting=True),
        resource("gpu-gpu-4", device="GPU-4", state="Failed", reason="DeviceBusy"),
        resource("train-1"),  # model-only, nothing chosen yet
        refused_resource("dup-gpu-5", "GPU-5"),  # refused: its device is its owner's business
    ]
    assert composing.taken_devices(resources) == {"GPU-1", "GPU-2", "GPU-3", "GPU-4"}
    assert composing.taken_devices(resources, also={"GPU-5", "GPU-9"}) == {
        "GPU-1",
        "GPU-2",
        "GPU-3",
        "GPU-4",
        "GPU-5",
        "GPU-9",
    }
    assert composing.taken_devices([]) == set()


# --- choose_device, free_count -------------------------------------------------------------------


def test_model_only_choice_takes_the_lowest_free_id_of_the_model_on_the_machines_fabric() -> None:
    inv = inventory(
        pool_device("GPU-3"),
        pool_device("GPU-1"),
        pool_device("GPU-2"),
    )
    assert choose(inv) == "GPU-1"
    assert choose(inv) == "GPU-1"  # deterministic


def test_model_only_choice_never_returns_a_taken_withheld_or_pinned_device() -> None:
    inv = inventory(pool_device("GPU-1"), pool_device("GPU-2"), pool_device("GPU-3"))
    # GPU-1 named by a live resource, GPU-2 pinned to a claim or withheld for scale-down
    assert choose(inv, taken={"GPU-1", "GPU-2"}) == "GPU-3"
    assert choose(inv, taken={"GPU-1", "GPU-2", "GPU-3"}) is None


def test_model_only_choice_skips_other_models_fabrics_and_busy_devices() -> None:
    inv = inventory(
        pool_device("GPU-0", model="H100"),
        pool_device("GPU-1", fabric=FAB2),
        pool_device("GPU-2", state=DeviceState.ATTACHED),
        pool_device("GPU-3", state=DeviceState.ATTACHING),
        pool_device("GPU-4", state=DeviceState.DETACHING),
        pool_device("GPU-5", state=DeviceState.FAILED),
        pool_device("GPU-6"),
    )
    assert choose(inv) == "GPU-6"
    assert count(inv) == 1


def test_model_only_choice_prefers_named_devices_over_anonymous_fti_slots() -> None:
    inv = inventory(
        pool_device("fabric-1.A100.free-0", anonymous=True),
        pool_device("zz-GPU-9"),
    )
    assert choose(inv) == "zz-GPU-9"


def test_model_only_choice_falls_back_to_an_anonymous_slot_of_the_model() -> None:
    inv = inventory(
        pool_device("fabric-1.A100.free-1", anonymous=True),
        pool_device("fabric-1.A100.free-0", anonymous=True),
        pool_device("fabric-1.H100.free-0", anonymous=True, model="H100"),
        pool_device("fabric-2.A100.free-0", anonymous=True, fabric=FAB2),
        pool_device("fabric-1.A100.busy", anonymous=True, state=DeviceState.ATTACHED),
        pool_device("GPU-1", state=DeviceState.ATTACHED),
    )
    assert choose(inv) == "fabric-1.A100.free-0"
    assert choose(inv, taken={"fabric-1.A100.free-0"}) == "fabric-1.A100.free-1"
    assert choose(inv, taken={"fabric-1.A100.free-0", "fabric-1.A100.free-1"}) is None


def test_model_only_choice_on_another_machine_uses_its_fabric() -> None:
    inv = inventory(pool_device("GPU-1"), pool_device("GPU-2", fabric=FAB2))
    assert choose(inv, machine="m-z") == "GPU-2"


def test_model_only_choice_before_the_fabric_was_read_or_for_an_unknown_machine_is_none() -> None:
    assert choose(None) is None
    assert count(None) == 0
    inv = inventory(pool_device("GPU-1"))
    assert choose(inv, machine="m-unknown") is None
    assert count(inv, machine="m-unknown") == 0
    assert choose(inventory()) is None


def test_free_count_counts_named_and_anonymous_free_devices_not_taken() -> None:
    inv = inventory(
        pool_device("GPU-1"),
        pool_device("GPU-2"),
        pool_device("GPU-3", state=DeviceState.ATTACHED),
        pool_device("fabric-1.A100.free-0", anonymous=True),
        pool_device("GPU-4", model="H100"),
        pool_device("GPU-5", fabric=FAB2),
    )
    assert count(inv) == 3
    assert count(inv, taken={"GPU-1"}) == 2
    assert count(inv, taken={"GPU-1", "GPU-2", "fabric-1.A100.free-0"}) == 0


def test_free_count_is_zero_exactly_when_choose_device_finds_nothing() -> None:
    devices = [
        pool_device("GPU-1"),
        pool_device("GPU-2", state=DeviceState.ATTACHED),
        pool_device("fabric-1.A100.free-0", anonymous=True),
        pool_device("GPU-3"),
    ]
    inv = inventory(*devices)
    ids = [d.id for d in devices]
    for n in range(len(ids) + 1):
        for taken in itertools.combinations(ids, n):
            chosen = choose(inv, taken=set(taken))
            assert chosen not in taken
            assert (chosen is None) == (count(inv, taken=set(taken)) == 0)
            if chosen is not None:
                dev = inv.device(chosen)
                assert dev is not None
                assert dev.state == DeviceState.FREE


# --- decide_remove -------------------------------------------------------------------------------


def online(name: str = "gpu-gpu-x", **kw: Any) -> Obj:
    """An attached resource being deleted, which the node has reported (NodeReady=True)."""
    fields: dict[str, Any] = {
        "device": "GPU-X",
        "state": "Detaching",
        "deleting": True,
        "node_ready": True,
    }
    fields.update(kw)
    return resource(name, **fields)


def test_a_model_only_resource_deleted_before_its_choice_is_dropped() -> None:
    d = remove(resource("train-0", deleting=True))
    assert d == composing.RemoveDecision(RemoveStep.DROP, why="it never owned a device")


def test_a_refused_resource_is_dropped_on_delete_without_touching_the_fabric() -> None:
    refused = refused_resource("my-gpu", "GPU-X", created=40, deleting=True)
    owner = resource("gpu-gpu-x", device="GPU-X", created=0, state="Online", node_ready=True)
    d = remove(refused, [owner])
    assert d == composing.RemoveDecision(RemoveStep.DROP, why="it never owned a device")
    # ... also once its owner is gone
    assert remove(refused).step == RemoveStep.DROP


def test_a_resource_naming_a_device_another_owns_is_dropped_on_delete() -> None:
    # Deleted before the composer got to refuse it.
    newcomer = resource("my-gpu", device="GPU-X", created=40, deleting=True)
    owner = resource("gpu-gpu-x", device="GPU-X", created=0, state="Online", node_ready=True)
    assert remove(newcomer, [owner]) == composing.RemoveDecision(
        RemoveStep.DROP, why="GPU-X belongs to gpu-gpu-x"
    )


def test_a_device_the_node_never_reported_is_detached_at_once() -> None:
    for state in ("", "Attaching", "Online", "Failed"):
        obj = resource("gpu-gpu-x", device="GPU-X", state=state, deleting=True)
        assert remove(obj, deleting_for=0.0) == composing.RemoveDecision(RemoveStep.DETACH)


def test_a_device_the_node_released_is_detached() -> None:
    assert remove(online(node_released=True)) == composing.RemoveDecision(RemoveStep.DETACH)


def test_force_detach_does_not_wait_for_the_node() -> None:
    assert remove(online(force_detach=True)) == composing.RemoveDecision(RemoveStep.DETACH)
    assert remove(online(force_detach=True, node_released=False)).step == RemoveStep.DETACH


def test_the_owner_detaching_its_device_is_not_dropped_for_a_waiting_newcomer() -> None:
    owner = online(created=0, node_released=True)
    newcomer = resource("aa-new", device="GPU-X", created=40)
    assert remove(owner, [newcomer]) == composing.RemoveDecision(RemoveStep.DETACH)


def test_removal_waits_for_the_node_to_release_a_reported_device() -> None:
    d = remove(online(), deleting_for=15.0)
    assert d == composing.RemoveDecision(RemoveStep.WAIT_RELEASE, after=GRACE - 15.0)


def test_a_busy_node_agent_is_waited_for_beyond_the_grace() -> None:
    # NodeReleased=False: the agent answered "a process still uses it"; never detach under it.
    for deleting_for in (0.0, GRACE, 10 * GRACE):
        d = remove(online(node_released=False), deleting_for=deleting_for)
        assert d == composing.RemoveDecision(RemoveStep.WAIT_RELEASE, after=0.0)


def test_silent_node_agent_is_detached_after_the_grace() -> None:
    d = remove(online(), deleting_for=GRACE + 30)
    assert d == composing.RemoveDecision(
        RemoveStep.DETACH,
        why="its node agent has not answered for 90 s: detaching without it",
    )
    assert remove(online(), deleting_for=GRACE).step == RemoveStep.DETACH


def test_removal_waits_the_grace_when_the_node_has_just_disappeared() -> None:
    d = remove(online(), node_exists=False, node_missing_since=None)
    assert d == composing.RemoveDecision(RemoveStep.WAIT_NODE_GONE, after=GRACE)
    d = remove(online(), node_exists=False, node_missing_since=980.0, now=1000.0)
    assert d == composing.RemoveDecision(RemoveStep.WAIT_NODE_GONE, after=GRACE - 20.0)


def test_a_busy_device_on_a_node_that_is_gone_is_detached_after_the_grace() -> None:
    # The Node object is gone: its agent can never answer, "busy" or not.
    d = remove(
        online(node_released=False),
        node_exists=False,
        node_missing_since=925.0,
        now=1000.0,
        deleting_for=5.0,
    )
    assert d == composing.RemoveDecision(
        RemoveStep.DETACH, why="its node is gone (for 75 s): detaching without it"
    )
    at_grace = remove(online(), node_exists=False, node_missing_since=940.0, now=1000.0)
    assert at_grace.step == RemoveStep.DETACH


def test_a_refused_resource_never_detaches_whatever_its_node_says() -> None:
    owner = resource("gpu-gpu-x", device="GPU-X", created=0, state="Online", node_ready=True)
    for node_exists, released, force, deleting_for in itertools.product(
        (True, False), (None, True, False), (False, True), (0.0, 10 * GRACE)
    ):
        refused = refused_resource(
            "my-gpu",
            "GPU-X",
            created=40,
            deleting=True,
            node_ready=True,
            node_released=released,
            force_detach=force,
        )
        for others in ([owner], []):
            d = remove(
                refused,
                others,
                node_exists=node_exists,
                node_missing_since=0.0,
                deleting_for=deleting_for,
            )
            assert d.step == RemoveStep.DROP


# --- known hazard: ownership by creation time, not by who attached --------------------------------


def _same_second_race(*, attach_refused: bool) -> tuple[Obj, Obj]:
    """A request member chose GPU-X (its choice raced a claim's allocation of GPU-X) and attached
    it to node-a; the scaler's `gpu-gpu-x` for the claim, on node-b, was created a few hundred
    milliseconds later, which is the same second of creationTimestamp. `attach_refused`: the
    fabric then refused gpu-gpu-x's attach (DeviceBusy), and the scaler deleted it (it was made
    for the claim, so `decide_bind` asks to delete it)."""
    member = resource(
        "train-0", chosen="GPU-X", created=0, state="Online", node_ready=True, node="node-a"
    )
    claim_made = resource(
        "gpu-gpu-x",
        device="GPU-X",
        created=0,  # same second: the tie goes to the first name, "gpu-gpu-x" < "train-0"
        node="node-b",
        state="Failed" if attach_refused else "",
        reason="DeviceBusy" if attach_refused else None,
        deleting=attach_refused,
        for_claim="ml/train",
    )
    return member, claim_made


def test_a_same_second_newcomer_does_not_own_a_device_another_resource_attached() -> None:
    member, claim_made = _same_second_race(attach_refused=False)
    assert composing.check_owner(claim_made, [member, claim_made]) == (OwnerCheck.REFUSE, member)


def test_a_resource_that_never_attached_does_not_detach_another_ones_online_device() -> None:
    member, claim_made = _same_second_race(attach_refused=True)
    d = composing.decide_remove(
        claim_made,
        [member, claim_made],
        node_exists=True,
        node_missing_since=None,
        now=1000.0,
        node_gone_grace=GRACE,
        deleting_for=1.0,
    )
    assert d.step == RemoveStep.DROP
