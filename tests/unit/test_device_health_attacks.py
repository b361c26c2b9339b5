"""Attacks on device health over the fake world (`test_device_health_fake.py`'s helpers): each
test is a reproduction of a defect found by trying to break the feature, or a check that an
attack is handled."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from agent import errors, settings
from agent.controllers import running
from agent.kube.resources import FINALIZER, RESOURCES, resource_name
from agent.model import health as healthmodel
from agent.model.fabric import DeviceState
from agent.model.objects import NODE_READY, Obj, condition
from agent.node import health as nodehealth
from tests.unit.test_cluster_role_fake import A100, DRIVER, World, scale_up, world
from tests.unit.test_device_health_fake import counter, set_node_health, taints_of

# In-memory worlds only: graces, settle periods and backoff pass in virtual time.
pytestmark = pytest.mark.virtualtime


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
        assert kept_words(w) == {}  # the word kept on node-0 is gone with it


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
    h = healthmodel

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


async def test_a_node_reason_that_starts_like_the_fabrics_survives_a_new_leader() -> None:
    """A new leader tells a node-reported taint (kept: the node cannot say it again for a
    detached GPU) from a fabric-reported one (dropped: the fabric says it again) by its value.
    A node reason that began with "Fabric" (a node's word is any CamelCase reason) passed for
    the fabric's: after a fail-over the broken GPU was offered untainted."""
    async with world(gpus=2, health_grace=0.2) as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        set_node_health(w, "gpu-0", "False", "FabricLinkDown")
        taints = await w.wait(lambda: taints_of(w, "gpu-0"), "tainted")
        assert not taints[0]["value"].startswith(healthmodel.FABRIC_REASON_PREFIX)
        w.release("c1")
        await w.wait(lambda: w.fabric.devices["gpu-0"].state == DeviceState.FREE, "detached")
        await w.wait(
            lambda: (w.offered().get(w.device_name("gpu-0")) or {}).get("bindsToNode"),
            "gpu-0 free, tainted",
        )
        role = await new_leader(w, health_grace=0.2)
        await asyncio.sleep(0.5)  # past the grace
        assert taints_of(w, "gpu-0") == taints
        assert role.scaler.unhealthy_reason("gpu-0") == taints[0]["value"]


async def new_leader(w: World, **cluster: Any) -> running.ClusterRole:
    """Cancel the running cluster role and start another on the same world (a fail-over)."""
    old = w.tasks.pop(0)
    old.cancel()
    await asyncio.gather(old, return_exceptions=True)
    cfg = settings.Settings(
        cluster=settings.ClusterSettings(
            driver=DRIVER, idle_grace=300.0, scale_down_settle=0.05, **cluster
        )
    )
    role = running.build(  # type: ignore[arg-type]
        w.kube, w.fabric, cfg, identity="next", wall=w.wall, mono=w.mono
    )
    w.tasks.insert(0, asyncio.create_task(role.run()))
    await w.wait(lambda: role.publisher.syncs >= 1, "the new leader published", timeout=60)
    return role


@pytest.mark.parametrize(
    "reason", ["FabricLinkDown", "Fabric" + "x" * 57, "fabric", "FabricCritical"]
)
def test_a_node_reason_is_never_read_back_as_the_fabrics(reason: str) -> None:
    value = healthmodel.node_reason(reason)
    assert not value.startswith(healthmodel.FABRIC_REASON_PREFIX)
    assert len(value) <= 63
    word = healthmodel.recovered_word({"key": healthmodel.TAINT_KEY, "value": value})
    assert word is not None
    assert word.reason == value


async def test_a_new_leader_mid_swap_never_offers_the_unhealthy_gpu_untainted() -> None:
    """The leader dies while it swaps out an unhealthy GPU (withheld, settling): the slices
    carry no taint for it then (it is not offered at all), so the new leader learns it only from
    the resource's DeviceHealthy. Before the fix its first slice write came before it had read
    the resources (the publisher waited for slices and Nodes only) and before the health queue
    ran: the GPU was offered untainted, on its node, free of claims — the scheduler's to give.
    Also: the new leader detaches it once, and it stays tainted."""
    async with world(gpus=3, health_grace=0.2, scale_down_settle=1.0) as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        w.release("c1")
        await asyncio.sleep(0.1)
        set_node_health(w, "gpu-0", "False", "Xid79")
        await w.wait(lambda: "gpu-0" in w.role.scaler._draining, "the swap settling")
        assert w.device_name("gpu-0") not in w.offered()
        untainted: list[Obj] = []
        create, replace = w.kube.create, w.kube.replace
        name = w.device_name("gpu-0")

        def check(path: str, body: Obj) -> None:
            if "resourceslices" in path:
                for d in (body.get("spec") or {}).get("devices") or []:
                    if d["name"] == name and not d.get("taints"):
                        untainted.append(body)

        async def create_checked(path: str, body: Obj, **kw: Any) -> Obj:
            check(path, body)
            return await create(path, body, **kw)

        async def replace_checked(path: str, body: Obj, **kw: Any) -> Obj:
            check(path, body)
            return await replace(path, body, **kw)

        w.kube.create = create_checked  # type: ignore[method-assign]
        w.kube.replace = replace_checked  # type: ignore[method-assign]
        role = await new_leader(w, health_grace=0.2)
        await w.wait(lambda: w.fabric.devices["gpu-0"].state == DeviceState.FREE, "detached")
        await w.wait(lambda: taints_of(w, "gpu-0"), "offered free, tainted")
        await asyncio.sleep(0.3)  # past the grace
        assert untainted == []
        assert w.fabric.detaches == ["gpu-0"]
        assert role.scaler.unhealthy_reason("gpu-0") == "Xid79"


async def test_a_condition_on_a_resource_that_never_got_the_gpu_is_not_its_nodes_word() -> None:
    """DeviceHealthy=False written on a resource refused for a GPU another resource owns (on
    another node) tainted that GPU, held by a pod on its own node, and would have swapped it out
    once free: only a resource the fabric answered with the GPU (`status.cdi_device_id`) has a
    node that can speak for it."""
    async with world(gpus=2, health_grace=0.1) as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        w.kube.add(RESOURCES, attach_on_purpose("intruder", "gpu-0", "node-1"))
        await w.wait(
            lambda: (w.resource("intruder") or {}).get("status", {}).get("reason") == "DeviceOwned",
            "the intruder refused",
        )

        def write(obj: Obj) -> None:
            obj["status"].setdefault("conditions", []).append(
                {"type": "DeviceHealthy", "status": "False", "reason": "Xid79", "message": ""}
            )

        w.kube.edit(f"{RESOURCES}/intruder", write)
        await asyncio.sleep(0.4)
        assert taints_of(w, "gpu-0") == []
        assert w.role.scaler.unhealthy_reason("gpu-0") == ""
        w.release("c1")
        await asyncio.sleep(0.3)
        assert w.fabric.detaches == []


async def test_a_new_leader_while_the_unhealthy_gpu_is_detached_keeps_its_taint() -> None:
    """The leader dies after the swap deleted the GPU's resource and before the GPU, detached,
    is offered again (tainted): neither the resource (gone) nor the slices (the GPU withheld or
    detaching, not in them) carry the node's word. Before the fix the new leader offered the
    broken GPU free and untainted; now the word is also kept on the Node that said it."""
    async with world(gpus=3, health_grace=0.2) as w:
        await scale_up(w, "c1", "gpu-0", "node-0")
        set_node_health(w, "gpu-0", "False", "Xid79", "GPU has fallen off the bus")
        taints = await w.wait(lambda: taints_of(w, "gpu-0"), "tainted")
        old = w.tasks[0]
        patch = w.kube.patch

        async def patch_then_die(path: str, body: Obj, **kw: Any) -> Any:
            answer = await patch(path, body, **kw)
            if path.endswith(resource_name("gpu-0")) and "finalizers" in body.get("metadata", {}):
                old.cancel()  # the finalizer is off, the resource gone: the leader dies here
            return answer

        w.kube.patch = patch_then_die  # type: ignore[method-assign]
        w.release("c1")
        await asyncio.gather(old, return_exceptions=True)
        assert w.resource(resource_name("gpu-0")) is None
        assert w.device_name("gpu-0") not in w.offered()  # withheld: no taint to read back
        role = await new_leader(w, health_grace=0.2)
        await w.wait(lambda: w.fabric.devices["gpu-0"].state == DeviceState.FREE, "detached")
        await w.wait(lambda: w.device_name("gpu-0") in w.offered(), "offered again")
        await asyncio.sleep(0.4)  # past the grace
        got = taints_of(w, "gpu-0")
        assert got is not None
        assert [(t["key"], t["value"], t["effect"]) for t in got] == [
            (t["key"], t["value"], t["effect"]) for t in taints
        ]
        assert role.scaler.unhealthy_reason("gpu-0") == "Xid79"


def kept_words(w: World) -> dict[str, dict[str, str]]:
    """Node -> its annotations that keep a node's word on a GPU."""
    out: dict[str, dict[str, str]] = {}
    for node in w.kube.objects("nodes"):
        kept = {
            k: v
            for k, v in (node["metadata"].get("annotations") or {}).items()
            if k.startswith(healthmodel.KEPT_PREFIX)
        }
        if kept:
            out[node["metadata"]["name"]] = kept
    return out


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("other.io/x", '{"driver": "d", "device": "gpu-0", "reason": "Xid79"}'),
        ("unhealthy.cohdi.io/x", "not json"),
        ("unhealthy.cohdi.io/x", "[1]"),
        ("unhealthy.cohdi.io/x", '{"driver": "other", "device": "gpu-0", "reason": "Xid79"}'),
        ("unhealthy.cohdi.io/x", '{"driver": "d", "device": "", "reason": "Xid79"}'),
        ("unhealthy.cohdi.io/x", '{"driver": "d", "device": "gpu-0", "reason": 79}'),
    ],
)
def test_a_kept_word_that_is_not_ours_or_malformed_is_ignored(key: str, value: str) -> None:
    assert healthmodel.kept_word(key, value, driver_label="d") is None


