"""Which Kubernetes Node is which fabric machine.

Three ways, strongest first; a machine or a node taken by a stronger way is not matched again:

1. `spec.providerID` `<scheme>://<...>/<machine id>` with a configured scheme (CoHDI's
   `fsas-cdi://<machine uuid>`): the last `/`-segment is the machine id, as CoHDI normalises it.
2. A node label or annotation (configured keys, `cohdi.io/machine` by default) whose value is the
   machine id.
3. The node's name equals (case-insensitively: fabrics report host names in any case) the
   machine's host name (`Machine.node_name`), its name or its id.

Machine ids are compared case-insensitively in all three (a UUID is the same UUID in upper case,
RFC 9562 §4). When two nodes name one machine the same way, the older Node (creationTimestamp,
then name) has it, whatever order the nodes come in: an informer lists them in another order
after a restart, and the machine — with the GPUs attached to it — must not move to the other
node then.

A node that carries a fabric identity (a providerID of a configured scheme, or one of the keys)
which names no machine is *unmapped*: `NodeMap.unmapped` says why, for an Event. A node with no
such identity that matches no name is simply not on the fabric (a control-plane node, a CPU
node) and is not reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from agent.model.fabric import Machine

#: CoHDI's provider-id scheme (`fsas-cdi://<machine uuid>`).
COHDI_SCHEME: Final = "fsas-cdi"
#: The label/annotation that names a node's machine when its providerID cannot.
MACHINE_KEY: Final = "cohdi.io/machine"


@dataclass(frozen=True, slots=True)
class NodeMapping:
    """How nodes are matched to machines (settings: --node-provider-schemes,
    --node-machine-keys)."""

    schemes: tuple[str, ...] = (COHDI_SCHEME,)
    keys: tuple[str, ...] = (MACHINE_KEY,)


@dataclass(frozen=True, slots=True)
class NodeMap:
    #: machine id -> node name
    node_of: dict[str, str] = field(default_factory=dict)
    #: machine id -> how it was matched: "providerID", "label", "annotation" or "name"
    how: dict[str, str] = field(default_factory=dict)
    #: node name -> why its fabric identity names no machine
    unmapped: dict[str, str] = field(default_factory=dict)


def provider_machine(provider_id: str, schemes: Iterable[str]) -> str | None:
    """The machine id in a providerID of one of `schemes` (the last non-empty `/`-segment after
    `<scheme>://`), else None: `fsas-cdi://U` → `U`, `fsas-cdi:///zone/U` → `U`."""
    scheme, sep, rest = provider_id.partition("://")
    if not sep or scheme.lower() not in {s.lower() for s in schemes}:
        return None  # (a URI scheme is case-insensitive: RFC 3986 §3.1)
    segments = [s for s in rest.split("/") if s]
    return segments[-1] if segments else None


def _meta(node: Mapping[str, Any], kind: str) -> Mapping[str, str]:
    return ((node.get("metadata") or {}).get(kind)) or {}


def keyed_machine(node: Mapping[str, Any], keys: Iterable[str]) -> tuple[str, str] | None:
    """(machine id, "label" | "annotation") from the first of `keys` the node carries, labels
    before annotations; None when it carries none."""
    for key in keys:
        for kind, word in (("labels", "label"), ("annotations", "annotation")):
            value = _meta(node, kind).get(key)
            if value:
                return value, word
    return None


def _seniority(node: Mapping[str, Any]) -> tuple[str, str]:
    """Sort key, older Nodes first: (creationTimestamp, name). RFC 3339 UTC timestamps as the
    API server writes them (`2026-01-01T00:00:00Z`) sort as strings; a Node without one (a test's
    hand-made object) sorts by name among the others without one, before them."""
    meta = node.get("metadata") or {}
    return str(meta.get("creationTimestamp") or ""), str(meta.get("name") or "")


def map_nodes(
    machines: Iterable[Machine], nodes: Iterable[Mapping[str, Any]], mapping: NodeMapping
) -> NodeMap:
    """Match `nodes` (Node objects) to `machines`; see the module's docstring for the order."""
    by_id = {m.id.lower(): m for m in machines}
    node_list = sorted((n for n in nodes if (n.get("metadata") or {}).get("name")), key=_seniority)
    node_of: dict[str, str] = {}
    how: dict[str, str] = {}
    taken: set[str] = set()  # node names already matched
    unmapped: dict[str, str] = {}

    def take(machine: str, node: str, way: str) -> None:
        node_of[machine], how[machine] = node, way
        taken.add(node)
        unmapped.pop(node, None)

    for n in node_list:  # 1. providerID
        name = n["metadata"]["name"]
        pid = (n.get("spec") or {}).get("providerID") or ""
        named = provider_machine(pid, mapping.schemes)
        if named is None:
            continue
        m = by_id.get(named.lower())
        if m is not None and m.id not in node_of:
            take(m.id, name, "providerID")
        elif m is not None:
            unmapped[name] = f"providerID {pid} names machine {m.id}, already node {node_of[m.id]}"
        else:
            unmapped[name] = f"providerID {pid} names no machine of the fabric"
    for n in node_list:  # 2. label / annotation
        name = n["metadata"]["name"]
        found = keyed_machine(n, mapping.keys)
        if name in taken or found is None:
            continue
        named, word = found
        m = by_id.get(named.lower())
        if m is not None and m.id not in node_of:
            take(m.id, name, word)
        elif name not in unmapped:
            unmapped[name] = f"{word} machine={named} names no free machine of the fabric"
    lowered = {n["metadata"]["name"].lower(): n["metadata"]["name"] for n in node_list}
    for m in by_id.values():  # 3. names
        if m.id in node_of:
            continue
        for candidate in (m.node_name, m.name, m.id):
            name = lowered.get(candidate.lower()) if candidate else None
            if name is not None and name not in taken:
                take(m.id, name, "name")
                break
    return NodeMap(node_of, how, unmapped)
