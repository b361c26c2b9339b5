"""Node limits from the FTI cluster manager: the emulator's node groups, read by our client through
the FM token, written as the nodes' cohdi.io/min-devices / max-devices labels (where the scaler
reads node limits), for nodes found by providerID; changed and removed when the CM changes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent import errors
from agent.controllers.cmlimits import CmLimits
from agent.controllers.publishing import NODES, SLICES, Publisher
from agent.fabric.cm import ClusterManager, ModelLimits, parse_resspecs
from agent.fabric.credentials import Secret
from agent.fabric.emulator import cm_api
from agent.fabric.emulator import config as emuconfig
from agent.fabric.emulator.cm_api import ClusterManagerConfig, NodeGroup, ResSpec
from agent.fabric.emulator.config import DEFAULT_TENANT
from agent.fabric.emulator.server import EmulatorServer
from agent.fabric.fti import FtiFabric
from agent.fabric.transport import FabricHttp
from agent.kube.watching import Informer
from agent.model.scaling import MAX_LABEL, MIN_LABEL, node_limit
from agent.testing.fakekube import FakeKube
from tests.waiting import until

PASSWORD = "cm-pass-1"
CLUSTER = "6c0e1c2a-2222-4a4a-8b8b-0123456789ab"
U = [f"7d7d7d7d-0000-4000-8000-00000000000{i}" for i in range(3)]


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[EmulatorServer, FakeKube, CmLimits]]:
    conf = emuconfig.parse(
        {
            "machines": [{"id": u, "name": f"host-{i}", "fabric": "f"} for i, u in enumerate(U)],
            "devices": [
                {"model": "A100", "count": 2, "fabric": "f"},
                {"model": "H100", "count": 2, "fabric": "f"},
            ],
            "users": [{"name": "admin", "password": PASSWORD}],
        }
    )
    cm = ClusterManagerConfig(
        cluster=CLUSTER,
        groups=[
            NodeGroup(
                "ng-1",
                "gpu-workers",
                (U[0], U[1]),
                (ResSpec("A100", min=1, max=2), ResSpec("H100", min=0, max=3)),
            )
        ],
    )
    server = EmulatorServer(conf, tls_dir=tmp_path / "tls", cluster_manager=cm)
    await server.start()
    kube = FakeKube(bookmark_interval=60)
    for i, u in enumerate(U):
        kube.add(
            NODES,
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": f"worker-{i}", "labels": {MAX_LABEL: "9"}},
                "spec": {"providerID": f"fsas-cdi://{u}"},
            },
        )
    fabric = FtiFabric(
        FabricHttp(base_url=server.url, ca_bundle=str(server.ca_file), timeout=5, retries=2),
        user="admin",
        password=Secret(PASSWORD),
        tenant=DEFAULT_TENANT,
        models=("A100", "H100"),
    )
    nodes = Informer(kube, NODES, name="nodes")  # type: ignore[arg-type]
    slices = Informer(kube, SLICES, name="slices")  # type: ignore[arg-type]
    publisher = Publisher(kube, driver="t.cohdi.io", slices=slices, nodes=nodes)  # type: ignore[arg-type]
    task = asyncio.create_task(nodes.run())
    await nodes.synced.wait()
    publisher.inventory = await fabric.inventory()
    limits = CmLimits(kube, ClusterManager(fabric, CLUSTER), publisher, interval=0.1)  # type: ignore[arg-type]
    try:
        yield server, kube, limits
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await fabric.close()
        await server.stop()


def labels(kube: FakeKube, node: str) -> dict[str, Any]:
    obj = kube.get_obj(f"{NODES}/{node}")
    assert obj is not None
    return dict(obj["metadata"].get("labels") or {})


async def test_cm_bounds_become_node_limits(
    setup: tuple[EmulatorServer, FakeKube, CmLimits],
) -> None:
    server, kube, limits = setup
    await limits.sync()
    for node in ("worker-0", "worker-1"):
        # A100 1..2 + H100 0..3 -> the node holds 1..5 devices
        obj = kube.get_obj(f"{NODES}/{node}")
        assert (node_limit(obj, MIN_LABEL), node_limit(obj, MAX_LABEL)) == (1, 5)
    # worker-2's machine is in no node group: its own label stays
    assert labels(kube, "worker-2")[MAX_LABEL] == "9"
    assert MIN_LABEL not in labels(kube, "worker-2")

    # the CM changes: H100 loses its bound (null) -> no max for the node any more
    server.cluster_manager.groups[0] = NodeGroup(
        "ng-1", "gpu-workers", (U[0], U[1]), (ResSpec("A100", 2, 2), ResSpec("H100", 0, None))
    )
    await asyncio.sleep(0.05)  # the informer sees our own writes
    await limits.sync()
    await asyncio.sleep(0.05)
    assert labels(kube, "worker-0").get(MIN_LABEL) == "2"
    assert MAX_LABEL not in labels(kube, "worker-0")
    writes = len(kube.requests)
    assert any(r.method == "PATCH" and r.path.endswith("/worker-0") for r in kube.requests)
    await limits.sync()  # nothing changed: nothing written
    assert [r.path for r in kube.requests[writes:] if r.method == "PATCH"] == []
    assert limits.passes == 3


def test_node_groups_from_the_emulators_file(tmp_path: Path) -> None:
    path = tmp_path / "emulator.yaml"
    path.write_text(
        "machines: [{id: m-1, name: n1, fabric: f}]\n"
        "cluster_manager:\n"
        f"  cluster: {CLUSTER}\n"
        "  node_groups:\n"
        "    - {uuid: ng-1, name: gpu, machines: [m-1],\n"
        "       resspecs: [{model: A100, min: 0, max: 2}]}\n"
    )
    got = cm_api.from_file(path)
    assert got.cluster == CLUSTER
    assert got.groups == [NodeGroup("ng-1", "gpu", ("m-1",), (ResSpec("A100", 0, 2),))]
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "cluster_manager:\n"
        "  node_groups: [{uuid: g, machines: [m], resspecs: [{model: A, max: -1}]}]\n"
    )
    with pytest.raises(emuconfig.EmulatorConfigError, match=r"node_groups\[0\].resspecs"):
        cm_api.from_file(bad)


def _machine_doc(*specs: tuple[Any, Any]) -> dict[str, Any]:
    return {
        "data": {
            "cluster": {
                "machine": {
                    "resspecs": [
                        {
                            "selector": {
                                "expression": {
                                    "conditions": [
                                        {"column": "model", "operator": "eq", "value": f"M{i}"}
                                    ]
                                }
                            },
                            "min_resspec_count": low,
                            "max_resspec_count": high,
                        }
                        for i, (low, high) in enumerate(specs)
                    ]
                }
            }
        }
    }


def test_a_minimum_above_the_maximum_is_refused_naming_the_resspec() -> None:
    """min 3 > max 1 for one model: no bound can honour both (the node would get
    min-devices 3, max-devices 1 and the scaler a floor above its cap); the answer is refused
    naming the resspec, and the labels stay as they were (`CmLimits.run` logs it)."""
    assert parse_resspecs(_machine_doc((1, 2), (0, None)), where="m") == {
        "M0": ModelLimits(1, 2),
        "M1": ModelLimits(0, None),
    }
    with pytest.raises(errors.FabricProtocolError, match=r"m: resspecs\[1\].*3.*1"):
        parse_resspecs(_machine_doc((1, 2), (3, 1)), where="m")


@pytest.mark.parametrize(
    "conditions",
    [["model"], {"column": "model", "value": "M0"}, [None], "model"],
    ids=["text-item", "object-not-list", "null-item", "text"],
)
def test_a_resspec_of_an_odd_shape_is_a_protocol_error(conditions: Any) -> None:
    """Anything but the error tree stops the limits loop (`CmLimits.run` retries AgentErrors
    only): an odd cluster-manager answer must be a FabricProtocolError naming the resspec."""
    doc = _machine_doc((1, 2))
    doc["data"]["cluster"]["machine"]["resspecs"][0]["selector"]["expression"]["conditions"] = (
        conditions
    )
    with pytest.raises(errors.FabricProtocolError, match=r"m: resspecs\[0\]"):
        parse_resspecs(doc, where="m")


async def _until(probe: Any, what: str) -> None:
    async def check() -> Any:
        return probe()

    await until(check, what=what, timeout=10.0, interval=0.02)


async def test_a_cluster_manager_in_error_leaves_the_labels_and_the_loop_goes_on(
    setup: tuple[EmulatorServer, FakeKube, CmLimits],
) -> None:
    """Good bounds written; then the cluster manager answers min 3 > max 1, then an error (an
    unknown cluster: 404): the labels stay as they were, the error is kept for the log, and the
    loop keeps reading — the next good answer is written."""
    server, kube, limits = setup
    task = asyncio.create_task(limits.run())
    try:
        await _until(lambda: labels(kube, "worker-0").get(MAX_LABEL) == "5", "the first bounds")
        before = labels(kube, "worker-0")
        assert before[MIN_LABEL] == "1"
        server.cluster_manager.groups[0] = NodeGroup(
            "ng-1", "gpu-workers", (U[0], U[1]), (ResSpec("A100", 3, 1), ResSpec("H100", 0, 3))
        )
        await _until(lambda: "max_resspec_count 1" in limits.error, "min > max refused")
        assert labels(kube, "worker-0") == before
        limits.cm.cluster = "00000000-0000-4000-8000-000000000000"
        await _until(lambda: "404" in limits.error, "the unknown cluster's 404")
        assert labels(kube, "worker-0") == before
        assert not task.done()
        limits.cm.cluster = CLUSTER
        server.cluster_manager.groups[0] = NodeGroup(
            "ng-1", "gpu-workers", (U[0], U[1]), (ResSpec("A100", 2, 2), ResSpec("H100", 0, 3))
        )
        await _until(lambda: labels(kube, "worker-0").get(MIN_LABEL) == "2", "good bounds again")
        assert limits.error == ""
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_machine_that_leaves_its_node_group_loses_the_limits_the_cm_gave(
    setup: tuple[EmulatorServer, FakeKube, CmLimits],
) -> None:
    """worker-1's machine leaves the node group: the bounds the cluster manager wrote on it are
    removed (they are no one's word any more), while worker-2's own label — never the cluster
    manager's — stays."""
    server, kube, limits = setup
    await limits.sync()
    assert labels(kube, "worker-1")[MAX_LABEL] == "5"
    server.cluster_manager.groups[0] = NodeGroup(
        "ng-1", "gpu-workers", (U[0],), (ResSpec("A100", 1, 2), ResSpec("H100", 0, 3))
    )
    await asyncio.sleep(0.05)
    await limits.sync()
    await _until(lambda: MAX_LABEL not in labels(kube, "worker-1"), "worker-1's bounds removed")
    assert MIN_LABEL not in labels(kube, "worker-1")
    assert labels(kube, "worker-0")[MAX_LABEL] == "5"
    assert labels(kube, "worker-2")[MAX_LABEL] == "9", "its own label, not the CM's"
