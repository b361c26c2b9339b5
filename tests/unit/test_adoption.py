"""Which deployment acts on a ComposableResource or ComposabilityRequest no deployment has
labelled (CoHDI's operator's, or hand-written): the pure rules `composing.adoption` and
`requests.serves`."""

from __future__ import annotations

import asyncio

import pytest

from agent.kube.resources import FINALIZER, RESOURCES
from agent.model import composing as cm
from agent.model import requests as rq
from agent.model.fabric import DeviceState
from agent.model.objects import DRIVER_LABEL, Obj
from tests.unit import test_cluster_role_fake as fake

# In-memory worlds only: graces, settle periods and backoff pass in virtual time.
pytestmark = pytest.mark.virtualtime


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


async def test_cohdis_orphan_reclaim_resource_takes_its_gpu_not_a_new_one() -> None:
    """CoHDI's upstream syncer leaves, for a GPU attached with no resource, a resource that names
    only a model plus the labels `cohdi.io/ready-to-detach-*`: taken over in its first state, it
    must stand for that GPU (already attached), not get a free one attached."""
    async with fake.world(gpus=3) as w:
        w.fabric.set("gpu-2", DeviceState.ATTACHED, "m-node-0")
        w.kube.add(
            RESOURCES,
            {
                "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
                "kind": "ComposableResource",
                "metadata": {
                    "name": "gpu-6f1c",
                    "labels": {
                        cm.READY_TO_DETACH_DEVICE: "GPU-2",
                        cm.READY_TO_DETACH_CDI_DEVICE: "gpu-2",
                    },
                    "finalizers": [FINALIZER],
                },
                "spec": {"type": "gpu", "model": fake.A100, "target_node": "node-0"},
            },
        )

        def status() -> dict[str, object]:
            return dict((w.resource("gpu-6f1c") or {}).get("status") or {})

        await w.wait(lambda: status().get("state") == "Online", "the resource Online")
        assert status()["cdi_device_id"] == "gpu-2"
        attached = {d for d in w.fabric.devices if w.fabric.attached_to(d)}
        assert attached == {"gpu-2"}, "no other GPU attached for it"


async def test_cohdis_attaching_resource_with_its_ids_keeps_its_gpu() -> None:
    """CoHDI's operator stopped while a resource was `Attaching` with its ids recorded (waiting
    for the vendor's plugin to see the GPU): taken over, it goes Online with that GPU and no
    other is attached."""
    async with fake.world(gpus=3) as w:
        w.fabric.set("gpu-1", DeviceState.ATTACHED, "m-node-1")
        w.kube.add(
            RESOURCES,
            {
                "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
                "kind": "ComposableResource",
                "metadata": {
                    "name": "gpu-a2b7",
                    "labels": {"app.kubernetes.io/managed-by": "composability-x1"},
                    "finalizers": [FINALIZER],
                },
                "spec": {"type": "gpu", "model": fake.A100, "target_node": "node-1"},
                "status": {"state": "Attaching", "device_id": "GPU-1", "cdi_device_id": "gpu-1"},
            },
        )
        await w.wait(
            lambda: ((w.resource("gpu-a2b7") or {}).get("status") or {}).get("state") == "Online",
            "the resource Online",
        )
        attached = {d for d in w.fabric.devices if w.fabric.attached_to(d)}
        assert attached == {"gpu-1"}
        assert w.fabric.attached_to("gpu-1") == "m-node-1"


# --- attacks: CoHDI's resources caught mid-way, deleted before our node role saw them -------------


def _cohdi_resource(name: str, state: str, gpu: str, node: str) -> Obj:
    return {
        "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
        "kind": "ComposableResource",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/managed-by": "composability-x1"},
            "finalizers": [FINALIZER],
        },
        "spec": {"type": "gpu", "model": fake.A100, "target_node": node},
        "status": {"state": state, "device_id": gpu.upper(), "cdi_device_id": gpu},
    }


@pytest.mark.parametrize("state", ["Online", "Detaching"])
async def test_a_cohdi_gpu_deleted_before_our_node_saw_it_waits_for_the_node(state: str) -> None:
    """CoHDI's resource, Online or Detaching (CoHDI's operator was waiting for the GPU's load to
    end), deleted: its GPU is on the node and may be in use through the vendor's driver; our node
    role has not reported it (no NodeReady: CoHDI writes no such condition). It must not be
    detached on the spot as one our node never saw: the node is asked first (NodeReleased), and
    only a node silent for --node-gone-grace is done without."""
    async with fake.world(gpus=3, node_gone_grace=30.0, double=False) as w:
        w.fabric.set("gpu-1", DeviceState.ATTACHED, "m-node-0")
        w.kube.add(RESOURCES, _cohdi_resource("gpu-c0de", state, "gpu-1", "node-0"))
        await w.wait(
            lambda: DRIVER_LABEL in ((w.resource("gpu-c0de") or {})["metadata"].get("labels")),
            "adopted",
        )
        w.kube.remove(f"{RESOURCES}/gpu-c0de")
        await asyncio.sleep(0.5)
        assert w.fabric.attached_to("gpu-1") == "m-node-0", "detached before the node answered"
        assert w.fabric.detaches == []

        # the node role identifies it (by its UUID) and releases it: detached
        def seen(o: Obj) -> None:
            o["status"]["conditions"] = [
                {"type": "NodeReady", "status": "True"},
                {"type": "NodeReleased", "status": "True"},
            ]

        w.kube.edit(f"{RESOURCES}/gpu-c0de", seen)
        await w.wait(lambda: w.resource("gpu-c0de") is None, "detached after the release")
        assert w.fabric.attached_to("gpu-1") is None
