"""Start and stop everything the demo (and the full-stack test) runs, as real processes where the
product runs as processes: the cluster role and every simulated node are `cohdi-agent run`
subprocesses; the emulator and the control plane are started by the same code the tests use.

Nothing outlives the demo. Every part is registered for stopping the moment it starts (an
`AsyncExitStack`), so a start that fails or is cancelled half-way stops what it had started, and
`stop()` stops it all, newest first. Each child process also gets SIGTERM from the kernel when
the demo dies without stopping them (PR_SET_PDEATHSIG: SIGKILL, a crash), and runs in its own
session, so a Ctrl-C in the terminal reaches the demo only, which stops them in order."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import settings
from agent.demo.objects import make_node
from agent.devcluster import local
from agent.devcluster.controlplane import ControlPlane
from agent.fabric.emulator import config as emuconfig
from agent.fabric.emulator.server import EmulatorServer
from agent.fabric.emulator.sysfs_hook import SysfsHook
from agent.kube.client import Kube
from agent.manifests import installing
from agent.simulated import stubnvml

MODELS = ("NVIDIA-A100-PCIE-40GB", "NVIDIA-H100-PCIE-80GB")


@dataclass
class World:
    workdir: Path
    nodes: list[str]
    driver: str
    kubeconfig: Path
    kube: Kube
    emulator: EmulatorServer
    control_plane: ControlPlane | None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: Stops every part started, newest first (`stop()`).
    parts: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    def node_dir(self, node: str) -> Path:
        return self.workdir / "nodes" / node

    def plugin_socket(self, node: str) -> Path:
        return self.node_dir(node) / "kubelet" / "plugins" / self.driver / "dra.sock"

    def cdi_dir(self, node: str) -> Path:
        return self.node_dir(node) / "cdi"

    def checkpoint(self, node: str) -> Path:
        return self.node_dir(node) / "kubelet" / "plugins" / self.driver / "checkpoint.json"


async def start(
    cfg: settings.Settings,
    *,
    workdir: Path,
    nodes: int,
    gpus: int,
    attach_latency: float,
    idle_grace: float,
    kubeconfig: str = "",
    progress: Any = print,
) -> World:
    """Start the world; on any failure or cancellation stop what was started and raise."""
    parts = contextlib.AsyncExitStack()
    try:
        return await _start(
            cfg,
            parts,
            workdir=workdir,
            nodes=nodes,
            gpus=gpus,
            attach_latency=attach_latency,
            idle_grace=idle_grace,
            kubeconfig=kubeconfig,
            progress=progress,
        )
    except BaseException:
        await _to_the_end(parts.aclose())
        raise


async def _start_control_plane(cp: ControlPlane) -> None:
    """`cp.start()` on a thread. Cancelled meanwhile: stop it (its start gives up at its next
    wait) and wait for the thread, so no process it spawns is left behind."""
    started = asyncio.get_running_loop().run_in_executor(None, cp.start)
    try:
        await asyncio.shield(started)
    except asyncio.CancelledError:
        await asyncio.to_thread(cp.stop)
        with contextlib.suppress(Exception):
            await started
        await asyncio.to_thread(cp.stop)
        raise


async def _start(
    cfg: settings.Settings,
    parts: contextlib.AsyncExitStack,
    *,
    workdir: Path,
    nodes: int,
    gpus: int,
    attach_latency: float,
    idle_grace: float,
    kubeconfig: str,
    progress: Any,
) -> World:
    await asyncio.to_thread(_fresh, workdir)
    cp: ControlPlane | None = None
    if kubeconfig:
        kubeconfig_path = Path(kubeconfig)
    else:
        binaries = await asyncio.to_thread(local.binaries, cfg.cache_dir, cfg.dev.kube_version)
        cp = ControlPlane(
            binaries=binaries,
            state_dir=workdir / "control-plane",
            binding_timeout_s=cfg.dev.binding_timeout,
            progress=local.progress,
        )
        parts.push_async_callback(asyncio.to_thread, cp.stop)
        await _start_control_plane(cp)
        kubeconfig_path = cp.kubeconfig
    kube = await Kube.connect(kubeconfig=str(kubeconfig_path))
    parts.push_async_callback(kube.close)
    driver = cfg.cluster.driver
    await installing.install(kube, driver)
    names = [f"gpu-server-{i}" for i in range(nodes)]
    for n in names:
        await make_node(kube, n, {"cohdi.io/demo": "true"})
    password = secrets.token_urlsafe(18)
    half = gpus // 2
    conf = emuconfig.parse(
        {
            "machines": [{"id": f"m-{n}", "name": n, "fabric": "fabric0"} for n in names],
            "devices": [
                {
                    "model": MODELS[0],
                    "count": half,
                    "memory": 40 * 2**30,
                    "pci_device": "0x20f1",
                    "attach_latency": attach_latency,
                    "detach_latency": attach_latency,
                },
                {
                    "model": MODELS[1],
                    "count": gpus - half,
                    "memory": 80 * 2**30,
                    "pci_device": "0x2331",
                    "attach_latency": attach_latency,
                    "detach_latency": attach_latency,
                },
            ],
            "users": [{"name": "admin", "password": password}],
        }
    )
    emulator = EmulatorServer(
        conf, tls_dir=workdir / "fabric-tls", state_file=workdir / "fabric-state.json"
    )
    world = World(workdir, names, driver, kubeconfig_path, kube, emulator, cp, parts=parts)
    hook = SysfsHook(lambda m: world.node_dir(m.name) if m.name in names else None)
    emulator.state.on_appear.append(hook.appear)
    emulator.state.on_disappear.append(hook.disappear)
    parts.push_async_callback(emulator.stop)
    await emulator.start()
    stub = await asyncio.to_thread(stubnvml.build, cfg.cache_dir)
    common = [
        sys.executable,
        "-m",
        "agent",
        "run",
        "--kubeconfig",
        str(kubeconfig_path),
        "--driver",
        driver,
        "--log-format",
        "json",
    ]
    env = {**os.environ, "COHDI_FABRIC_PASSWORD": password}
    logs = workdir / "logs"
    logs.mkdir()
    parts.push_async_callback(_stop_processes, world.processes)
    for n in names:
        d = world.node_dir(n)
        (d / "sys" / "bus" / "pci" / "devices").mkdir(parents=True, exist_ok=True)
        (d / "nvml-gpus").touch()
        world.processes[n] = _spawn(
            [
                *common,
                "--roles",
                "node",
                "--node-name",
                n,
                "--node-sysfs-root",
                str(d / "sys"),
                "--node-nvml-path",
                str(stub),
                "--node-kubelet-dir",
                str(d / "kubelet"),
                "--node-cdi-dir",
                str(d / "cdi"),
                "--node-rescan",
                "never",
            ],
            {**env, "STUB_NVML_GPUS": str(d / "nvml-gpus")},
            logs / f"{n}.log",
        )
    world.processes["cluster"] = _spawn(
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
            "--fabric-poll-interval",
            "1",
            *_backend_args(cfg.fabric.backend),
            "--idle-grace",
            str(idle_grace),
            "--warm-devices",
            str(cfg.cluster.warm_devices),
            "--lease-name",
            "cohdi-demo",
            "--lease-duration",
            "4",
            "--lease-renew-deadline",
            "3",
            "--lease-retry-period",
            "0.5",
        ],
        env,
        logs / "cluster.log",
    )
    progress(f"started {nodes} simulated GPU servers and the cluster role (logs in {logs})")
    return world


def _backend_args(backend: str) -> list[str]:
    """The emulator serves both protocols over one state: the cluster role speaks `backend`."""
    if backend == "fti":
        return [
            "--fabric-backend",
            "fti",
            "--fabric-tenant",
            emuconfig.DEFAULT_TENANT,
            "--fabric-models",
            ",".join(MODELS),
        ]
    return ["--fabric-backend", "redfish"]


def _fresh(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)


_PR_SET_PDEATHSIG = 1
_libc: Any = None


def _die_with_parent() -> None:
    """In the child, between fork and exec: only the prctl call (libc was loaded before the
    fork: a dlopen here could wait forever on a lock another thread of the parent held)."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A child in its own session that the kernel sends SIGTERM when the thread that forked it
    (the event loop's, which lives as long as the demo) dies."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    with log.open("wb") as out:
        return subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


async def _stop_processes(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM to every child still running, then wait for each (10 s, then SIGKILL)."""
    for proc in processes.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in processes.values():
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)


async def stop(world: World) -> None:
    """Stop everything `start` started, newest first: the agent processes, the emulator, the
    API client, the control plane. Finishes even when cancelled meanwhile (then re-raises)."""
    await _to_the_end(world.parts.aclose())


async def _to_the_end(stopping: Coroutine[Any, Any, Any]) -> None:
    """Await `stopping` to its end even if this task is cancelled meanwhile (a second Ctrl-C
    must not leave half the processes running); a cancellation is re-raised afterwards."""
    task = asyncio.ensure_future(stopping)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    task.result()
