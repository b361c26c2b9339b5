"""Which deployment acts on a ComposableResource or ComposabilityRequest no deployment has
labelled (CoHDI's operator's, or hand-written): the pure rules `composing.adoption` and
`requests.serves`."""

from __future__ import annotations

import pytest

from agent.model import composing as cm
from agent.model import requests as rq
from agent.model.objects import DRIVER_LABEL, Obj


def _obj(label: str | None = None) -> Obj:
    labels = {DRIVER_LABEL: label} if label is not None else {}
    return {"metadata": {"name": "x", "labels": labels}}


@pytest.mark.parametrize(
    ("label", "serves", "waited", "verdict", "after"),
    [
        ("ours", False, 0.0, cm.Adoption.OURS, 0.0),
        ("other", True, 99.0, cm.Adoption.FOREIGN, 0.0),
        (None, True, 0.0, cm.Adoption.LABEL, 0.0),
        (None, False, 4.0, cm.Adoption.WAIT, 6.0),
        (None, False, 10.0, cm.Adoption.UNCLAIMED, 0.0),
    ],
)
def test_adoption(
    label: str | None, serves: bool, waited: float, verdict: cm.Adoption, after: float
) -> None:
    got = cm.adoption(_obj(label), "ours", serves=serves, unclaimed_for=waited, grace=10.0)
    assert got == (verdict, after)


FABRIC = rq.Fabric({"n1": "f1", "n2": "f1"}, {("f1", "A100"): 4}, {("f1", "A100"): 2})


def _want(model: str = "A100", node: str = "") -> rq.Want:
    return rq.Want.of({"type": "gpu", "model": model, "size": 1, "target_node": node})


def _member(node: str) -> rq.Member:
    return rq.Member(name=f"m-{node}", node=node, type="gpu", model="A100")


def test_a_request_is_ours_to_serve_by_its_node_its_members_or_its_model() -> None:
    assert rq.serves(_want(node="n1"), FABRIC, [])
    assert not rq.serves(_want(node="n9"), FABRIC, [])
    assert rq.serves(_want(), FABRIC, [_member("n2")])
    assert not rq.serves(_want(), FABRIC, [_member("n9")]), "its members are elsewhere"
    assert rq.serves(_want(), FABRIC, [])
    assert not rq.serves(_want(model="H100"), FABRIC, [])
    assert not rq.serves(_want(), rq.Fabric({}), [])
