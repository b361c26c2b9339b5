"""Pure decisions: what the pool slices say for each device state, how devices are spread over
slices, and how a claim's status.devices is edited (ours only)."""

from __future__ import annotations

from pathlib import Path

import yaml

from agent.manifests import installing
from agent.model import claims as claimmodel
from agent.model import names
from agent.model import pool as poolmodel
from agent.model.fabric import (
    DeviceId,
    DeviceState,
    FabricId,
    Inventory,
    Machine,
    MachineId,
    PoolDevice,
)

F = FabricId("fab0")


def dev(i: int, state: DeviceState = DeviceState.FREE, machine: str | None = None) -> PoolDevice:
    return PoolDevice(
        DeviceId(f"gpu-{i:05d}"),
        F,
        "A100",
        state,
        machine=MachineId(machine) if machine else None,
        gpu_uuid=f"GPU-{i}",
        memory=2**30,
    )


def inv(*devices: PoolDevice) -> Inventory:
    return Inventory((Machine(MachineId("m0"), "node-0", F, "node-0"),), devices)


def entries(slices: dict[str, list[poolmodel.SliceSpec]]) -> dict[str, dict]:  # type: ignore[type-arg]
    return {d["name"]: d for s in slices["fab0"] for d in s.spec["devices"]}


def test_device_states_map_to_slice_entries() -> None:
    devices = (
        dev(0),
        dev(1, DeviceState.ATTACHED, "m0"),
        dev(2, DeviceState.ATTACHING, "m0"),
        dev(3, DeviceState.ATTACHING, "m0"),
        dev(4, DeviceState.FAILED),
        dev(5, DeviceState.DETACHING, "m0"),
        dev(6),
    )
    out = entries(
        poolmodel.desired_slices(
            driver="d",
            inventory=inv(*devices),
            node_of_machine={"m0": "node-0"},
            pinned=frozenset({"gpu-00003"}),
            withheld=frozenset({"gpu-00006"}),
        )
    )
    free = out["gpu-00000"]
    assert free["bindsToNode"] is True
    assert free["bindingConditions"] == ["FabricDeviceReady"]
    assert free["bindingFailureConditions"] == ["FabricDeviceFailed"]
    exprs = free["nodeSelector"]["nodeSelectorTerms"][0]["matchExpressions"]
    assert {"key": "cohdi.io/fabric", "operator": "In", "values": ["fab0"]} in exprs
    assert free["attributes"]["fabricDeviceId"] == {"string": "gpu-00000"}
    assert free["capacity"]["memory"]["value"] == str(2**30)
    attached = out["gpu-00001"]
    assert attached["nodeName"] == "node-0"
    assert "bindingConditions" not in attached
    assert "bindsToNode" not in attached
    # The attribute a prioritized-list claim selects on to prefer GPUs already on a node.
    assert free["attributes"][poolmodel.ATTACHED_ATTRIBUTE] == {"bool": False}
    assert attached["attributes"][poolmodel.ATTACHED_ATTRIBUTE] == {"bool": True}
    assert out["gpu-00003"]["attributes"][poolmodel.ATTACHED_ATTRIBUTE] == {"bool": False}
    assert "gpu-00002" not in out  # attaching, not for a claim: withheld
    assert out["gpu-00003"]["bindsToNode"] is True  # attaching for a claim: kept as offered
    assert "gpu-00004" not in out  # failed
    assert "gpu-00005" not in out  # detaching
    assert "gpu-00006" not in out  # withheld for scale-down


def test_slices_hold_at_most_128_and_devices_never_move() -> None:
    devices = [dev(i) for i in range(300)]
    a = poolmodel.desired_slices(driver="d", inventory=inv(*devices), node_of_machine={})
    assert [len(s.spec["devices"]) for s in a["fab0"]] == [128, 128, 44]
    assert {s.spec["pool"]["resourceSliceCount"] for s in a["fab0"]} == {3}
    # Withholding a device in the first slice changes that slice only.
    b = poolmodel.desired_slices(
        driver="d", inventory=inv(*devices), node_of_machine={}, withheld=frozenset({"gpu-00005"})
    )
    changed = [x.name for x, y in zip(a["fab0"], b["fab0"], strict=True) if x.spec != y.spec]
    assert changed == [a["fab0"][0].name]


def test_empty_pool_is_still_published() -> None:
    out = poolmodel.desired_slices(driver="d", inventory=inv(), node_of_machine={})
    assert [s.spec["devices"] for s in out["fab0"]] == [[]]