def test_a_kept_word_reads_back() -> None:
    word = healthmodel.Word(False, "Xid79", "m" * 1000)
    key = healthmodel.kept_key("d", "gpu-" + "x" * 100)
    assert key.startswith(healthmodel.KEPT_PREFIX)
    assert len(key) - len(healthmodel.KEPT_PREFIX) <= 63
    value = healthmodel.kept_value("d", "gpu-" + "x" * 100, word, 1_800_000_000.0)
    device, got, stamp = healthmodel.kept_word(key, value, driver_label="d") or ("", None, "")
    assert device == "gpu-" + "x" * 100
    assert got == healthmodel.Word(False, "Xid79", "m" * 256)
    assert stamp == "2027-01-15T08:00:00Z"


async def test_a_condition_flipping_fast_ends_in_one_taint_then_one_lift() -> None:
    """41 flips of DeviceHealthy within a fraction of the grace: one taint added, its timeAdded
    kept, and it lifts once, a grace after the last True."""
    async with world(gpus=2, health_grace=0.5) as w:
        added = counter("cohdi_device_taints_total", change="added")
        removed = counter("cohdi_device_taints_total", change="removed")
        await scale_up(w, "c1", "gpu-0", "node-0")
        set_node_health(w, "gpu-0", "False", "Xid79")
        first = await w.wait(lambda: taints_of(w, "gpu-0"), "tainted")
        for i in range(41):  # ends True
            set_node_health(w, "gpu-0", "True" if i % 2 == 0 else "False", "Xid79")
            await asyncio.sleep(0.005)
        assert taints_of(w, "gpu-0") == first  # ended True, still within the grace
        await w.wait(lambda: taints_of(w, "gpu-0") == [], "lifted")
        assert counter("cohdi_device_taints_total", change="added") == added + 1
        assert counter("cohdi_device_taints_total", change="removed") == removed + 1
        assert w.fabric.detaches == []  # held all along


