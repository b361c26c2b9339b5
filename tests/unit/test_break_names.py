"""Names the API server refuses or that collide, found by trying to break issue 10's "one
normalisation, always valid, never colliding" after node-local pools (`<fabric pool>/<node>`)
came in. Each failed before its fix and now guards it.

Seen on the real control plane (`cohdi-agent fabric-emulator` with a 300-character fabric id,
`cohdi-agent run --roles cluster`): the fabric pool publishes (its name is cut to 253 with a
hash), a claim is served, and when the claim ends and its GPU moves to the node's own pool the
slice is refused: `422 ... spec.pool.name: Too long: may not be more than 253 bytes`; /readyz says
`publishing failed` from then on and the idle GPU is offered in no pool.
"""

from __future__ import annotations

import pytest

from agent.model import pool as poolmodel
from agent.model.fabric import FabricId
from tests.unit.test_names import k8s_pool_name

#: A node name at the length Kubernetes allows (a DNS subdomain of 253 characters).
LONG_NODE = ".".join(["n" * 63] * 4)[:253].rstrip(".")


@pytest.mark.parametrize(
    ("fabric", "node"),
    [
        ("Fabric.Ünïcode_" + "x" * 300, "brk-0"),  # the one seen on the real control plane
        ("fabric0", LONG_NODE),
    ],
)
def test_node_pool_names_are_valid_pool_names(fabric: str, node: str) -> None:
    name = poolmodel.node_pool_name(FabricId(fabric), node)
    assert k8s_pool_name(name), (len(name), name[-40:])


def test_a_fabric_pool_never_shares_its_name_with_a_node_pool() -> None:
    assert poolmodel.pool_name(FabricId("a/b")) != poolmodel.node_pool_name(FabricId("a"), "b")
