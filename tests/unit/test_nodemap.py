"""Node ↔ machine mapping (agent.model.nodemap): providerID, then label/annotation, then name; and,
on the cluster role over the in-memory API server, the NodeNotMapped Event told once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.model import pool as poolmodel
from agent.model.fabric import FabricId, Machine, MachineId
from agent.model.nodemap import NodeMap, NodeMapping, map_nodes, provider_machine
from tests.unit.test_cluster_role_fake import NODES, world

U1 = "0b5e2c1a-0000-4000-8000-000000000001"
U2 = "0b5e2c1a-0000-4000-8000-000000000002"
DEFAULT = NodeMapping()


def machine(mid: str, name: str = "", host: str = "") -> Machine:
    return Machine(MachineId(mid), name or mid, FabricId("f0"), host)


def node(
    name: str,
    *,
    provider: str = "",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
        "spec": {},
    }
    if provider:
        obj["spec"]["providerID"] = provider
    return obj


@pytest.mark.parametrize(
    ("provider", "want"),
    [
        (f"fsas-cdi://{U1}", U1),
        (f"fsas-cdi:///zone-a/{U1}", U1),
        (f"fsas-cdi://{U1}/", U1),
        (f"FSAS-CDI://{U1}", U1),  # a URI scheme is case-insensitive (RFC 3986 §3.1)
        ("fsas-cdi://", None),
        (f"aws:///us-east-1a/{U1}", None),
        (U1, None),
        ("", None),
    ],
)
def test_provider_machine_is_the_last_segment_of_a_known_scheme(
    provider: str, want: str | None
) -> None:
    assert provider_machine(provider, ("fsas-cdi",)) == want


def test_provider_id_maps_nodes_whose_names_are_not_machine_ids() -> None:
    got = map_nodes(
        [machine(U1, "cdi-host-1"), machine(U2, "cdi-host-2")],
        [
            node("worker-a", provider=f"fsas-cdi://{U2}"),
            node("worker-b", provider=f"fsas-cdi://{U1}"),
        ],
        DEFAULT,
    )
    assert got == NodeMap(
        {U2: "worker-a", U1: "worker-b"}, {U2: "providerID", U1: "providerID"}, {}
    )


def test_a_configured_scheme_and_keys() -> None:
    mapping = NodeMapping(schemes=("baremetal",), keys=("example.com/host",))
    got = map_nodes(
        [machine(U1), machine(U2)],
        [
            node("a", provider=f"baremetal://rack1/{U1}"),
            node("b", provider=f"fsas-cdi://{U2}"),  # not a configured scheme
            node("c", annotations={"example.com/host": U2}),
        ],
        mapping,
    )
    assert got.node_of == {U1: "a", U2: "c"}
    assert got.how == {U1: "providerID", U2: "annotation"}


def test_order_provider_id_then_label_then_annotation_then_name() -> None:
    machines = [machine(U1, "n-name"), machine(U2, "n-label")]
    # n-label carries a label naming U1 and is named like U2's machine; n-pid's providerID says U1
    nodes = [
        node("n-label", labels={"cohdi.io/machine": U1}),
        node("n-pid", provider=f"fsas-cdi://{U1}"),
    ]
    got = map_nodes(machines, nodes, DEFAULT)
    # providerID wins U1; the label then names a machine already taken; the name match gives U2
    assert got.node_of == {U1: "n-pid", U2: "n-label"}
    assert got.how == {U1: "providerID", U2: "name"}
    assert got.unmapped == {}
    both = node("n", labels={"cohdi.io/machine": U1}, annotations={"cohdi.io/machine": U2})
    assert map_nodes(machines, [both], DEFAULT).how == {U1: "label"}


def test_by_name_as_before_case_insensitive_host_then_name_then_id() -> None:
    machines = [
        machine("m-1", "Node-One"),
        machine("m-2", "other", host="NODE-TWO"),
        machine("node-three"),
    ]
    got = map_nodes(
        machines, [node("node-one"), node("node-two"), node("node-three"), node("cp")], DEFAULT
    )
    assert got.node_of == {"m-1": "node-one", "m-2": "node-two", "node-three": "node-three"}
    assert got.unmapped == {}  # cp has no fabric identity: not on the fabric, not reported


def test_unmapped_nodes_say_why() -> None:
    got = map_nodes(
        [machine(U1)],
        [
            node("a", provider=f"fsas-cdi://{U1}"),
            node("b", provider=f"fsas-cdi://{U1}"),
            node("c", provider="fsas-cdi://no-such-machine"),
            node("d", labels={"cohdi.io/machine": "gone"}),
        ],
        DEFAULT,
    )
    assert got.node_of == {U1: "a"}
    assert got.unmapped == {
        "b": f"providerID fsas-cdi://{U1} names machine {U1}, already node a",
        "c": "providerID fsas-cdi://no-such-machine names no machine of the fabric",
        "d": "label machine=gone names no free machine of the fabric",
    }


def test_a_one_machine_is_one_node() -> None:
    got = map_nodes(
        [machine(U1, "x")], [node("x"), node("X2", provider=f"fsas-cdi://{U1}")], DEFAULT
    )
    assert got.node_of == {U1: "X2"}


# --- on the cluster role --------------------------------------------------------------------------


async def test_publisher_maps_by_provider_id_and_tells_an_unmapped_node_once() -> None:
    """A node named unlike its machine, found by providerID (stronger than the name match the
    fake fabric's machine names would give node-1): labelled with its fabric. A node whose
    providerID names no machine gets one NodeNotMapped Event, however many passes follow."""
    async with world(nodes=2, gpus=2) as w:
        for name, provider in (("gpu-host-b", "fsas-cdi://m-node-1"), ("stray", "fsas-cdi://nope")):
            w.kube.add(
                NODES,
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": name, "labels": {}},
                    "spec": {"providerID": provider},
                },
            )

        def labelled() -> bool:
            obj = w.kube.get_obj(f"{NODES}/gpu-host-b") or {}
            return poolmodel.FABRIC_LABEL in (obj["metadata"].get("labels") or {})

        await w.wait(labelled, "gpu-host-b labelled with its fabric")
        assert w.role.publisher.node_of_machine() == {
            "m-node-0": "node-0",
            "m-node-1": "gpu-host-b",
        }
        await w.wait(lambda: w.events("NodeNotMapped"), "the NodeNotMapped event")
        for _ in range(5):  # more passes: the publisher syncs again and again
            w.role.publisher.changed()
            await asyncio.sleep(0.1)
        events = w.events("NodeNotMapped")
        assert len(events) == 1
        assert events[0]["involvedObject"]["name"] == "stray"
        assert "providerID fsas-cdi://nope names no machine of the fabric" in events[0]["message"]


# --- attacks: contested identities, odd provider ids ----------------------------------------------


def aged(obj: dict[str, Any], created: str) -> dict[str, Any]:
    obj["metadata"]["creationTimestamp"] = created
    return obj


@pytest.mark.parametrize("way", ["providerID", "label"])
def test_two_nodes_claiming_one_machine_map_the_same_way_in_any_order(way: str) -> None:
    """Two Nodes that both name one machine: one of them gets it, and always the same one —
    the older Node (the one that had it before the other appeared), whatever order the informer
    lists them in (a watch appends a new Node; a relist after a restart sorts by name). An order-
    dependent winner moved the machine, and the GPUs attached to it, to the other node on
    restart."""

    def claimant(name: str) -> dict[str, Any]:
        if way == "providerID":
            return node(name, provider=f"fsas-cdi://{U1}")
        return node(name, labels={"cohdi.io/machine": U1})

    old = aged(claimant("zz-old"), "2026-01-01T00:00:00Z")
    new = aged(claimant("aa-new"), "2026-06-01T00:00:00Z")
    for order in ([old, new], [new, old]):
        got = map_nodes([machine(U1)], order, DEFAULT)
        assert got.node_of == {U1: "zz-old"}
        assert set(got.unmapped) == {"aa-new"}


@pytest.mark.parametrize(
    "provider",
    [f"fsas-cdi://{U1.upper()}", f"fsas-cdi://{U1.upper()}/", f"fsas-cdi:///zone/{U1.upper()}"],
)
def test_a_provider_id_uuid_in_upper_case_is_the_machine(provider: str) -> None:
    """UUIDs are case-insensitive (RFC 9562 §4): `fsas-cdi://<UUID in upper case>` is the
    machine the fabric names in lower case, not "no machine of the fabric"."""
    got = map_nodes([machine(U1)], [node("w", provider=provider)], DEFAULT)
    assert got.node_of == {U1: "w"}
    assert got.how == {U1: "providerID"}
    assert got.unmapped == {}


def test_a_machine_key_in_another_case_is_the_machine_and_still_one_node_per_machine() -> None:
    got = map_nodes(
        [machine(U1)],
        [
            aged(node("a", labels={"cohdi.io/machine": U1.upper()}), "2026-01-01T00:00:00Z"),
            aged(node("b", provider=f"fsas-cdi://{U1}"), "2026-01-02T00:00:00Z"),
        ],
        DEFAULT,
    )
    assert got.node_of == {U1: "b"}  # providerID is stronger than a label
    assert set(got.unmapped) == {"a"}