@pytest.mark.parametrize("size", [63, 64, 65, 127, 128, 129, 257])
@pytest.mark.parametrize("where", ["first", "last", "64th"])
def test_a_tainted_pool_of_any_size_keeps_64_a_slice_and_every_device(
    size: int, where: str
) -> None:
    from agent.model import pool
    from agent.model.fabric import DeviceId, FabricId, Inventory, Machine, MachineId, PoolDevice

    f = FabricId("f")
    inv = Inventory(
        (Machine(MachineId("m0"), "n0", f, "n0"),),
        tuple(
            PoolDevice(DeviceId(f"gpu-{i:03d}"), f, "A100", DeviceState.FREE) for i in range(size)
        ),
    )
    sick = {"first": 0, "last": size - 1, "64th": min(63, size - 1)}[where]
    taint = healthmodel.taints(
        healthmodel.Health(healthmodel.Source.NODE, "Xid79", "", added=0), evict=False
    )
    slices = pool.desired_slices(
        driver="d.example.com",
        inventory=inv,
        node_of_machine={},
        taints={f"gpu-{sick:03d}": taint},
    )["f"]
    sizes = [len(s.spec["devices"]) for s in slices]
    assert max(sizes) <= 64
    assert sum(sizes) == size
    assert {s.spec["pool"]["resourceSliceCount"] for s in slices} == {len(slices)}
    names = [d["name"] for s in slices for d in s.spec["devices"]]
    assert len(set(names)) == size


