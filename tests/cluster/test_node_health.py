"""A GPU's health from the node, on a real control plane: the scheduler allocates a claim, the
real node role sees the GPU arrive (emulated fabric, synthetic sysfs, stub NVML), kubelet's own
Go clients (tests/kubelet) prepare it and watch NodeWatchResources; an Xid 79 injected into the
stub NVML on that GPU becomes DeviceHealthy=False (reason Xid79) on its ComposableResource — the
time from the injection to the condition in the API server is printed — and UNHEALTHY on the
stream; the fault cleared, DeviceHealthy=True and HEALTHY again."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from agent import settings
from agent.fabric.emulator.sysfs_hook import SysfsHook
from agent.kube.resources import RESOURCES
from agent.model.objects import DEVICE_HEALTHY
from agent.node.plugin import KubeletPlugin
from agent.node.reporting import NodeReporter
from agent.simulated import stubnvml
from tests import kubelet
from tests.cluster.conftest import CLAIMS, World
from tests.cluster.test_scale_up import bound_pods, our_slices
from tests.waiting import until

pytestmark = pytest.mark.controlplane

HOLD = 0.5  # --node-health-hold (s)


def device_healthy(obj: dict[str, Any]) -> dict[str, Any] | None:
    conds = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c.get("type") == DEVICE_HEALTHY), None)


async def stream_until(proc: asyncio.subprocess.Process, device: str, health: str) -> str:
    """Read NodeWatchResources responses (JSON lines) until `device` has `health`; its message."""
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line, "the health stream ended"
        for d in json.loads(line)["devices"]:
            if d["device"] == device and d["health"] == health:
                return str(d["message"])


@pytest.mark.parametrize("world", [{"nodes": 1, "gpus": 2, "double": False}], indirect=True)
async def test_xid_79_becomes_device_healthy_false_and_unhealthy_for_kubelet(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = await asyncio.to_thread(kubelet.build)
    node = world.nodes[0]
    root = tmp_path / "nodes" / node
    hook = SysfsHook(lambda m: root if m.name == node else None)
    world.emulator.state.on_appear.append(hook.appear)
    world.emulator.state.on_disappear.append(hook.disappear)
    monkeypatch.setenv("STUB_NVML_GPUS", str(root / "nvml-gpus"))
    monkeypatch.setenv("STUB_NVML_XID", str(tmp_path / "xid"))
    monkeypatch.setenv("STUB_NVML_LOST", str(tmp_path / "lost"))
    stub = stubnvml.build(settings.Settings().cache_dir)
    reporter = NodeReporter(
        world.kube,
        settings.NodeSettings(
            sysfs_root=str(root / "sys"), nvml_path=str(stub), rescan="never", health_hold=HOLD
        ),
        node=node,
    )
    world.tasks.append(asyncio.create_task(reporter.run()))
    kubelet_dir = Path(tempfile.mkdtemp(prefix="kl-", dir="/tmp"))
    plugin = KubeletPlugin(
        world.kube,
        driver=world.driver,
        kubelet_dir=kubelet_dir,
        cdi_dir=tmp_path / "cdi",
        reporter=reporter,
    )
    await plugin.start()
    proc: asyncio.subprocess.Process | None = None
    try:
        role = await world.start_role()
        await asyncio.wait_for(role.publisher.synced.wait(), 30)
        name = f"p{world.suffix}-0"
        await world.claim_and_pod(name)
        await until(lambda: bound_pods(world, [name]), what="the pod bound", timeout=60)
        claim = await world.kube.get(f"{CLAIMS}/{name}")
        meta = claim["metadata"]
        device = claim["status"]["allocation"]["devices"]["results"][0]["device"]
        done = await asyncio.to_thread(
            subprocess.run,
            [
                str(binary),
                *("-registration", str(plugin.reg_socket), "-driver", world.driver),
                *("-op", "prepare", "-namespace", meta["namespace"]),
                *("-name", meta["name"], "-uid", meta["uid"]),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert not json.loads(done.stdout)["claims"][meta["uid"]].get("error")
        resource = plugin.preparer.resource_of(device)
        assert resource is not None
        rname = resource["metadata"]["name"]
        bdf = resource["status"]["pci_address"]
        proc = await asyncio.create_subprocess_exec(
            str(binary),
            *("-registration", str(plugin.reg_socket), "-driver", world.driver),
            *("-op", "watch-health", "-duration", "90s"),
            stdout=asyncio.subprocess.PIPE,
        )
        await stream_until(proc, device, "HEALTHY")

        stubnvml.set_lost(tmp_path / "lost", [bdf])
        stubnvml.inject_event(tmp_path / "xid", bdf, 79)
        started = time.monotonic()
        while True:  # the API server's copy, polled every 10 ms
            obj = await world.kube.get(f"{RESOURCES}/{rname}")
            cond = device_healthy(obj)
            if cond is not None and cond["status"] == "False":
                break
            assert time.monotonic() - started < 30, "DeviceHealthy=False never came"
            await asyncio.sleep(0.01)
        took = time.monotonic() - started
        print(f"\nXid 79 injected -> DeviceHealthy=False in the API server in {took * 1000:.0f} ms")
        assert cond["reason"] == "Xid79"

        async def tainted() -> list[Any]:
            # end to end: the node's word on the resource, read by the cluster role, published
            for sl in await our_slices(world):
                for d in sl["spec"].get("devices") or []:
                    if d["name"] == device and d.get("taints"):
                        return list(d["taints"])
            return []

        taints = await until(
            tainted, what="the taint in the GPU's slice", timeout=30, interval=0.01
        )
        took = time.monotonic() - started
        print(f"Xid 79 injected -> taint in its ResourceSlice in {took * 1000:.0f} ms")
        assert taints[0]["key"] == "cohdi.io/unhealthy"
        assert "Xid79" in taints[0]["value"]
        assert (await stream_until(proc, device, "UNHEALTHY")).startswith("Xid79: ")

        stubnvml.set_lost(tmp_path / "lost", [])

        async def healthy_again() -> bool:
            c = device_healthy(await world.kube.get(f"{RESOURCES}/{rname}"))
            return c is not None and c["status"] == "True"

        await until(healthy_again, what="DeviceHealthy=True again", timeout=30, interval=0.05)
        await stream_until(proc, device, "HEALTHY")
    finally:
        if proc is not None:
            proc.kill()
            await proc.wait()
        await plugin.stop()
        shutil.rmtree(kubelet_dir, ignore_errors=True)
