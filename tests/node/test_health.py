"""A GPU's health on the node, end to end without a control plane: the real node reporter (over
the in-memory API server, a synthetic PCI tree and the stub NVML) and the real kubelet plugin on
its sockets, driven by kubelet's own generated Go clients (tests/kubelet: prepare, then the
resource-health stream). An Xid injected into the stub NVML on one GPU becomes DeviceHealthy=False
on that GPU's ComposableResource and Unhealthy on kubelet's stream; clearing the fault brings both
back. Also: the PCI function gone while attached (FellOffBus), a non-fatal Xid, the fatal-Xid
setting, the metric."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent import errors
from agent import health as metrics
from agent._proto.drahealth.v1alpha1 import api_pb2 as drahealth
from agent._proto.drahealth.v1alpha1 import api_pb2_grpc as drahealth_grpc
from agent.kube.resources import RESOURCES, resource_name
from agent.model.objects import DEVICE_HEALTHY
from agent.model.pci import PciAddress
from agent.model.pool import device_name
from agent.native import nvml
from agent.node import health
from agent.node import plugin as plugin_module
from agent.node.hotplug import PciEvent
from agent.node.plugin import KubeletPlugin
from agent.simulated import stubnvml
from tests import kubelet
from tests.node.simnode import DRIVER, POOL, SimNode, make_node
from tests.waiting import until

A_BDF, B_BDF = PciAddress("0000:41:00.0"), PciAddress("0000:42:00.0")
HOLD = 0.3  # --node-health-hold for these tests (s)


@pytest.fixture
def kubelet_dir() -> Iterator[Path]:
    """Short, like /var/lib/kubelet: a unix socket path holds at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="kl-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kubelet_dir: Path
) -> AsyncIterator[tuple[SimNode, KubeletPlugin]]:
    """Two GPUs attached and reported ready (gpu-a at A_BDF, gpu-b at B_BDF), the reporter
    running (informer, reconcile, NVML events) and the plugin serving."""
    monkeypatch.setenv("STUB_NVML_XID", str(tmp_path / "xid"))
    monkeypatch.setenv("STUB_NVML_LOST", str(tmp_path / "lost"))
    n = make_node(tmp_path, monkeypatch)
    n.reporter.health.hold = HOLD
    await n.attach("gpu-a", A_BDF, minor=0)
    await n.attach("gpu-b", B_BDF, minor=1)
    running = asyncio.create_task(n.reporter.run())
    plugin = KubeletPlugin(
        n.kube,
        driver=DRIVER,
        kubelet_dir=kubelet_dir,
        cdi_dir=tmp_path / "cdi",
        reporter=n.reporter,
    )
    await plugin.start()
    try:
        await until(
            lambda: _true(n.reporter.nvml.nvml.watched == {A_BDF, B_BDF}),
            what="NVML watching both GPUs",
            timeout=10,
            interval=0.01,
        )
        yield n, plugin
    finally:
        await plugin.stop()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running


async def _true(value: bool) -> bool:
    return value


def healthy_condition(n: SimNode, fabric_id: str) -> dict[str, Any] | None:
    obj = n.kube.get_obj(f"{RESOURCES}/{resource_name(fabric_id)}") or {}
    conds = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == DEVICE_HEALTHY), None)


