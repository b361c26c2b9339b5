"""The real node role (not the stand-in) on synthetic sysfs trees the fabric emulator writes
into: it sees each hot-plugged GPU, reports NodeReady, the pods bind; at scale-down it removes the
device from its tree and reports NodeReleased before the fabric detaches."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent import settings
from agent.fabric.emulator.sysfs_hook import SysfsHook
from agent.kube.resources import NODE_READY, RESOURCES, condition
from agent.model.fabric import DeviceState
from agent.node.reporting import NodeReporter
from tests.cluster.conftest import World, finish
from tests.cluster.test_scale_up import bound_pods
from tests.waiting import until

pytestmark = pytest.mark.controlplane


@pytest.mark.parametrize(
    "world", [{"nodes": 2, "gpus": 4, "idle_grace": 1.0, "double": False}], indirect=True
)
async def test_node_role_reports_arrivals_and_releases(world: World, tmp_path: Path) -> None:
    roots = {n: tmp_path / "nodes" / n for n in world.nodes}
    hook = SysfsHook(lambda m: roots.get(m.name))
    world.emulator.state.on_appear.append(hook.appear)
    world.emulator.state.on_disappear.append(hook.disappear)
    reporters = [
        NodeReporter(
            world.kube,
            settings.NodeSettings(
                sysfs_root=str(roots[n] / "sys"),
                nvml_path=str(tmp_path / "no-nvml.so"),
                rescan="never",
            ),
            node=n,
        )
        for n in world.nodes
    ]
    world.tasks.extend(asyncio.create_task(r.run()) for r in reporters)
    role = await world.start_role()
    await asyncio.wait_for(role.publisher.synced.wait(), 30)
    names = [f"p{world.suffix}-{i}" for i in range(3)]
    await asyncio.gather(*(world.claim_and_pod(n) for n in names))
    placed = await until(
        lambda: bound_pods(world, names), what="pods bound via the node role", timeout=60
    )

    crs = [
        o
        for o in (await world.kube.get(RESOURCES))["items"]
        if o["spec"]["target_node"] in world.nodes
    ]
    assert len(crs) == 3
    for cr in crs:
        assert condition(cr, NODE_READY)
        node = cr["spec"]["target_node"]
        bdf = cr["status"]["pci_address"]
        assert (roots[node] / "sys" / "bus" / "pci" / "devices" / bdf / "vendor").exists()
        assert cr["status"]["device_id"].startswith("GPU-")
    assert set(placed.values()) <= set(world.nodes)

    for n in names:
        await finish(world.kube, n)

    async def detached() -> bool:
        return all(d.state == DeviceState.FREE for d in world.emulator.state.devices.values())

    await until(detached, what="idle devices released by the node and detached", timeout=30)
    for n in world.nodes:
        assert list((roots[n] / "sys" / "bus" / "pci" / "devices").iterdir()) == []
