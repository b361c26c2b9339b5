"""Vendor-driver mode (`--vendor-driver`): the pure decisions of `agent.model.vendoring`, and the
whole cluster role on the in-memory API server with a stand-in vendor driver that publishes a
node-local slice for the GPU once it is attached (the real control plane's version, with the
scheduler, is tests/cluster/test_vendor_mode.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent import errors, settings
from agent.controllers import running
from agent.controllers.vendoring import Vendoring
from agent.kube.resources import FINALIZER, REQUESTS, RESOURCES, resource_name
from agent.model import claims as claimmodel
from agent.model import pool as poolmodel
from agent.model import vendoring as vm
from agent.model.cohdi import PoolAttributes, parse_devices
from agent.model.fabric import DeviceState
from agent.model.objects import Obj
from agent.testing.fakekube import FakeKube
from agent.testing.nodereport import NodeDouble
from tests import virtualtime
from tests.node.simnode import node_role
from tests.unit.test_cluster_role_fake import (
    A100,
    DRIVER,
    POOL,
    SLICES,
    FakeFabric,
    World,
    make_node,
)

# In-memory worlds only: graces, settle periods and backoff pass in virtual time.
pytestmark = pytest.mark.virtualtime

VENDOR = "gpu.vendor.example"

# --- pure decisions --------------------------------------------------------------------------


def _slice_spec(pool: str, devices: list[dict[str, Any]], **sel: Any) -> poolmodel.SliceSpec:
    return poolmodel.SliceSpec(
        name=f"s-{pool}",
        pool=pool,
        spec={"driver": VENDOR, "pool": {"name": pool}, **sel, "devices": devices},
    )


def test_vendor_slices_keep_free_devices_with_cohdis_conditions_and_attributes() -> None:
    free = {
        "name": "gpu-1",
        "attributes": {"productName": {"string": "A100"}, "uuid": {"string": "GPU-1"}},
        "bindsToNode": True,
        "bindingConditions": [poolmodel.READY],
        "bindingFailureConditions": [poolmodel.FAILED],
    }
    attached = {"name": "gpu-2", "attributes": {}, "nodeName": "n1"}
    desired = {
        "fab": [_slice_spec("fab", [free, attached], perDeviceNodeSelection=True)],
        "fab/n1": [_slice_spec("fab/n1", [attached], nodeName="n1")],
    }
    out = vm.vendor_slices(desired)
    assert set(out) == {"fab"}, "a node's pool of attached GPUs is the vendor's to offer"
    (entry,) = out["fab"][0].spec["devices"]
    assert entry["bindingConditions"] == ["FabricDeviceReady"]
    assert entry["bindingFailureConditions"] == ["FabricDeviceReschedule", "FabricDeviceFailed"]
    assert entry["attributes"]["type"] == {"string": "gpu"}
    assert entry["attributes"]["uuid"] == {"string": ""}, "a pool device has no GPU yet"
    assert entry["attributes"]["productName"] == {"string": "A100"}
    assert free["attributes"]["uuid"] == {"string": "GPU-1"}, "the cached entry is not changed"


def _vendor_slice(name: str, node: str, devices: dict[str, str], **labels: str) -> Obj:
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "driver": VENDOR,
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": [
                {"name": dev, "attributes": {"uuid": {"string": uuid}}}
                for dev, uuid in devices.items()
            ],
        },
    }


def test_vendor_index_reads_node_local_slices_of_the_vendor_only() -> None:
    slices = [
        _vendor_slice("a", "n1", {"gpu-0": "GPU-A"}),
        _vendor_slice("b", "n2", {"gpu-0": "GPU-B"}),
        _vendor_slice(
            "ours", "n1", {"x": "GPU-X"}, **{"app.kubernetes.io/managed-by": "cohdi-agent"}
        ),
        {**_vendor_slice("other", "n1", {"y": "GPU-Y"}), "spec": {"driver": "other.io"}},
    ]
    qualified = _vendor_slice("q", "n3", {})
    qualified["spec"]["devices"] = [
        {"name": "gpu-1", "attributes": {f"{VENDOR}/uuid": {"string": "GPU-Q"}}}
    ]
    index = vm.vendor_index([*slices, qualified], VENDOR)
    assert index == {
        ("n1", "gpu-a"): ("n1", "gpu-0"),
        ("n2", "gpu-b"): ("n2", "gpu-0"),
        ("n3", "gpu-q"): ("n3", "gpu-1"),
    }, "keyed by the UUID in lower case"


def _resource(state: str, node: str = "n1", uuid: str = "GPU-A") -> Obj:
    return {
        "metadata": {"name": "gpu-fab-1"},
        "spec": {"target_node": node, "fabric_device": "fab-1"},
        "status": {"state": state, "device_id": uuid, "cdi_device_id": "fab-1"},
    }


def _claim(conditions: list[str]) -> tuple[Obj, claimmodel.Binding]:
    claim: Obj = {
        "metadata": {"name": "c", "namespace": "default", "uid": "u1"},
        "status": {
            "allocation": {
                "devices": {
                    "results": [
                        {
                            "driver": VENDOR,
                            "pool": "fab",
                            "device": "fab-1",
                            "bindingConditions": ["FabricDeviceReady"],
                        }
                    ]
                },
                "nodeSelector": {
                    "nodeSelectorTerms": [
                        {
                            "matchFields": [
                                {"key": "metadata.name", "operator": "In", "values": ["n1"]}
                            ]
                        }
                    ]
                },
            },
            "devices": [
                {
                    "driver": VENDOR,
                    "pool": "fab",
                    "device": "fab-1",
                    "conditions": [{"type": t, "status": "True"} for t in conditions],
                }
            ],
        },
    }
    (b,) = claimmodel.bindings(claim, VENDOR)
    return claim, b


def test_reschedule_only_once_the_vendor_offers_the_gpu_on_the_claims_node() -> None:
    claim, b = _claim([])
    index = {("n1", "gpu-a"): ("n1", "gpu-0")}

    def step(resource: Obj | None, idx: vm.VendorIndex = index) -> vm.Step:
        return vm.decide(claim, b, vendor=VENDOR, resource=resource, index=idx).step

    assert step(None) == vm.Step.WAIT
    assert step(_resource("Attaching")) == vm.Step.WAIT
    assert step(_resource("Online", node="n2")) == vm.Step.WAIT
    assert step(_resource("Online", uuid="")) == vm.Step.WAIT
    assert step(_resource("Online"), {}) == vm.Step.WAIT, "not in the vendor's slice yet"
    assert step(_resource("Online"), {("n2", "gpu-a"): ("n2", "gpu-0")}) == vm.Step.WAIT
    d = vm.decide(claim, b, vendor=VENDOR, resource=_resource("Online"), index=index)
    assert (d.step, d.vendor_device) == (vm.Step.RESCHEDULE, ("n1", "gpu-0"))
    done, b2 = _claim([vm.RESCHEDULE])
    again = vm.decide(done, b2, vendor=VENDOR, resource=_resource("Online"), index=index)
    assert again.step == vm.Step.DONE


def test_aliases_name_our_gpu_behind_the_vendors_device() -> None:
    index = {("n1", "gpu-a"): ("n1", "gpu-0")}
    assert vm.aliases(index, [_resource("Online")]) == {("n1", "gpu-0"): "fab-1"}
    assert vm.aliases(index, [_resource("Detaching")]) == {}
    assert vm.aliases(index, [_resource("Online", node="n2")]) == {}


# --- the whole cluster role, in memory ---------------------------------------------------------


@contextlib.asynccontextmanager
async def vendor_world(
    gpus: int = 4,
    claim_deadline: float = 480.0,
    idle_grace: float = 300.0,
    pool_attributes: PoolAttributes | None = None,
) -> AsyncIterator[World]:
    wall, mono = virtualtime.clocks()
    kube = FakeKube(bookmark_interval=60, wall=wall)
    kube.selectable("composableresources", "spec.target_node")
    names = ["node-0", "node-1"]
    for n in names:
        make_node(kube, n)
    fabric = FakeFabric(names, gpus)
    cfg = settings.Settings(
        cluster=settings.ClusterSettings(
            driver=DRIVER,
            vendor_driver=VENDOR,
            idle_grace=idle_grace,
            claim_deadline=claim_deadline,
            scale_down_settle=0.05,
        )
    )
    role = running.build(
        kube,
        fabric,  # type: ignore[arg-type]
        cfg,
        identity="test",
        pool_attributes=pool_attributes,
        wall=wall,
        mono=mono,
    )
    w = World(kube, fabric, role, names, wall=wall, mono=mono)
    w.tasks.append(asyncio.create_task(role.run()))
    w.tasks.append(asyncio.create_task(NodeDouble(kube, set(names)).run()))
    try:
        await w.wait(lambda: len(pool_entries(w)) == gpus, "the pool published")
        yield w
    finally:
        for t in w.tasks:
            t.cancel()
        await asyncio.gather(*w.tasks, return_exceptions=True)


def pool_entries(w: World) -> dict[str, dict[str, Any]]:
    """Our entries under the vendor's driver name."""
    return {
        d["name"]: d
        for s in w.kube.objects("resourceslices")
        if s["spec"]["driver"] == VENDOR
        and (s["metadata"].get("labels") or {}).get("app.kubernetes.io/managed-by") == "cohdi-agent"
        for d in s["spec"].get("devices") or []
    }