def unhealthy_gauge(reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value("cohdi_node_unhealthy_devices", {"reason": reason})
    return value or 0.0


async def wait_condition(n: SimNode, fabric_id: str, status: str) -> tuple[dict[str, Any], float]:
    """The DeviceHealthy condition once its status is `status`, and how long that took (s),
    polling the API server's copy every 2 ms."""
    started = time.monotonic()
    deadline = started + 20
    while time.monotonic() < deadline:
        cond = healthy_condition(n, fabric_id)
        if cond is not None and cond["status"] == status:
            return cond, time.monotonic() - started
        await asyncio.sleep(0.002)
    raise AssertionError(f"DeviceHealthy of {fabric_id} never became {status}")


class HealthStream:
    """kubelet's side of NodeWatchResources: the Go driver printing each response as a line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def until(self, device: str, health_: str) -> dict[str, Any]:
        """The next response in which `device` has health `health_` (HEALTHY, UNHEALTHY...)."""
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
            assert line, "the health stream ended"
            response = json.loads(line)
            for d in response["devices"]:
                if d["device"] == device and d["health"] == health_:
                    return dict(d)


def drive(binary: Path, plugin: KubeletPlugin, op: str, claim: dict[str, Any]) -> dict[str, Any]:
    meta = claim["metadata"]
    done = subprocess.run(
        [
            str(binary),
            *("-registration", str(plugin.reg_socket), "-driver", DRIVER, "-op", op),
            *("-namespace", meta["namespace"], "-name", meta["name"], "-uid", meta["uid"]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


async def test_xid_79_on_one_gpu_reaches_its_resource_and_kubelets_stream(
    node: tuple[SimNode, KubeletPlugin], tmp_path: Path
) -> None:
    n, plugin = node
    binary = await asyncio.to_thread(kubelet.build)
    claim = n.claim("c1", ["gpu-a"])
    prepared = await asyncio.to_thread(drive, binary, plugin, "prepare", claim)
    assert not prepared["claims"][claim["metadata"]["uid"]].get("error")
    device = device_name("gpu-a")
    proc = await asyncio.create_subprocess_exec(
        str(binary),
        *("-registration", str(plugin.reg_socket), "-driver", DRIVER),
        *("-op", "watch-health", "-duration", "60s"),
        stdout=asyncio.subprocess.PIPE,
    )
    stream = HealthStream(proc)
    try:
        first = await stream.until(device, "HEALTHY")
        assert first["pool"] == POOL
        assert first["timeout"] == 30
        unhealthy_before = unhealthy_gauge("Xid79")

        # The GPU falls off the bus: NVML reports Xid 79 and the GPU answers GPU_IS_LOST.
        stubnvml.set_lost(tmp_path / "lost", [A_BDF])
        stubnvml.inject_event(tmp_path / "xid", A_BDF, 79)
        cond, took = await wait_condition(n, "gpu-a", "False")
        print(f"\nXid 79 injected -> DeviceHealthy=False on its resource in {took * 1000:.0f} ms")
        assert cond["reason"] == "Xid79"
        assert "fallen off the bus" in cond["message"]
        assert cond["lastTransitionTime"]
        on_stream = await stream.until(device, "UNHEALTHY")
        assert on_stream["message"].startswith("Xid79: ")
        assert healthy_condition(n, "gpu-b") is None, "the other GPU is untouched"
        assert unhealthy_gauge("Xid79") == unhealthy_before + 1

        # Still lost after the hold: still unhealthy (the probes fail). Hot-plug events make the
        # reporter look at every resource again: still one probe timer for the faulty GPU.
        for _ in range(5):
            n.reporter._on_pci(PciEvent("change", B_BDF, {}, time.monotonic()))
            await asyncio.sleep(0.02)
        await asyncio.sleep(HOLD * 3)
        loop = asyncio.get_running_loop()
        assert n.reporter._probing == {resource_name("gpu-a")}
        assert len([t for t in n.reporter._timers if t.when() > loop.time()]) == 1
        still = healthy_condition(n, "gpu-a")
        assert still is not None
        assert still["status"] == "False"

        # The fault clears (the GPU answers again): True after the hold, Healthy on the stream.
        stubnvml.set_lost(tmp_path / "lost", [])
        cond, took = await wait_condition(n, "gpu-a", "True")
        print(f"fault cleared -> DeviceHealthy=True in {took * 1000:.0f} ms (hold {HOLD} s)")
        assert cond["reason"] == "Healthy"
        await stream.until(device, "HEALTHY")
        assert unhealthy_gauge("Xid79") == unhealthy_before
    finally:
        proc.kill()
        await proc.wait()


async def run_manager(
    binary: Path, plugin: KubeletPlugin, until: str, seconds: float
) -> tuple[list[dict[str, Any]], str]:
    """kubelet's own DRA plugin manager (tests/kubelet/pluginmanager) registered with the plugin
    for `seconds`: the responses its stream handler got, up to the first line containing `until`,
    and kubelet's log."""
    proc = await asyncio.create_subprocess_exec(
        str(binary),
        *("-registration", str(plugin.reg_socket), "-duration", f"{seconds}s", "-v", "4"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    lines: list[dict[str, Any]] = []
    try:
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), seconds + 10)
            assert line, "kubelet's plugin manager ended before " + until
            lines.append(json.loads(line))
            if until in line.decode():
                break
    finally:
        proc.kill()
        log = (await proc.stderr.read()).decode()
        await proc.wait()
    return lines, log


async def test_kubelets_own_plugin_manager_streams_our_health(
    node: tuple[SimNode, KubeletPlugin], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The code kubelet 1.36 runs (k8s.io/kubernetes pkg/kubelet/cm/dra/plugin) registers the
    plugin and opens NodeWatchResources: it gets the device's health, Unhealthy after an Xid 79,
    and logs no error. Against a plugin without the service (what this plugin was), the same
    code gets Unimplemented, which kubelet logs every 5 s."""
    n, plugin = node
    binary = await asyncio.to_thread(kubelet.build)
    manager = await asyncio.to_thread(kubelet.build_manager)
    claim = n.claim("c1", ["gpu-a"])
    await asyncio.to_thread(drive, binary, plugin, "prepare", claim)
    device = device_name("gpu-a")
    lines, log = await run_manager(manager, plugin, '"HEALTHY"', 20)
    (seen,) = lines[-1]["devices"]
    assert (seen["pool"], seen["device"], seen["health"]) == (POOL, device, "HEALTHY")
    assert "Successfully started WatchResources health stream" in log
    assert "Unimplemented" not in log
    assert not [line for line in lines if "error" in line]

    stubnvml.inject_event(tmp_path / "xid", A_BDF, 79)
    lines, log = await run_manager(manager, plugin, '"UNHEALTHY"', 20)
    assert lines[-1]["devices"][0]["message"].startswith("Xid79: ")
    assert "Unimplemented" not in log

    # The plugin as it was, without the resource-health service: kubelet's code gets Unimplemented.
    await plugin.stop()
    monkeypatch.setattr(
        plugin_module.drahealth_grpc, "add_DRAResourceHealthServicer_to_server", lambda *a: None
    )
    await plugin.start()
    lines, log = await run_manager(manager, plugin, '"error"', 20)
    assert "Unimplemented" in lines[-1]["error"]


async def test_stopping_the_plugin_ends_the_health_streams_cleanly(
    node: tuple[SimNode, KubeletPlugin],
) -> None:
    """kubelet keeps a stream open for as long as the plugin runs: stopping ends it with OK at
    once (kubelet dials the next process), rather than the server cancelling it after its grace."""
    _, plugin = node
    async with grpc.aio.insecure_channel(f"unix://{plugin.dra_socket}") as channel:
        call = drahealth_grpc.DRAResourceHealthStub(channel).NodeWatchResources(
            drahealth.NodeWatchResourcesRequest()
        )
        first = await call.read()
        assert first is not grpc.aio.EOF
        await plugin.stop()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_a_gpu_whose_function_is_gone_while_attached_fell_off_the_bus(
    node: tuple[SimNode, KubeletPlugin],
) -> None:
    n, _ = node
    function = n.sysfs / "bus" / "pci" / "devices" / B_BDF
    kept = function.with_name(".kept")
    function.rename(kept)  # the kernel drops the function: a remove event, then a scan
    cond, _ = await wait_condition(n, "gpu-b", "False")
    assert cond["reason"] == "FellOffBus"
    assert B_BDF in cond["message"]
    assert healthy_condition(n, "gpu-a") is None
    kept.rename(function)  # back on the bus
    cond, _ = await wait_condition(n, "gpu-b", "True")
    assert cond["reason"] == "Healthy"


async def test_double_bit_ecc_is_a_fault_and_a_non_fatal_xid_is_not(
    node: tuple[SimNode, KubeletPlugin], tmp_path: Path
) -> None:
    n, _ = node
    stubnvml.inject_event(tmp_path / "xid", A_BDF, 13)  # Graphics Engine Exception: the app's
    stubnvml.inject_event(tmp_path / "xid", B_BDF, 0, stubnvml.DOUBLE_BIT_ECC)
    cond, _ = await wait_condition(n, "gpu-b", "False")
    assert cond["reason"] == "DoubleBitEcc"
    assert not (tmp_path / "xid").read_text(), "both events were taken"
    assert healthy_condition(n, "gpu-a") is None


async def test_a_failed_pcie_recovery_is_a_fault_until_the_gpu_answers_for_the_hold(
    node: tuple[SimNode, KubeletPlugin],
) -> None:
    """The kernel's AER uevents: SUCCESSFUL_RECOVERY says nothing, FAILED_RECOVERY is a fault;
    the stub GPU keeps answering NVML, so the fault clears after the hold."""
    n, _ = node
    now = time.monotonic()
    ok = {"ERROR_EVENT": "SUCCESSFUL_RECOVERY", "DEVICE_ONLINE": "1"}
    n.reporter._on_pci(PciEvent("change", A_BDF, ok, now))
    failed = {"ERROR_EVENT": "FAILED_RECOVERY", "DEVICE_ONLINE": "0"}
    n.reporter._on_pci(PciEvent("change", B_BDF, failed, now))
    cond, _ = await wait_condition(n, "gpu-b", "False")
    assert cond["reason"] == "PcieRecoveryFailed"
    assert "DEVICE_ONLINE=0" in cond["message"]
    assert healthy_condition(n, "gpu-a") is None
    assert n.reporter.health.fault(B_BDF) is not None
    cond, _ = await wait_condition(n, "gpu-b", "True")
    assert cond["reason"] == "Healthy"


def test_fatal_xids_setting() -> None:
    assert health.parse_xids("48, 79,,") == {48, 79}
    assert health.parse_xids("") == frozenset()
    with pytest.raises(errors.ConfigError, match="--node-fatal-xids"):
        health.parse_xids("79,x")
    from agent import settings

    default = health.parse_xids(settings.NodeSettings().fatal_xids)
    assert {48, 79, 95} <= default
    assert not {13, 31, 43, 45, 94} & default  # application errors, contained ECC


@pytest.mark.parametrize(
    ("event_type", "data", "reason"),
    [
        (nvml.EVENT_XID_CRITICAL, 79, "Xid79"),
        (nvml.EVENT_XID_CRITICAL, 13, None),
        (nvml.EVENT_DOUBLE_BIT_ECC, 0, "DoubleBitEcc"),
        (nvml.EVENT_GPU_UNAVAILABLE, 0, "GpuUnavailable"),
        (nvml.EVENT_GPU_RECOVERY_ACTION, 0, None),
        (nvml.EVENT_GPU_RECOVERY_ACTION, 2, "RecoveryNodeReboot"),
        (nvml.EVENT_PSTATE, 0, None),
    ],
)
def test_events_classified(event_type: int, data: int, reason: str | None) -> None:
    fault = health.classify(nvml.NvmlEvent(A_BDF, event_type, data), frozenset({79}))
    assert (fault.reason if fault else None) == reason