def test_device_pool_and_slice_names_are_kubernetes_names_and_stable() -> None:
    """Names from ids the API server would refuse: lower-cased, cut, and suffixed with a hash of
    the raw id (the rules and the collisions are in test_names.py)."""
    name = poolmodel.device_name("Fabric0/GPU_07")
    assert name == "fabric0-gpu-07-" + names.id_hash("Fabric0/GPU_07")
    long = "x" * 100
    assert len(poolmodel.device_name(long)) == 63
    assert poolmodel.device_name(long) == poolmodel.device_name(long)
    assert poolmodel.device_name(long) != poolmodel.device_name(long + "y")
    out = poolmodel.desired_slices(
        driver="d",
        inventory=Inventory(
            (Machine(MachineId("m0"), "node-0", FabricId("Fabric_1"), "node-0"),),
            (PoolDevice(DeviceId("GPU_0"), FabricId("Fabric_1"), "A100", DeviceState.FREE),),
        ),
        node_of_machine={},
    )
    (pool,) = out
    assert pool == poolmodel.pool_name("Fabric_1") != "Fabric_1"
    assert out[pool][0].spec["pool"]["name"] == pool
    assert out[pool][0].name == poolmodel.slice_name("d", pool, 0)


def claim(devices: list[dict] | None = None) -> dict:  # type: ignore[type-arg]
    return {
        "metadata": {"name": "c", "namespace": "ns", "uid": "u1"},
        "status": {
            "allocation": {
                "allocationTimestamp": "2026-11-26T10:00:00Z",
                "nodeSelector": {
                    "nodeSelectorTerms": [
                        {
                            "matchFields": [
                                {"key": "metadata.name", "operator": "In", "values": ["node-3"]}
                            ]
                        }
                    ]
                },
                "devices": {
                    "results": [
                        {
                            "request": "gpu",
                            "driver": "ours",
                            "pool": "p",
                            "device": "d1",
                            "bindingConditions": ["FabricDeviceReady"],
                            "bindingFailureConditions": ["FabricDeviceFailed"],
                        },
                        {"request": "nic", "driver": "theirs", "pool": "q", "device": "n1"},
                    ]
                },
            },
            "devices": devices or [],
        },
    }


def test_bindings_read_node_and_state() -> None:
    (b,) = claimmodel.bindings(claim(), "ours")
    assert (b.node, b.pool, b.device, b.ready, b.failed) == ("node-3", "p", "d1", False, False)
    assert b.allocated_at > 0
    assert claimmodel.bindings(claim(), "nobody") == []


def test_with_condition_touches_only_our_entry() -> None:
    other = {
        "driver": "theirs",
        "pool": "q",
        "device": "n1",
        "conditions": [{"type": "Ready", "status": "True"}],
        "data": {"x": 1},
    }
    updated = claimmodel.with_condition(
        claim([other]),
        driver="ours",
        pool="p",
        device="d1",
        ctype="FabricDeviceReady",
        reason="Attached",
        message="ok",
        now=1_700_000_000.0,
    )
    assert updated is not None
    entries = updated["status"]["devices"]
    assert entries[0] == other
    assert entries[1]["conditions"][0]["type"] == "FabricDeviceReady"
    (b,) = claimmodel.bindings(updated, "ours")
    assert b.ready
    again = claimmodel.with_condition(
        updated,
        driver="ours",
        pool="p",
        device="d1",
        ctype="FabricDeviceReady",
        reason="Attached",
        message="ok",
        now=1_700_000_000.0,
    )
    assert again is not None
    assert len(again["status"]["devices"][1]["conditions"]) == 1  # replaced, not appended
    assert again["status"]["devices"][1]["conditions"][0]["lastTransitionTime"] == (
        "2023-11-14T22:13:20Z"
    )
    gone = claimmodel.with_condition(
        claim(),
        driver="ours",
        pool="p",
        device="other",
        ctype="FabricDeviceReady",
        reason="x",
        message="y",
        now=1_700_000_000.0,
    )
    assert gone is None


def test_packaging_is_not_stale() -> None:
    root = Path(__file__).resolve().parents[2] / "packaging"
    for name, docs in installing.documents("composable.cohdi.io").items():
        assert (root / name).read_text() == installing.render(docs), (
            f"packaging/{name} is stale: run `cohdi-agent manifests`"
        )
        assert list(yaml.safe_load_all((root / name).read_text())) == docs
