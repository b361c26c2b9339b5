"""Attacks on device health over the fake world (`test_device_health_fake.py`'s helpers): each
test is a reproduction of a defect found by trying to break the feature, or a check that an
attack is handled."""

from __future__ import annotations

import asyncio

import pytest

from agent import errors, settings
from agent.kube.resources import FINALIZER, RESOURCES, resource_name
from agent.model.fabric import DeviceState
from agent.model.objects import NODE_READY, Obj, condition
from agent.node import health as nodehealth
from tests.unit.test_cluster_role_fake import A100, scale_up, world
from tests.unit.test_device_health_fake import set_node_health, taints_of


def attach_on_purpose(name: str, device: str, node: str) -> Obj:
    """A hand-written resource naming one GPU (how an operator tries a GPU again)."""
    return {
        "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
        "kind": "ComposableResource",
        "metadata": {"name": name, "finalizers": [FINALIZER]},
        "spec": {"type": "gpu", "model": A100, "target_node": node, "fabric_device": device},
    }


async def test_a_broken_gpu_attached_on_purpose_to_a_node_that_finds_it_fine_comes_back() -> None:
    """The documented way back for a GPU the node found broken: attach it on purpose; its new
    node writes no DeviceHealthy at all for a GPU it never found unhealthy (absent = healthy), so
    the new node's NodeReady with no DeviceHealthy is its word. Before the fix the old node's
    word stood forever: the GPU stayed tainted on a node that found nothing wrong with it."""
    async with world(gpus=2, health_grace=0.2) as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        set_node_health(w, "gpu-0", "False", "Xid79")
        await w.wait(lambda: taints_of(w, "gpu-0"), "tainted")
        w.release("c1")
        await w.wait(lambda: w.fabric.devices["gpu-0"].state == DeviceState.FREE, "detached")
        await w.wait(lambda: w.resource(resource_name("gpu-0")) is None, "its resource gone")
        w.kube.add(RESOURCES, attach_on_purpose("try-gpu-0", "gpu-0", "node-1"))
        await w.wait(
            lambda: condition(w.resource("try-gpu-0") or {}, NODE_READY), "node-1 has it, ready"
        )
        await w.wait(lambda: taints_of(w, "gpu-0") == [], "the taint lifted after the grace")
        assert w.role.scaler.unhealthy_reason("gpu-0") == ""
        assert w.fabric.attached_to("gpu-0") == "m-node-1"  # not swapped out meanwhile
        assert w.events("DeviceHealthy")


async def test_the_node_that_found_it_broken_keeps_its_word_without_a_condition_change() -> None:
    """The resource that carried DeviceHealthy=False is not taken for a fresh node's word: only a
    live, node-ready resource other than it with no condition is."""
    async with world(gpus=2, health_grace=0.1) as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        set_node_health(w, "gpu-0", "False", "Xid79")
        await w.wait(lambda: taints_of(w, "gpu-0"), "tainted")

        def strip(obj: Obj) -> None:  # someone removes the condition by hand
            obj["status"]["conditions"] = [
                c for c in obj["status"]["conditions"] if c["type"] != "DeviceHealthy"
            ]

        w.kube.edit(f"{RESOURCES}/{resource_name('gpu-0')}", strip)
        await asyncio.sleep(0.4)
        assert w.role.scaler.unhealthy_reason("gpu-0") == "Xid79"
        assert taints_of(w, "gpu-0")


def test_fresh_node_word_only_from_another_live_ready_resource_without_the_condition() -> None:
    from agent.model import health as h

    def res(uid: str, *conds: tuple[str, str], deleting: bool = False) -> Obj:
        meta: dict[str, str] = {"name": "r", "uid": uid}
        if deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {
            "metadata": meta,
            "status": {"conditions": [{"type": t, "status": s} for t, s in conds]},
        }

    ready = ("NodeReady", "True")
    assert h.fresh_node_word(res("b", ready), said_by="a") == h.Word(True)
    assert h.fresh_node_word(res("b", ready), said_by="") == h.Word(True)  # recovered word
    assert h.fresh_node_word(res("a", ready), said_by="a") is None  # the node that said it
    assert h.fresh_node_word(res("b"), said_by="a") is None  # not ready yet
    assert h.fresh_node_word(res("b", ready, deleting=True), said_by="a") is None
    assert h.fresh_node_word(res("b", ready, ("DeviceHealthy", "Unknown")), said_by="a") is None
    assert h.fresh_node_word(res("", ready), said_by="a") is None


@pytest.mark.parametrize("text", ["²", "١٢", "79,³", "18446744073709551616", "+79", "-1", "7 9"])
def test_fatal_xids_take_ascii_decimal_numbers_only(text: str) -> None:
    """`str.isdigit` takes superscripts (which `int` then refuses: a ValueError, not the
    setting's error) and other scripts' digits; a number past NVML's 64-bit event data can never
    match. Each is refused naming the setting, when the settings are loaded (before the node
    role connects to anything) and by the parser."""
    with pytest.raises(errors.ConfigError, match="--node-fatal-xids"):
        nodehealth.parse_xids(text)
    with pytest.raises(errors.ConfigError, match="--node-fatal-xids"):
        settings.load({"--node-fatal-xids": text})
    assert nodehealth.parse_xids(" 79 ,18446744073709551615") == {79, 2**64 - 1}
