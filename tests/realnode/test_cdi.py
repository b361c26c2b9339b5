"""The product on a real node: the cluster role and the node role as host processes (`cohdi-agent
run`), the fabric emulator, and the session's real kubelet + containerd. A pod with a
ResourceClaim for a GPU is scheduled through the binding conditions (the GPU is attached through
the fabric, hot-plugged into the node's synthetic sysfs tree, reported ready); the REAL kubelet
calls NodePrepareResources on the node role's DRA plugin; containerd injects the CDI device (a
character device made for the test stands in for /dev/nvidia<N>: major 195, the minor the
simulated GPU's stub NVML reports); the container (a static C program, tests/realnode/devcheck.c,
in an image built here) sees it and exits 0. Deleting the pod unprepares (CDI file and
checkpoint entry gone), kube-controller-manager deallocates the claim, and after the idle grace
the GPU is detached and offered free again. The kubelet logs the plugin's registration and no
DRA error."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent import errors, settings
from agent.demo import objects
from agent.devcluster import nodebuild
from agent.devcluster.controlplane import ControlPlane
from agent.devcluster.realnode import TOLERATION, RealNode
from agent.fabric.emulator import config as emuconfig
from agent.fabric.emulator.config import MachineSpec
from agent.fabric.emulator.server import EmulatorServer
from agent.fabric.emulator.state import Device
from agent.fabric.emulator.sysfs_hook import SysfsHook
from agent.kube.client import Kube, path_of
from agent.manifests import installing
from agent.model import pool
from agent.model.fabric import DeviceState
from agent.simulated import stubnvml
from tests.waiting import until

pytestmark = [pytest.mark.controlplane, pytest.mark.all_kube_versions]

A100 = "NVIDIA-A100-PCIE-40GB"
NS = "default"
PODS = path_of(group="", version="v1", plural="pods", namespace=NS)
CLAIMS = path_of(group="resource.k8s.io", version="v1", plural="resourceclaims", namespace=NS)
SLICES = path_of(group="resource.k8s.io", version="v1", plural="resourceslices")
IMAGE = "cohdi.local/devcheck:1"
#: NVIDIA's character-device major; nothing drives it on a machine without their driver, so the
#: stand-in nodes open with ENXIO, never with EPERM unless the device cgroup refuses them.
NVIDIA_MAJOR = 195
#: The control nodes every GPU's CDI spec lists besides /dev/nvidia<minor> (agent.node.cdi).
CONTROL_NODES = {"nvidiactl": 255, "nvidia-uvm": 254, "nvidia-uvm-tools": 253}


class DevNodes:
    """Character devices made for the test in the host's /dev (containerd resolves a CDI
    device node on the host); only those it made are removed again."""

    def __init__(self) -> None:
        self.made: list[Path] = []

    def make(self, name: str, minor: int) -> None:
        path = Path("/dev") / name
        if path.exists():
            assert stat.S_ISCHR(path.stat().st_mode), f"{path} exists and is no character device"
            return
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(NVIDIA_MAJOR, minor))
        self.made.append(path)

    def remove(self, name: str) -> None:
        path = Path("/dev") / name
        if path in self.made:
            path.unlink(missing_ok=True)
            self.made.remove(path)

    def remove_all(self) -> None:
        for path in list(self.made):
            path.unlink(missing_ok=True)
        self.made.clear()


def gpu_minor(pci_address: str) -> int:
    """The simulated GPU's /dev/nvidia<minor>: its PCI bus number (the sysfs hook's stub NVML)."""
    return int(pci_address.split(":")[1], 16)


@dataclass
class Bed:
    node: RealNode
    kube: Kube
    emulator: EmulatorServer
    driver: str
    suffix: str
    workdir: Path
    logs: dict[str, Path] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def fabric(self) -> str:
        return f"fab-{self.suffix}"


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def dev_nodes() -> Iterator[DevNodes]:
    nodes = DevNodes()
    try:
        yield nodes
    finally:
        nodes.remove_all()


def node_fabric(
    real_node: RealNode, dev_nodes: DevNodes, workdir: Path, suffix: str, password: str
) -> tuple[EmulatorServer, Path]:
    """The fabric emulator (not started; user `admin` with `password`) for the real node: its
    one machine on fabric `fab-<suffix>` with two A100s. An attach makes the GPU's device node
    (`/dev/nvidia<minor>`, as a driver would, before the PCI function the node role watches) and
    its function in the node's synthetic tree (the directory returned, under `workdir`, with its
    stub NVML's GPU list); a detach removes both. The control device nodes are made too."""
    conf = emuconfig.parse(
        {
            "machines": [
                {"id": f"m-{real_node.name}", "name": real_node.name, "fabric": f"fab-{suffix}"}
            ],
            "devices": [
                {
                    "model": A100,
                    "count": 2,
                    "fabric": f"fab-{suffix}",
                    "memory": 40 * 2**30,
                    "attach_latency": 0.1,
                }
            ],
            "users": [{"name": "admin", "password": password}],
        }
    )
    emulator = EmulatorServer(conf, tls_dir=workdir / "tls", state_file=workdir / "fabric.json")
    node_dir = workdir / "node"
    (node_dir / "sys" / "bus" / "pci" / "devices").mkdir(parents=True)
    (node_dir / "nvml-gpus").touch()

    def appear(dev: Device, machine: MachineSpec) -> None:
        if machine.name == real_node.name and dev.pci_address:
            dev_nodes.make(f"nvidia{gpu_minor(dev.pci_address)}", gpu_minor(dev.pci_address))

    def disappear(dev: Device, machine: MachineSpec) -> None:
        if machine.name == real_node.name and dev.pci_address:
            dev_nodes.remove(f"nvidia{gpu_minor(dev.pci_address)}")

    hook = SysfsHook(lambda m: node_dir if m.name == real_node.name else None)
    emulator.state.on_appear.extend([appear, hook.appear])
    emulator.state.on_disappear.extend([hook.disappear, disappear])
    for name, minor in CONTROL_NODES.items():
        dev_nodes.make(name, minor)
    return emulator, node_dir