def allocate(w: World, claim: str, pool: str, device: str, node: str, *, pooled: bool) -> None:
    """kube-scheduler's allocation of one device of the vendor's driver, pinned to `node`."""
    now = dt.datetime.fromtimestamp(w.wall(), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    result: dict[str, Any] = {"request": "gpu", "driver": VENDOR, "pool": pool, "device": device}
    if pooled:
        result["bindingConditions"] = [poolmodel.READY]
        result["bindingFailureConditions"] = [vm.RESCHEDULE, poolmodel.FAILED]

    def change(obj: Obj) -> None:
        obj["status"] = {
            "allocation": {
                "devices": {"results": [result]},
                "nodeSelector": {
                    "nodeSelectorTerms": [
                        {
                            "matchFields": [
                                {"key": "metadata.name", "operator": "In", "values": [node]}
                            ]
                        }
                    ]
                },
                "allocationTimestamp": now,
            },
            "reservedFor": [{"resource": "pods", "name": claim, "uid": "pod-" + claim}],
        }

    w.kube.edit(w.claim_path(claim), change)


def stand_in_vendor(w: World, node: str, gpu: str) -> None:
    """The vendor's kubelet plugin on `node` has found the GPU: its node-local slice lists it."""
    w.kube.add(SLICES, _vendor_slice(f"{VENDOR}-{node}", node, {"gpu-0": gpu}))


def conditions(w: World, claim: str) -> list[str]:
    return [
        c["type"]
        for e in (w.claim(claim).get("status") or {}).get("devices") or []
        for c in e.get("conditions") or []
        if c.get("status") == "True"
    ]


def vendoring(w: World) -> Vendoring:
    assert w.role.vendoring is not None
    return w.role.vendoring


async def test_pool_is_published_under_the_vendors_name_as_cohdi_does() -> None:
    async with vendor_world() as w:
        entries = pool_entries(w)
        assert all(e["bindsToNode"] for e in entries.values())
        assert all(
            e["bindingFailureConditions"] == [vm.RESCHEDULE, poolmodel.FAILED]
            for e in entries.values()
        )
        assert all(e["attributes"]["type"] == {"string": "gpu"} for e in entries.values())
        assert all(e["attributes"]["uuid"] == {"string": ""} for e in entries.values())
        assert not [s for s in w.kube.objects("resourceslices") if s["spec"]["driver"] == DRIVER]


async def test_attach_then_reschedule_once_when_the_vendor_offers_the_gpu() -> None:
    async with vendor_world() as w:
        w.new_claim("c1")
        allocate(w, "c1", POOL, w.device_name("gpu-1"), "node-0", pooled=True)
        await w.wait(
            lambda: (w.resource(resource_name("gpu-1")) or {}).get("status", {}).get("conditions"),
            "gpu-1 attached and reported by the node",
        )
        await asyncio.sleep(0.2)
        assert conditions(w, "c1") == [], "neither Ready (the vendor prepares) nor Reschedule yet"
        assert w.device_name("gpu-1") not in pool_entries(w), "attached: the vendor offers it"
        # another driver's slices are never ours to rewrite or delete
        stand_in_vendor(w, "node-0", "GPU-1")
        await w.wait(lambda: vm.RESCHEDULE in conditions(w, "c1"), "FabricDeviceReschedule")
        assert conditions(w, "c1") == [vm.RESCHEDULE]
        assert w.fabric.attaches == [("gpu-1", "m-node-0")]
        # the scheduler drops the allocation and takes the vendor's device on node-0
        w.kube.edit(w.claim_path("c1"), lambda o: o.pop("status", None))
        allocate(w, "c1", "node-0", "gpu-0", "node-0", pooled=False)
        await asyncio.sleep(0.3)
        assert vendoring(w).written == 1
        assert w.fabric.attaches == [("gpu-1", "m-node-0")], "one attach"
        assert w.kube.get_obj(f"{SLICES}/{VENDOR}-node-0") is not None
        # the vendor's device is our GPU: the claim holds it, scale-down leaves it
        assert w.role.publisher.device_id_of("node-0", "gpu-0") == "gpu-1"
        assert "gpu-1" in w.role.scaler._held_devices()
        assert (w.resource(resource_name("gpu-1")) or {})["status"]["state"] == "Online"


async def test_a_claim_already_rescheduled_is_not_written_again() -> None:
    """A new leader (or CoHDI before the switch) set it: the claim's own status is the record."""
    async with vendor_world() as w:
        w.new_claim("c1")
        allocate(w, "c1", POOL, w.device_name("gpu-2"), "node-1", pooled=True)

        def mark(obj: Obj) -> None:
            obj["status"]["devices"] = [
                {
                    "driver": VENDOR,
                    "pool": POOL,
                    "device": w.device_name("gpu-2"),
                    "conditions": [{"type": vm.RESCHEDULE, "status": "True"}],
                }
            ]

        await w.wait(lambda: w.fabric.attached_to("gpu-2"), "gpu-2 attached")
        w.kube.edit(w.claim_path("c1"), mark)
        stand_in_vendor(w, "node-1", "GPU-2")
        await asyncio.sleep(0.3)
        assert vendoring(w).written == 0
        assert conditions(w, "c1") == [vm.RESCHEDULE]


def test_a_claim_the_vendor_never_takes_fails_at_its_deadline() -> None:
    claim, b = _claim([])
    b = dataclasses.replace(b, allocated_at=1000.0)

    def late(now: float, made: bool = True) -> tuple[str, float, bool]:
        d = vm.handed_over_or_late(
            claim, b, vendor=VENDOR, device="fab-1", made_for_claim=made, now=now, deadline=60
        )
        return str(d.step), d.after, d.delete_resource

    assert late(1010.0) == ("wait", 50.0, False)
    assert late(1061.0) == ("fail", 0.0, True)
    assert late(1061.0, made=False) == ("fail", 0.0, False)
    done, b2 = _claim([vm.RESCHEDULE])
    d = vm.handed_over_or_late(
        done, b2, vendor=VENDOR, device="fab-1", made_for_claim=True, now=9e9, deadline=60
    )
    assert (d.step, d.after) == ("wait", 0.0), "handed over: nothing more to do"


async def test_claim_fails_when_the_vendor_never_offers_the_gpu() -> None:
    async with vendor_world(claim_deadline=1.0) as w:
        w.new_claim("c1")
        allocate(w, "c1", POOL, w.device_name("gpu-3"), "node-1", pooled=True)
        await w.wait(lambda: poolmodel.FAILED in conditions(w, "c1"), "FabricDeviceFailed")
        assert vm.RESCHEDULE not in conditions(w, "c1")
        await w.wait(lambda: w.resource(resource_name("gpu-3")) is None, "its resource deleted")
        assert w.fabric.attached_to("gpu-3") is None, "the GPU detached again"


# --- the node role ---------------------------------------------------------------------------


async def test_node_role_runs_without_its_kubelet_plugin_in_vendor_mode() -> None:
    """The vendor's kubelet plugin prepares the GPUs: ours registers no socket, and the role is
    ready once its first PCI scan is done (hot-plug, identification and safe removal only)."""
    root = Path(tempfile.mkdtemp(prefix="vnd-", dir="/tmp"))  # short: unix socket paths
    try:
        async with node_role(root, vendor_driver=VENDOR) as role:
            assert role.not_ready() == []
            assert role.plugin is None
            assert not list((root / "kubelet").rglob("*.sock")), "no plugin socket"
            assert VENDOR in role.status()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_vendor_driver_setting_is_checked_like_the_driver() -> None:
    assert settings.load({"--vendor-driver": "gpu.nvidia.com"}).cluster.vendor_driver == (
        "gpu.nvidia.com"
    )
    assert settings.load({}).cluster.vendor_driver == "", "off by default"
    with pytest.raises(errors.ConfigError, match="--vendor-driver"):
        settings.load({"--vendor-driver": "GPU_nvidia"})


# --- attacks: the vendor's slice late, elsewhere, in another case, gone again ----------------


def test_the_vendors_uuid_in_another_case_is_the_same_gpu() -> None:
    """The fabric's serial number and the vendor's `uuid` attribute may differ in case (`GPU-A`
    against `gpu-a`): the same GPU, for the hand-off and for the aliases alike."""
    claim, b = _claim([])
    index = vm.vendor_index([_vendor_slice("a", "n1", {"gpu-0": "gpu-a"})], VENDOR)
    d = vm.decide(claim, b, vendor=VENDOR, resource=_resource("Online", uuid="GPU-A"), index=index)
    assert (d.step, d.vendor_device) == (vm.Step.RESCHEDULE, ("n1", "gpu-0"))
    assert vm.aliases(index, [_resource("Online", uuid="GPU-A")]) == {("n1", "gpu-0"): "fab-1"}


def test_an_alias_outlives_the_vendors_slice_while_the_gpu_is_online() -> None:
    index = {("n1", "gpu-a"): ("n1", "gpu-0")}
    before = vm.aliases(index, [_resource("Online")])
    assert vm.aliases({}, [_resource("Online")], before) == before, "the slice gone: kept"
    assert vm.aliases({}, [_resource("Detaching")], before) == {}, "our GPU going: dropped"
    assert vm.aliases({}, [], before) == {}
    other = {("n1", "gpu-z"): ("n1", "gpu-0")}  # the vendor's gpu-0 is another GPU now
    assert vm.aliases(other, [_resource("Online")], before) == {}
    moved = {("n1", "gpu-a"): ("n1", "gpu-7")}  # our GPU under another name
    assert vm.aliases(moved, [_resource("Online")], before) == {("n1", "gpu-7"): "fab-1"}


async def _handed_over(w: World, gpu: str, node: str, vendor_uuid: str) -> None:
    """Claim c1 allocated our pool device for `gpu`, attached, the vendor offers it as
    `vendor_uuid`, FabricDeviceReschedule set, the scheduler reallocates the vendor's device."""
    w.new_claim("c1")
    allocate(w, "c1", POOL, w.device_name(gpu), node, pooled=True)
    await w.wait(lambda: w.fabric.attached_to(gpu), f"{gpu} attached")
    stand_in_vendor(w, node, vendor_uuid)
    await w.wait(lambda: vm.RESCHEDULE in conditions(w, "c1"), "FabricDeviceReschedule")
    w.kube.edit(w.claim_path("c1"), lambda o: o.pop("status", None))
    allocate(w, "c1", node, "gpu-0", node, pooled=False)
    await w.wait(
        lambda: w.role.publisher.device_id_of(node, "gpu-0") == gpu, "the vendor's device is ours"
    )


async def test_a_vendor_uuid_in_lower_case_is_handed_over() -> None:
    async with vendor_world() as w:
        await _handed_over(w, "gpu-1", "node-0", "gpu-1")  # the fabric says GPU-1
        assert w.fabric.attaches == [("gpu-1", "m-node-0")]
        assert vendoring(w).written == 1


async def test_the_vendors_slice_gone_again_does_not_free_the_gpu_under_the_claim() -> None:
    """The vendor's plugin restarts after the hand-off and its node-local slice is gone for a
    while (kubelet removes a plugin's slices when it unregisters): the claim still holds the
    vendor's device, which is still our GPU — scale-down must not take it, however long the
    slice stays away; the GPU is released once the claim lets go."""
    async with vendor_world(idle_grace=0.2) as w:
        await _handed_over(w, "gpu-1", "node-0", "GPU-1")
        w.kube.remove(f"{SLICES}/{VENDOR}-node-0")
        await w.wait(lambda: not vendoring(w).index, "the vendor's slice gone from the index")
        await asyncio.sleep(1.0)  # five idle graces
        assert w.fabric.attached_to("gpu-1") == "m-node-0", "detached under the claim"
        assert "gpu-1" in w.role.scaler._held_devices()
        w.kube.edit(w.claim_path("c1"), lambda o: o.pop("status", None))  # the pod is done
        await w.wait(lambda: w.fabric.attached_to("gpu-1") is None, "gpu-1 idle, detached")


# --- attacks: CoHDI's dra-attributes on the pool ----------------------------------------------


def test_pool_devices_carry_cohdis_dra_attributes_for_their_model() -> None:
    """CoHDI publishes each model's pool devices with its ConfigMap's `dra-attributes` — the
    vendor's `productName` ("NVIDIA A100 80GB PCIe"), not the fabric's model string ("a100") —
    so that one CEL selector (`productName == "NVIDIA A100 80GB PCIe"`) matches the pool device
    and the vendor's own device alike (the chart's `firstAvailable` claims). A model the
    ConfigMap does not name keeps ours."""

    def free(name: str, model: str) -> dict[str, Any]:
        return {
            "name": name,
            "attributes": {"productName": {"string": model}},
            "bindsToNode": True,
        }

    desired = {"fab": [_slice_spec("fab", [free("d1", "a100"), free("d2", "h100")])]}
    cohdi = {"a100": {"productName": "NVIDIA A100 80GB PCIe", "type": "gpu", "uuid": "x"}}
    d1, d2 = vm.vendor_slices(desired, cohdi)["fab"][0].spec["devices"]
    assert d1["attributes"]["productName"] == {"string": "NVIDIA A100 80GB PCIe"}
    assert d1["attributes"]["type"] == {"string": "gpu"}
    assert d1["attributes"]["uuid"] == {"string": ""}, "a pool device has no GPU, whatever said"
    assert d2["attributes"]["productName"] == {"string": "h100"}


def _devices(product: str) -> Any:
    return parse_devices(
        "cohdi.io",
        [
            {
                "index": 0,
                "cdi-model-name": A100,
                "dra-attributes": {"productName": product, "type": "gpu", "uuid": ""},
                "driver-name": VENDOR,
                "k8s-device-name": "vendor-a100",
                "cannot-coexist-with": [],
            }
        ],
        where="ConfigMap composable-dra/composable-dra-dds",
    )


async def test_the_pool_carries_cohdis_attributes_and_follows_their_change() -> None:
    """With CoHDI's configuration as the source, the published pool devices carry the model's
    `dra-attributes` (the vendor's productName), and an edit of them is published at once."""
    attributes = PoolAttributes()
    attributes.set(_devices("NVIDIA A100 80GB PCIe"))
    async with vendor_world(pool_attributes=attributes) as w:
        entries = pool_entries(w)
        assert {e["attributes"]["productName"]["string"] for e in entries.values()} == {
            "NVIDIA A100 80GB PCIe"
        }
        attributes.set(_devices("NVIDIA A100-SXM4-80GB"))
        await w.wait(
            lambda: (
                {e["attributes"]["productName"]["string"] for e in pool_entries(w).values()}
                == {"NVIDIA A100-SXM4-80GB"}
            ),
            "the new productName published",
        )


def test_a_pool_device_keeps_within_the_api_servers_32_attributes() -> None:
    """CoHDI allows 32 dra-attributes; with ours beside them a device would have more than the
    32 attributes the API server takes (and the whole slice would be refused): CoHDI's are kept
    first, then `uuid` and `type`, ours only as room allows."""
    many = {"productName": "P", **{f"a{i}": "v" for i in range(30)}}
    entry = vm.vendor_entry(
        {"name": "d", "attributes": {"productName": {"string": "m"}, "fabric": {"string": "f"}}},
        many,
    )
    assert len(entry["attributes"]) == 32
    assert all(k in entry["attributes"] for k in many)
    assert entry["attributes"]["uuid"] == {"string": ""}


async def test_a_request_scaled_down_keeps_the_member_a_claim_holds() -> None:
    """CoHDI's request, adopted with two Online members; a pod holds one of them through the
    vendor's device. The request's size goes to 1: the idle member is the one detached, never the
    GPU under the pod (a member held by a claim is kept before any other)."""
    async with vendor_world(gpus=4) as w:
        for gpu, name in (("gpu-1", "gpu-aaaa"), ("gpu-2", "gpu-bbbbb")):
            w.fabric.set(gpu, DeviceState.ATTACHED, "m-node-0")
            w.kube.add(
                RESOURCES,
                {
                    "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
                    "kind": "ComposableResource",
                    "metadata": {
                        "name": name,
                        "labels": {"app.kubernetes.io/managed-by": "composability-x1"},
                        "finalizers": [FINALIZER],
                    },
                    "spec": {"type": "gpu", "model": A100, "target_node": "node-0"},
                    "status": {"state": "Online", "device_id": gpu.upper(), "cdi_device_id": gpu},
                },
            )
        w.kube.add(
            REQUESTS,
            {
                "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
                "kind": "ComposabilityRequest",
                "metadata": {"name": "composability-x1", "finalizers": [FINALIZER]},
                "spec": {
                    "resource": {"type": "gpu", "model": A100, "size": 2, "target_node": "node-0"}
                },
                "status": {"state": "Running"},
            },
        )
        w.kube.add(
            SLICES, _vendor_slice(f"{VENDOR}-node-0", "node-0", {"v0": "GPU-1", "v1": "GPU-2"})
        )
        w.new_claim("c1")
        allocate(w, "c1", "node-0", "v1", "node-0", pooled=False)  # the pod holds GPU-2
        await w.wait(lambda: "gpu-2" in w.role.scaler._held_devices(), "gpu-2 held")
        w.kube.edit(f"{REQUESTS}/composability-x1", lambda o: o["spec"]["resource"].update(size=1))
        await w.wait(lambda: w.fabric.detaches, "a member detached")
        await asyncio.sleep(0.3)
        assert w.fabric.detaches == ["gpu-1"], "the GPU under the pod was detached"
        assert w.fabric.attached_to("gpu-2") == "m-node-0"


def test_a_gpu_the_vendor_offers_on_another_node_is_named() -> None:
    """Our GPU appears in the vendor's slice of another node than the claim's (two Nodes'
    providerIDs swapped: the fabric put it on the machine we mapped to n1, which is n2): still a
    wait — the scheduler's node is n1 — but the decision says where it is, for the operator."""
    claim, b = _claim([])
    d = vm.decide(
        claim,
        b,
        vendor=VENDOR,
        resource=_resource("Online"),
        index={("n2", "gpu-a"): ("n2", "gpu-0")},
    )
    assert d.step == vm.Step.WAIT
    assert d.elsewhere == ("n2",)


async def test_a_gpu_on_another_node_gets_one_warning_event() -> None:
    async with vendor_world() as w:
        w.new_claim("c1")
        allocate(w, "c1", POOL, w.device_name("gpu-1"), "node-0", pooled=True)
        await w.wait(lambda: w.fabric.attached_to("gpu-1"), "gpu-1 attached")
        stand_in_vendor(w, "node-1", "GPU-1")  # the vendor found it on node-1
        await w.wait(lambda: w.events("GPUOnOtherNode"), "the GPUOnOtherNode event")
        (event,) = w.events("GPUOnOtherNode")
        assert "node-1" in event["message"]
        assert "providerID" in event["message"]
        assert vm.RESCHEDULE not in conditions(w, "c1")
