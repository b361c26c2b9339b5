"""Safe removal before a detach: while a compute process uses the GPU (NVML says so), the node
role refuses to release it (NodeReleased=False, reason Busy, the pids named) and the fabric
detach waits; once the process is gone, the device is removed and detached."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent import settings
from agent.fabric.emulator.sysfs_hook import SysfsHook
from agent.kube.resources import NODE_RELEASED, RESOURCES
from agent.model.fabric import DeviceState
from agent.node.reporting import NodeReporter
from agent.simulated import stubnvml
from tests.cluster.conftest import World, finish
from tests.cluster.test_scale_up import bound_pods
from tests.waiting import until

pytestmark = pytest.mark.controlplane


def released(cr: dict) -> dict | None:  # type: ignore[type-arg]
    return next(
        (c for c in (cr.get("status") or {}).get("conditions") or [] if c["type"] == NODE_RELEASED),
        None,
    )


@pytest.mark.parametrize(
    "world", [{"nodes": 1, "gpus": 1, "idle_grace": 0.5, "double": False}], indirect=True
)
async def test_busy_gpu_is_not_released_until_idle(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = world.nodes[0]
    root = tmp_path / "nodes" / node
    hook = SysfsHook(lambda m: root if m.name == node else None)
    world.emulator.state.on_appear.append(hook.appear)
    world.emulator.state.on_disappear.append(hook.disappear)
    monkeypatch.setenv("STUB_NVML_GPUS", str(root / "nvml-gpus"))
    reporter = NodeReporter(
        world.kube,
        settings.NodeSettings(
            sysfs_root=str(root / "sys"),
            nvml_path=str(stubnvml.build(settings.Settings().cache_dir)),
            rescan="never",
        ),
        node=node,
    )
    world.tasks.append(asyncio.create_task(reporter.run()))
    role = await world.start_role()
    await asyncio.wait_for(role.publisher.synced.wait(), 30)
    name = f"p{world.suffix}-0"
    await world.claim_and_pod(name)
    await until(lambda: bound_pods(world, [name]), what="the pod bound", timeout=60)

    gpus = root / "nvml-gpus"
    line = gpus.read_text().rstrip("\n").split("\t")
    gpus.write_text("\t".join([*line[:5], "4242:1073741824"]) + "\n")  # a CUDA job runs on it
    await finish(world.kube, name)

    async def refused() -> dict | None:  # type: ignore[type-arg]
        for cr in (await world.kube.get(RESOURCES))["items"]:
            if cr["spec"]["target_node"] == node and (c := released(cr)) and c["status"] == "False":
                return c
        return None

    cond = await until(refused, what="the node to refuse the release", timeout=30)
    assert cond["reason"] == "Busy"
    assert "4242" in cond["message"]
    await asyncio.sleep(1.0)
    assert [d.state for d in world.emulator.state.devices.values()] == [DeviceState.ATTACHED]

    gpus.write_text("\t".join([*line[:5], "-"]) + "\n")  # the job ended

    async def detached() -> bool:
        return all(d.state == DeviceState.FREE for d in world.emulator.state.devices.values())

    await until(detached, what="the release and the detach", timeout=30)
    assert list((root / "sys" / "bus" / "pci" / "devices").iterdir()) == []