@pytest.fixture
async def bed(
    control_plane: ControlPlane, real_node: RealNode, dev_nodes: DevNodes, tmp_path: Path
) -> AsyncIterator[Bed]:
    suffix = uuid.uuid4().hex[:6]
    driver = f"rn{suffix}.cohdi.io"
    cache = settings.Settings().cache_dir
    workdir = tmp_path
    password = secrets.token_urlsafe(12)
    async with await Kube.connect(kubeconfig=str(control_plane.kubeconfig)) as kube:
        await installing.install(kube, driver)
        emulator, node_dir = node_fabric(real_node, dev_nodes, workdir, suffix, password)
        await emulator.start()
        stub = await asyncio.to_thread(stubnvml.build, cache)
        b = Bed(real_node, kube, emulator, driver, suffix, workdir)
        common = [
            sys.executable,
            "-m",
            "agent",
            "run",
            "--kubeconfig",
            str(control_plane.kubeconfig),
            "--driver",
            driver,
            "--log-format",
            "json",
        ]
        env = {**os.environ, "COHDI_FABRIC_PASSWORD": password}
        b.logs = {"node": workdir / "node-role.log", "cluster": workdir / "cluster-role.log"}
        try:
            b.procs["node"] = _spawn(
                [
                    *common,
                    "--roles",
                    "node",
                    "--node-name",
                    real_node.name,
                    "--node-sysfs-root",
                    str(node_dir / "sys"),
                    "--node-nvml-path",
                    str(stub),
                    "--node-kubelet-dir",
                    str(real_node.kubelet_root),
                    "--node-cdi-dir",
                    str(real_node.cdi),
                    "--node-rescan",
                    "never",
                ],
                {**env, "STUB_NVML_GPUS": str(node_dir / "nvml-gpus")},
                b.logs["node"],
            )
            b.procs["cluster"] = _spawn(
                [
                    *common,
                    "--roles",
                    "cluster",
                    "--fabric-url",
                    emulator.url,
                    "--fabric-user",
                    "admin",
                    "--fabric-ca-bundle",
                    str(emulator.ca_file),
                    "--fabric-backend",
                    "redfish",
                    "--fabric-poll-interval",
                    "1",
                    "--idle-grace",
                    "2",
                    "--lease-name",
                    f"realnode-{suffix}",
                ],
                env,
                b.logs["cluster"],
            )
            yield b
        finally:
            with contextlib.suppress(errors.KubeNotFound):
                await kube.request("DELETE", f"{PODS}/gpu-{suffix}", body={"gracePeriodSeconds": 0})
            with contextlib.suppress(errors.KubeNotFound):
                await kube.delete(f"{CLAIMS}/gpu-{suffix}")
            await asyncio.to_thread(_stop, b.procs)
            await emulator.stop()
            for name, path in b.logs.items():
                print(f"--- {name} role log (last lines) ---")
                print("\n".join(path.read_text(errors="replace").splitlines()[-15:]))


