"""Fabric ids the API server would refuse as names, on the real control plane: device ids that
differ only in case or separators (`GPU_0` / `gpu-0`), on a fabric whose id is no DNS name
(`Fabric_1`). Before one normalisation with a hash of the raw id, the pool's slice was refused
with 422 `Duplicate value` (or the pool name as invalid) and the cluster role exited: nothing was
published. Now every device is published once, the nodes get a valid fabric label, and a claim
for one of those devices is allocated, attached and ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.controllers.publishing import SLICES
from agent.devcluster.controlplane import ControlPlane
from agent.fabric.emulator import config as emuconfig
from agent.fabric.emulator.server import EmulatorServer
from agent.kube.client import Kube
from agent.kube.resources import RESOURCES, resource_name
from agent.manifests import installing
from agent.model import claims as claimmodel
from agent.model import names
from agent.model import pool as poolmodel
from agent.model.fabric import DeviceState
from agent.testing.nodereport import NodeDouble
from tests.cluster.conftest import (
    A100,
    CLAIMS,
    NODES,
    PASSWORD,
    PODS,
    World,
    _cleanup,
    make_node,
    world_config,
)
from tests.unit.test_names import k8s_dns_label, k8s_dns_subdomain, k8s_label_value, k8s_pool_name
from tests.waiting import until

pytestmark = pytest.mark.controlplane

FABRIC = "Fabric_1"
COLLIDING = ["GPU_0", "gpu-0", "GPU-A", "gpu-a", "gpu.b", "gpu_b"]
#: Upper case, spaces, 90 characters: cut to 63 with a hash.
LONG = "Rack 7 GPU " + "X" * 79
IDS = [*COLLIDING, LONG]


@pytest.fixture
async def named_world(
    control_plane: ControlPlane, kube: Kube, tmp_path: Path
) -> AsyncIterator[World]:
    suffix = uuid.uuid4().hex[:6]
    driver = f"t{suffix}.cohdi.io"
    nodes = [f"n{suffix}-{i}" for i in range(2)]
    await installing.install(kube, driver)
    for node in nodes:
        await make_node(kube, node, {"test-world": suffix})
    conf = emuconfig.parse(
        {
            "machines": [{"id": f"m-{n}", "name": n, "fabric": FABRIC} for n in nodes],
            "devices": [
                {
                    "model": A100,
                    "count": len(IDS),
                    "ids": IDS,
                    "fabric": FABRIC,
                    "memory": 40 * 2**30,
                }
            ],
            "users": [{"name": "admin", "password": PASSWORD}],
        }
    )
    emulator = EmulatorServer(conf, tls_dir=tmp_path / "tls", state_file=tmp_path / "fabric.json")
    await emulator.start()
    w = World(kube, emulator, world_config(driver, suffix), driver, nodes, suffix)
    w.tasks.append(asyncio.create_task(NodeDouble(kube, set(nodes)).run()))
    try:
        yield w
    finally:
        for t in w.tasks:
            t.cancel()
        await asyncio.gather(*w.tasks, return_exceptions=True)
        if w.role is not None:
            await w.role.fabric.close()
        await emulator.stop()
        await _cleanup(kube, w)
        with contextlib.suppress(Exception):
            for s in (await kube.get(SLICES))["items"]:
                if s["spec"]["driver"] == driver:
                    await kube.delete(f"{SLICES}/{s['metadata']['name']}")


async def test_colliding_fabric_ids_publish_and_allocate(named_world: World) -> None:
    w = named_world
    role = await w.start_role()
    role_task = w.tasks[-1]
    synced = asyncio.create_task(role.publisher.synced.wait())
    done, _ = await asyncio.wait({synced, role_task}, timeout=60, return_when="FIRST_COMPLETED")
    if role_task in done:  # the 422 this test is about ends the role: show why
        role_task.result()
    assert synced in done, "the publisher did not sync within 60 s"

    # every device published once, by a valid name, in a pool with a valid name
    slices = [s for s in (await w.kube.get(SLICES))["items"] if s["spec"]["driver"] == w.driver]
    pools = {s["spec"]["pool"]["name"] for s in slices}
    assert pools == {poolmodel.pool_name(FABRIC)}
    assert all(k8s_pool_name(p) for p in pools)
    assert all(k8s_dns_subdomain(s["metadata"]["name"]) for s in slices)
    entries = [d for s in slices for d in s["spec"]["devices"]]
    by_raw = {d["attributes"][poolmodel.DEVICE_ID_ATTRIBUTE]["string"]: d for d in entries}
    assert len(entries) == len(IDS)
    assert set(by_raw) == {names.attribute_string(i) for i in IDS}
    assert len({d["name"] for d in entries}) == len(IDS)
    assert all(k8s_dns_label(d["name"]) for d in entries)
    assert all(d["attributes"]["fabric"]["string"] == FABRIC for d in entries)
    print("published:", {raw: d["name"] for raw, d in by_raw.items()}, "pool:", pools)

    for node in w.nodes:
        labels = (await w.kube.get(f"{NODES}/{node}"))["metadata"]["labels"]
        assert labels.get(poolmodel.FABRIC_LABEL) == poolmodel.fabric_label(FABRIC)
        assert k8s_label_value(labels[poolmodel.FABRIC_LABEL])

    # a claim for exactly the device whose id is only valid after normalisation
    name = f"p{w.suffix}-gpu0"
    expr = f'device.attributes["{w.driver}"].{poolmodel.DEVICE_ID_ATTRIBUTE} == "GPU_0"'
    claim = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name},
        "spec": {
            "devices": {
                "requests": [
                    {
                        "name": "gpu",
                        "exactly": {
                            "deviceClassName": w.device_class,
                            "selectors": [{"cel": {"expression": expr}}],
                        },
                    }
                ]
            }
        },
    }
    await w.kube.create(CLAIMS, claim)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [
                {"name": "cuda", "image": "nvidia/cuda", "resources": {"claims": [{"name": "gpu"}]}}
            ],
            "resourceClaims": [{"name": "gpu", "resourceClaimName": name}],
            "nodeSelector": {"test-world": w.suffix},
        },
    }
    await w.kube.create(PODS, pod)

    async def bound() -> str:
        return str((await w.kube.get(f"{PODS}/{name}"))["spec"].get("nodeName") or "")

    node = await until(bound, what="the pod bound", timeout=90)
    (b,) = claimmodel.bindings(await w.kube.get(f"{CLAIMS}/{name}"), w.driver)
    assert b.ready
    assert b.node == node
    assert (b.pool, b.device) == (poolmodel.pool_name(FABRIC), poolmodel.device_name("GPU_0"))
    assert role.publisher.device_id_of(b.pool, b.device) == "GPU_0"
    cr_name = resource_name("GPU_0")
    assert k8s_dns_subdomain(cr_name)
    assert cr_name != resource_name("gpu-0")
    cr = await w.kube.get(f"{RESOURCES}/{cr_name}")
    assert cr["spec"]["fabric_device"] == "GPU_0"
    assert cr["spec"]["target_node"] == node
    assert k8s_label_value(cr["metadata"]["labels"][poolmodel.FABRIC_LABEL])
    emulated = {d.spec.id: d for d in w.emulator.state.devices.values()}
    assert emulated["GPU_0"].state == DeviceState.ATTACHED
    assert emulated["GPU_0"].machine == w.machine_of(node)
    assert emulated["gpu-0"].state == DeviceState.FREE
    assert not role_task.done()
    print("claim", name, "->", b.pool, b.device, "on", node, "; ComposableResource", cr_name)
