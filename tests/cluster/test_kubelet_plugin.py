"""The DRA kubelet plugin driven by kubelet's own generated gRPC clients (tests/kubelet/main.go,
built from the Go module proxy) for a claim the real scheduler allocated and the real node role
saw arrive: registration, NodePrepareResources → CDI ids and a CDI file with the device nodes
that the CDI library runtimes use loads and resolves (tests/cdi), a crash between PrepareStarted
and PrepareCompleted recovered, NodeUnprepareResources."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import grpc
import pytest

from agent import settings
from agent._proto.dra.v1 import api_pb2, api_pb2_grpc
from agent.fabric.emulator.sysfs_hook import SysfsHook
from agent.node.checkpoint import STARTED, Checkpoint
from agent.node.plugin import KubeletPlugin
from agent.node.reporting import NodeReporter
from agent.simulated import stubnvml
from tests import cdi as cdicheck
from tests import kubelet
from tests.cluster.conftest import CLAIMS, World
from tests.cluster.test_scale_up import bound_pods
from tests.waiting import until

pytestmark = pytest.mark.controlplane


def drive(binary: Path, plugin: KubeletPlugin, driver: str, op: str, claim: dict) -> dict:  # type: ignore[type-arg]
    meta = claim["metadata"]
    done = subprocess.run(
        [
            str(binary),
            "-registration",
            str(plugin.reg_socket),
            "-driver",
            driver,
            "-op",
            op,
            "-namespace",
            meta["namespace"],
            "-name",
            meta["name"],
            "-uid",
            meta["uid"],
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.mark.parametrize("world", [{"nodes": 1, "gpus": 2, "double": False}], indirect=True)
async def test_kubelet_prepares_through_our_plugin(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = await asyncio.to_thread(kubelet.build)
    checker = await asyncio.to_thread(cdicheck.build)
    node = world.nodes[0]
    root = tmp_path / "nodes" / node
    hook = SysfsHook(lambda m: root if m.name == node else None)
    world.emulator.state.on_appear.append(hook.appear)
    world.emulator.state.on_disappear.append(hook.disappear)
    monkeypatch.setenv("STUB_NVML_GPUS", str(root / "nvml-gpus"))
    stub = stubnvml.build(settings.Settings().cache_dir)
    reporter = NodeReporter(
        world.kube,
        settings.NodeSettings(sysfs_root=str(root / "sys"), nvml_path=str(stub), rescan="never"),
        node=node,
    )
    world.tasks.append(asyncio.create_task(reporter.run()))
    # unix socket paths are limited to 107 bytes: a short directory, like /var/lib/kubelet
    kubelet_dir = Path(tempfile.mkdtemp(prefix="kl-", dir="/tmp"))
    cdi_dir = tmp_path / "cdi"
    plugin = KubeletPlugin(
        world.kube, driver=world.driver, kubelet_dir=kubelet_dir, cdi_dir=cdi_dir, reporter=reporter
    )
    await plugin.start()
    try:
        assert oct(plugin.dra_socket.stat().st_mode & 0o777) == "0o600"
        assert oct(plugin.reg_socket.stat().st_mode & 0o777) == "0o600"
        role = await world.start_role()
        await asyncio.wait_for(role.publisher.synced.wait(), 30)
        name = f"p{world.suffix}-0"
        await world.claim_and_pod(name)
        await until(lambda: bound_pods(world, [name]), what="the pod bound", timeout=60)
        claim = await world.kube.get(f"{CLAIMS}/{name}")
        uid = claim["metadata"]["uid"]
        device = claim["status"]["allocation"]["devices"]["results"][0]["device"]

        first = await asyncio.to_thread(drive, binary, plugin, world.driver, "prepare", claim)
        entry = first["claims"][uid]
        assert not entry.get("error")
        (dev,) = entry["devices"]
        expected_id = f"{world.driver}/gpu={uid}-{device}"
        assert dev["cdi_device_ids"] == [expected_id]
        assert (dev["pool_name"], dev["device_name"], dev["request_names"]) == (
            f"fab-{world.suffix}",
            device,
            ["gpu"],
        )
        assert plugin.registration.registered.is_set()

        (spec_file,) = list(cdi_dir.iterdir())
        assert spec_file.name == f"{world.driver}-gpu_{uid}.json"
        spec = json.loads(spec_file.read_text())
        # a claim UID is a UUID: one starting with a digit needs CDI 0.5.0 for the device name
        assert spec["cdiVersion"] == ("0.5.0" if uid[0].isdigit() else "0.3.0")
        assert spec["kind"] == f"{world.driver}/gpu"
        (cdev,) = spec["devices"]
        assert cdev["name"] == f"{uid}-{device}"
        nodes = [n["path"] for n in cdev["containerEdits"]["deviceNodes"]]
        bdf = next(
            e.split("=", 1)[1]
            for e in cdev["containerEdits"]["env"]
            if e.startswith("COHDI_GPU_BDF=")
        )
        minor = int(bdf.split(":")[1], 16)  # the simulated GPU's minor (stub NVML)
        assert nodes == [
            f"/dev/nvidia{minor}",
            "/dev/nvidiactl",
            "/dev/nvidia-uvm",
            "/dev/nvidia-uvm-tools",
        ]
        original = spec_file.read_text()
        # what the container runtime will do with it: load the directory, resolve the id
        library = await asyncio.to_thread(cdicheck.check, checker, cdi_dir, [expected_id])
        assert library["rejected"] == {}
        assert library["resolved"] == {expected_id: str(spec_file)}

        # Crash between PrepareStarted and PrepareCompleted: the record says started, the CDI
        # file is half-written; a restarted plugin prepares again to the same result.
        await plugin.stop()
        cp = Checkpoint(plugin.plugin_dir / "checkpoint.json")
        claims = cp.load()
        claims[uid].state = STARTED
        cp.save(claims)
        spec_file.write_text(original[: len(original) // 2])
        plugin = KubeletPlugin(
            world.kube,
            driver=world.driver,
            kubelet_dir=kubelet_dir,
            cdi_dir=cdi_dir,
            reporter=reporter,
        )
        await plugin.start()
        again = await asyncio.to_thread(drive, binary, plugin, world.driver, "prepare", claim)
        assert again == first
        assert [p.name for p in cdi_dir.iterdir()] == [spec_file.name]
        assert spec_file.read_text() == original

        # Kubelet repeats calls after restarts: still the same, still one file.
        assert (
            await asyncio.to_thread(drive, binary, plugin, world.driver, "prepare", claim) == first
        )

        # An empty request is fine (liveness probes send one).
        async with grpc.aio.insecure_channel(f"unix://{plugin.dra_socket}") as channel:
            empty = await api_pb2_grpc.DRAPluginStub(channel).NodePrepareResources(
                api_pb2.NodePrepareResourcesRequest()
            )
        assert len(empty.claims) == 0

        gone = await asyncio.to_thread(drive, binary, plugin, world.driver, "unprepare", claim)
        assert not gone["claims"][uid].get("error")
        assert list(cdi_dir.iterdir()) == []
        assert uid not in Checkpoint(plugin.plugin_dir / "checkpoint.json").load()
        twice = await asyncio.to_thread(drive, binary, plugin, world.driver, "unprepare", claim)
        assert not twice["claims"][uid].get("error")

        ghost = str(uuid.uuid4())
        bogus = {"metadata": {"namespace": "default", "name": "no-such-claim", "uid": ghost}}
        failed = await asyncio.to_thread(drive, binary, plugin, world.driver, "prepare", bogus)
        assert "404" in failed["claims"][ghost]["error"]  # per-claim error, not an RPC failure
    finally:
        await plugin.stop()
        shutil.rmtree(kubelet_dir, ignore_errors=True)