def decisions(log: Path, kind: str) -> list[dict[str, Any]]:
    """The role's JSON log lines with decision=`kind`."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if doc.get("decision") == kind:
                found.append(doc)
    return found


def kubelet_lines(node: RealNode, since: int = 0) -> list[str]:
    return node.kubelet_log.read_text(errors="replace").splitlines()[since:]


def kubelet_calls(node: RealNode, since: int, claim_uid: str) -> list[str]:
    """The kubelet's log lines of DRA plugin calls for the claim (its --vmodule for them)."""
    return [
        line
        for line in kubelet_lines(node, since)
        if "calling node" in line.lower() and claim_uid in line
    ]


async def registered(bed: Bed, since: int) -> None:
    """Until the kubelet's plugin watcher has registered the node role's DRA plugin (its log)
    and the node role heard so (its registration status callback)."""

    async def probe() -> list[str]:
        reg = [
            line
            for line in kubelet_lines(bed.node, since)
            if '"Registered DRA plugin"' in line and f'driverName="{bed.driver}"' in line
        ]
        heard = any("kubelet registered" in json.dumps(d) for d in log_lines(bed.logs["node"]))
        return reg if heard else []

    reg = await until(probe, what="the kubelet registering the DRA plugin", timeout=60)
    print("kubelet:", reg[-1][:160], "...")
    await until(
        lambda: offered(bed), what="the cluster role offering the fabric's GPUs", timeout=60
    )


async def offered(bed: Bed) -> bool:
    """The cluster role labelled the node with its fabric and offers both GPUs in the fabric's
    pool (before a pod is submitted: one the scheduler finds unschedulable waits for a requeue)."""
    node = await bed.kube.get(f"/api/v1/nodes/{bed.node.name}")
    if node["metadata"].get("labels", {}).get(pool.FABRIC_LABEL) != pool.fabric_label(bed.fabric):
        return False
    devices = [
        d
        for s in (await bed.kube.get(SLICES))["items"]
        if s["spec"]["driver"] == bed.driver and s["spec"]["pool"]["name"] == bed.fabric
        for d in s["spec"].get("devices") or []
    ]
    return len(devices) == 2


def log_lines(log: Path) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            found.append(json.loads(line))
    return found


async def import_devcheck(node: RealNode) -> None:
    archive = await asyncio.to_thread(
        nodebuild.static_image,
        settings.Settings().cache_dir,
        Path(__file__).with_name("devcheck.c"),
        image=IMAGE,
        binary="devcheck",
    )
    await asyncio.to_thread(node.import_image, archive)


async def submit(bed: Bed, name: str, args: list[str]) -> None:
    """A ResourceClaim for one GPU and a pod on the real node running devcheck with `args`."""
    await bed.kube.create(CLAIMS, objects.gpu_claim(name, bed.driver, A100))
    await bed.kube.create(
        PODS,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "nodeSelector": {"kubernetes.io/hostname": bed.node.name},
                "tolerations": [TOLERATION],
                "restartPolicy": "Never",
                "dnsPolicy": "Default",
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "terminationGracePeriodSeconds": 5,
                "containers": [
                    {
                        "name": "check",
                        "image": IMAGE,
                        "imagePullPolicy": "Never",
                        "args": args,
                        "resources": {"claims": [{"name": "gpu"}]},
                    }
                ],
                "resourceClaims": [{"name": "gpu", "resourceClaimName": name}],
            },
        },
    )


@dataclass
class Seen:
    """What a test saw of its pod and claim while waiting: the claim as last seen allocated, and
    seconds from submission to the pod's binding."""

    claim: dict[str, Any] = field(default_factory=dict)
    bound_s: float = float("nan")


