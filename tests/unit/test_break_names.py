"""Names the API server refuses or that collide, found by trying to break issue 10's "one
normalisation, always valid, never colliding" after node-local pools (`<fabric pool>/<node>`)
came in. Each test is marked `xfail(strict=True)` until the defect is fixed.

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


@pytest.mark.xfail(
    strict=True,
    reason="node_pool_name is f'{pool_name(fabric)}/{node}' with no limit on the whole: a long "
    "fabric id (its pool name cut to 253) or a long node name gives a pool name over 253 bytes, "
    "which the API server refuses (422), and the node's attached GPUs are offered nowhere",
)
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


@pytest.mark.xfail(
    strict=True,
    reason="a fabric id that is a valid pool name with a '/' is used verbatim as its pool, so "
    "fabric 'a/b' and the node pool of fabric 'a' on node 'b' are the same pool (and the same "
    "slice names): the normalisation's 'distinct ids never collide' does not hold across the two "
    "kinds of pool (contrived: the FTI API would have to report such a fabric id)",
)
def test_a_fabric_pool_never_shares_its_name_with_a_node_pool() -> None:
    assert poolmodel.pool_name(FabricId("a/b")) != poolmodel.node_pool_name(FabricId("a"), "b")
