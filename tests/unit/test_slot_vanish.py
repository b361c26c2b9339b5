"""A claim holding an anonymous slot the published view stops listing for a moment.

On an FTI-like fabric (free GPUs as a count), the slot numbers offered shrink by one when the free
count drops before the agent knows why: a fabric read taken during an attach lists the lower count
but not yet the GPU, or the composer has not yet recorded the slot the GPU came through (the view
then still subtracts that slot as 'waiting'). The scheduler had done nothing wrong and a GPU is
free; the next read or the composer's record brings the number back. The scaler waits
`SLOT_VANISH_GRACE` for such a slot to be offered again, and fails the claim only when it is not.
(The opposite error, a number offered beyond the GPUs the fabric has, is
`test_slots_fake.test_a_gpu_arriving_before_the_next_fabric_read_takes_its_number_out_of_the_count`.)"""

from __future__ import annotations

import asyncio

import pytest

from agent.model import pool as poolmodel
from agent.model import scaling as decide
from agent.model import slots as slotmodel
from agent.model.fabric import DeviceState
from tests.unit.test_cluster_role_fake import A100, FABRIC, World, world

pytestmark = pytest.mark.virtualtime


def slot(n: int) -> str:
    return slotmodel.slot_id(FABRIC, A100, n)


async def _offered_without(w: World, n: int) -> None:
    await w.wait(
        lambda: w.device_name(slot(n)) not in w.offered() and len(w.offered()) > 0,
        f"slot {n} no longer offered",
    )


async def test_a_slot_offered_again_within_the_grace_is_attached() -> None:
    async with world(anonymous=True, gpus=3) as w:
        await w.wait(lambda: w.device_name(slot(2)) in w.offered(), "three slots offered")
        w.fabric.set("gpu-0", DeviceState.ATTACHED, "m-node-1")  # the count drops to two
        await _offered_without(w, 2)
        w.new_claim("c1")
        w.allocate("c1", slot(2), "node-0")  # as a scheduler still reading three slots would
        await asyncio.sleep(decide.SLOT_VANISH_GRACE / 3)
        assert w.condition("c1", poolmodel.FAILED) is None
        w.fabric.set("gpu-0", DeviceState.FREE)  # back to three: slot 2 is offered again
        ready = await w.wait(lambda: w.condition("c1", poolmodel.READY), "c1 ready")
        assert ready["status"] == "True"
        assert w.condition("c1", poolmodel.FAILED) is None


async def test_a_slot_that_stays_gone_fails_the_claim_after_the_grace() -> None:
    async with world(anonymous=True, gpus=3) as w:
        await w.wait(lambda: w.device_name(slot(2)) in w.offered(), "three slots offered")
        w.fabric.set("gpu-0", DeviceState.ATTACHED, "m-node-1")
        await _offered_without(w, 2)
        loop = asyncio.get_running_loop()
        w.new_claim("c1")
        w.allocate("c1", slot(2), "node-0")
        asked = loop.time()
        failed = await w.wait(lambda: w.condition("c1", poolmodel.FAILED), "FabricDeviceFailed")
        assert failed["reason"] == "UnknownDevice"
        assert loop.time() - asked >= decide.SLOT_VANISH_GRACE  # virtual time: exact
        assert [a for a in w.fabric.attaches if a[1] == "m-node-0"] == []  # nothing for c1


def test_the_grace_never_outlasts_the_claims_deadline() -> None:
    from agent.model import claims as claimmodel

    b = claimmodel.Binding(
        namespace="ns", claim="c", uid="u", pool="p", device="d", node="n",
        ready=False, failed=False, allocated_at=100.0,
    )  # fmt: skip
    wait = decide.decide_bind(
        b, device=None, inventory_known=True, resource=None, room_on_node=True,
        now=101.0, deadline=60.0, slot_vanished_for=1.0,
    )  # fmt: skip
    assert wait.step == decide.BindStep.WAIT
    late = decide.decide_bind(
        b, device=None, inventory_known=True, resource=None, room_on_node=True,
        now=161.0, deadline=60.0, slot_vanished_for=1.0,
    )  # fmt: skip
    assert (late.step, late.reason) == (decide.BindStep.FAIL, "UnknownDevice")
    named = decide.decide_bind(
        b, device=None, inventory_known=True, resource=None, room_on_node=True,
        now=101.0, deadline=60.0,
    )  # fmt: skip
    assert (named.step, named.reason) == (decide.BindStep.FAIL, "UnknownDevice")