async def wait_pod(
    bed: Bed, name: str, seen: Seen, started: float, phases: tuple[str, ...]
) -> dict[str, Any]:
    """Until the pod's phase is one of `phases`, noting the allocated claim on the way."""

    last: dict[str, Any] = {}

    async def probe() -> dict[str, Any] | None:
        claim = await bed.kube.get(f"{CLAIMS}/{name}")
        if (claim.get("status") or {}).get("allocation"):
            seen.claim = claim
        pod = last["pod"] = await bed.kube.get(f"{PODS}/{name}")
        if pod["spec"].get("nodeName") and seen.bound_s != seen.bound_s:
            seen.bound_s = time.monotonic() - started
        return pod if pod.get("status", {}).get("phase") in phases else None

    try:
        pod: dict[str, Any] = await until(
            probe, what=f"pod {name} in {phases}", timeout=180, interval=0.3
        )
    except AssertionError as exc:  # say where it stuck: the pod, the claim, the node's logs
        raise AssertionError(
            f"{exc}\npod status: {json.dumps(last.get('pod', {}).get('status'))}\n"
            f"claim status: {json.dumps(seen.claim.get('status'))}\n"
            + "\n".join(
                f"--- {log.name} ---\n" + "\n".join(lines[-25:])
                for log in (bed.node.kubelet_log, bed.node.log("containerd"), bed.logs["node"])
                for lines in [log.read_text(errors="replace").splitlines()]
            )
        ) from exc
    return pod


def check_allocation(bed: Bed, seen: Seen) -> Device:
    """The claim went through the binding conditions (its allocation carried FabricDeviceReady,
    which the agent set True); returns the emulator's GPU it got."""
    (result,) = seen.claim["status"]["allocation"]["devices"]["results"]
    assert result["bindingConditions"] == ["FabricDeviceReady"]
    (dev_status,) = seen.claim["status"]["devices"]
    assert any(
        c["type"] == "FabricDeviceReady" and c["status"] == "True" for c in dev_status["conditions"]
    )
    (gpu,) = [d for d in bed.emulator.state.devices.values() if d.state == DeviceState.ATTACHED]
    return gpu


def check_report(report: str, gpu: Device) -> None:
    """devcheck saw the claim's GPU as the character device CDI injected, and the spec's env."""
    minor = gpu_minor(gpu.pci_address)
    assert f"/dev/nvidia{minor} char {NVIDIA_MAJOR}:{minor} open=" in report, report
    for ctl, ctl_minor in CONTROL_NODES.items():
        assert f"/dev/{ctl} char {NVIDIA_MAJOR}:{ctl_minor} open=" in report, report
    assert "open=EPERM" not in report
    assert f"COHDI_GPU_BDF={gpu.pci_address}" in report
    assert "result=ok" in report


async def unprepared(bed: Bed, uid: str, name: str) -> None:
    """Until the node role logged the claim unprepared and its CDI spec is gone."""

    async def probe() -> bool:
        gone = [d for d in decisions(bed.logs["node"], "unprepared") if d["claim"].endswith(name)]
        return bool(gone) and not list(bed.node.cdi.glob(f"*{uid}*"))

    await until(probe, what="the kubelet unpreparing the claim", timeout=60)


async def back_in_pool(bed: Bed, name: str) -> None:
    """kube-controller-manager deallocates the claim (its pod is done or gone); then the claim
    is deleted, and after the idle grace the GPU is detached and offered free again."""

    async def deallocated() -> bool:
        c = await bed.kube.get(f"{CLAIMS}/{name}")
        return not (c.get("status") or {}).get("allocation")

    await until(deallocated, what="the claim deallocated", timeout=60)
    await bed.kube.delete(f"{CLAIMS}/{name}")

    async def offered_free() -> bool:
        if any(d.state != DeviceState.FREE for d in bed.emulator.state.devices.values()):
            return False
        return await offered(bed)

    await until(offered_free, what="the GPU detached and offered free again", timeout=90)


def no_dra_errors(bed: Bed, since: int) -> None:
    errors_ = [
        line
        for line in kubelet_lines(bed.node, since)
        if line.startswith("E")
        and re.search(r"(?i)dra|plugin|resourceclaim|" + re.escape(bed.driver), line)
    ]
    assert errors_ == [], "\n".join(errors_[:20])