async def test_with_taints_dropped_a_new_leader_still_withholds_the_broken_detached_gpu() -> None:
    """DRADeviceTaints off: the slices never carry a taint, so a new leader could not read the
    node's word on a swapped-out GPU back from them at all; it offered the GPU as healthy. The
    word kept on the Node brings it back: the GPU stays withheld. And the new leader asks the
    API server before its first write with a taint (a probe slice no claim can get): before,
    that write itself offered the GPU, its taint dropped, until the next write."""
    async with world(gpus=3, health_grace=0.1) as w:
        create, replace = w.kube.create, w.kube.replace
        dropped: list[str] = []  # our devices whose taints the server dropped

        def strip(body: Obj) -> Obj:
            body = copy.deepcopy(body)
            for dev in (body.get("spec") or {}).get("devices") or []:
                if dev.pop("taints", None) and body["spec"]["driver"] == DRIVER:
                    dropped.append(dev["name"])
            return body

        async def create_without(path: str, body: Obj, **kw: Any) -> Obj:
            return await create(path, strip(body) if "resourceslices" in path else body, **kw)

        async def replace_without(path: str, body: Obj, **kw: Any) -> Obj:
            return await replace(path, strip(body) if "resourceslices" in path else body, **kw)

        w.kube.create = create_without  # type: ignore[method-assign]
        w.kube.replace = replace_without  # type: ignore[method-assign]
        await scale_up(w, "c1", "gpu-0", "node-0")
        set_node_health(w, "gpu-0", "False", "Xid79")
        await w.wait(lambda: w.role.publisher.taints_supported is False, "taints dropped")
        w.release("c1")
        await w.wait(lambda: w.fabric.devices["gpu-0"].state == DeviceState.FREE, "detached")
        await w.wait(lambda: w.resource(resource_name("gpu-0")) is None, "its resource gone")
        await asyncio.sleep(0.1)
        dropped.clear()
        role = await new_leader(w, health_grace=0.1)
        await w.wait(lambda: role.publisher.taints_supported is False, "the new leader learnt it")
        await asyncio.sleep(0.3)  # past the grace
        assert w.device_name("gpu-0") not in w.offered()
        assert dropped == []  # no write of ours offered it with its taint stripped
        assert [s for s in w.kube.objects("resourceslices") if s["spec"]["driver"] != DRIVER] == []
        assert role.scaler.unhealthy_reason("gpu-0") == "Xid79"


@pytest.mark.parametrize("failure", ["forbidden", "unavailable"])
async def test_a_node_annotation_that_cannot_be_written_never_holds_a_taint_forever(
    failure: str,
) -> None:
    """The word kept on the Node must be gone before the taint lifts — but its removal refused
    for good (a 403: RBAC changed under the running agent) held the taint forever, retried
    every 5 s. Now a permanent refusal is logged and given up (the taint lifts after the
    grace); a transient one is retried and the taint lifts once the removal goes through."""
    from agent import errors as errs

    async with world(gpus=2, health_grace=0.1) as w:
        patch = w.kube.patch
        failing = {"on": True}

        async def refuse_nodes(path: str, body: Obj, **kw: Any) -> Any:
            notes = body.get("metadata", {}).get("annotations") or {}
            if "/nodes/" in path and failing["on"] and None in notes.values():  # a removal
                if failure == "forbidden":
                    raise errs.KubeForbidden("nodes is forbidden: cannot patch")
                raise errs.KubeUnavailable("no answer")
            return await patch(path, body, **kw)

        w.kube.patch = refuse_nodes  # type: ignore[method-assign]
        await scale_up(w, "c1", "gpu-0", "node-0")
        set_node_health(w, "gpu-0", "False", "Xid79")
        await w.wait(lambda: taints_of(w, "gpu-0"), "tainted")
        set_node_health(w, "gpu-0", "True")
        if failure == "unavailable":
            await asyncio.sleep(0.4)
            assert taints_of(w, "gpu-0")  # not lifted while the word may still be kept
            failing["on"] = False
            w.role.scaler.sick.enqueue("gpu-0")  # (the retry comes 5 s later)
        await w.wait(lambda: taints_of(w, "gpu-0") == [], "lifted")
        assert bool(kept_words(w)) == (failure == "forbidden")  # left behind only if refused