async def test_real_kubelet_prepares_and_containerd_injects_the_cdi_device(bed: Bed) -> None:
    """The pod's container sees the GPU's device node and exits 0; the kubelet unprepares the
    claim when the pod is done; deleted, the pod's GPU goes back to the pool."""
    node, kube, name = bed.node, bed.kube, f"gpu-{bed.suffix}"
    since = len(kubelet_lines(node))
    await import_devcheck(node)
    await registered(bed, since)

    t0 = time.monotonic()
    seen = Seen()
    await submit(bed, name, [])
    pod = await wait_pod(bed, name, seen, t0, ("Succeeded", "Failed"))
    done_s = time.monotonic() - t0
    (status,) = pod["status"]["containerStatuses"]
    term = status["state"]["terminated"]
    report = term.get("message", "")
    print(f"container report:\n{report}")
    assert pod["spec"]["nodeName"] == node.name
    assert term["exitCode"] == 0, report
    assert pod["status"]["phase"] == "Succeeded"
    gpu = check_allocation(bed, seen)
    check_report(report, gpu)
    dev_node = Path("/dev") / f"nvidia{gpu_minor(gpu.pci_address)}"
    uid = seen.claim["metadata"]["uid"]
    # the real kubelet called NodePrepareResources for this claim, and the plugin answered
    calls = kubelet_calls(node, since, uid)
    print("kubelet:\n" + "\n".join(line[:200] + " ..." for line in calls))
    assert any("Calling NodePrepareResources rpc" in line for line in calls)
    assert any(
        "Done calling NodePrepareResources rpc" in line
        and f'cdi_device_ids:\\"{bed.driver}/gpu={uid}-' in line
        and "err=null" in line
        for line in calls
    ), calls
    # the node role's plugin answered the kubelet's NodePrepareResources for this claim
    assert [d for d in decisions(bed.logs["node"], "prepared") if d["claim"].endswith(name)]
    # `kubectl logs`: the API server reaches the kubelet at the node's address
    api_log = await asyncio.to_thread(node.pod_log, NS, name, "check")
    assert "result=ok" in api_log
    await unprepared(bed, uid, name)  # the pod is done: the kubelet unprepares at once
    assert any("NodeUnprepareResources" in line for line in kubelet_calls(node, since, uid))

    t1 = time.monotonic()
    await kube.request("DELETE", f"{PODS}/{name}", body={"gracePeriodSeconds": 0})
    await back_in_pool(bed, name)
    back_s = time.monotonic() - t1
    assert not dev_node.exists()  # the stand-in went with the GPU
    no_dra_errors(bed, since)
    print(
        f"real node: pod bound {seen.bound_s:.1f} s after submission, container done (exit 0, "
        f"CDI device seen) at {done_s:.1f} s; GPU detached and offered free {back_s:.1f} s "
        "after the pod's deletion"
    )


async def test_deleting_a_running_pod_unprepares_its_claim(bed: Bed) -> None:
    """A pod that runs until deleted: its claim stays prepared (CDI spec on the node) while it
    runs; deleting it makes the kubelet stop the container and unprepare the claim."""
    node, kube, name = bed.node, bed.kube, f"gpu-{bed.suffix}"
    since = len(kubelet_lines(node))
    await import_devcheck(node)
    await registered(bed, since)
    seen = Seen()
    await submit(bed, name, ["--wait"])
    await wait_pod(bed, name, seen, time.monotonic(), ("Running",))
    gpu = check_allocation(bed, seen)
    uid = seen.claim["metadata"]["uid"]

    async def reported() -> str:
        return await asyncio.to_thread(node.pod_log, NS, name, "check")

    report = await until(reported, what="devcheck's report", timeout=30)
    check_report(report, gpu)
    assert list(node.cdi.glob(f"*{uid}*")), "the claim's CDI spec is gone while its pod runs"
    assert not [d for d in decisions(bed.logs["node"], "unprepared") if d["claim"].endswith(name)]

    assert not [c for c in kubelet_calls(node, since, uid) if "NodeUnprepareResources" in c]

    t1 = time.monotonic()
    await kube.delete(f"{PODS}/{name}")  # graceful: SIGTERM, devcheck exits
    await unprepared(bed, uid, name)
    assert any("NodeUnprepareResources" in line for line in kubelet_calls(node, since, uid))
    unprepared_s = time.monotonic() - t1
    await back_in_pool(bed, name)
    no_dra_errors(bed, since)
    print(f"real node: running pod deleted -> claim unprepared in {unprepared_s:.1f} s")
