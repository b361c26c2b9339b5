"""cohdi-agent-cluster.service under a real systemd (PID 1 of a Debian container booted with
systemd-nspawn, tests/systemd/nspawn.py), installed the way the README says: the wheel built from
this tree into a venv at /opt/cohdi-agent/venv, the unit as shipped, the environment file and
the kubeconfig and fabric password as credentials in /etc/cohdi-agent. Only a drop-in differs:
WatchdogSec=3s and RestartSec=1s, to keep the test short.

- `systemctl start` returns once the agent said READY=1: the unit is active, running as leader of
  the test's Lease (STATUS= says so), with every hardening option of the unit in force;
- SIGUSR2 (with COHDI_STALL_ON_SIGUSR2=60) blocks the agent's event loop: the pings stop, systemd
  logs a watchdog timeout, kills it (SIGABRT) and starts it again (NRestarts=1), active again;
- `systemctl stop`: STOPPING=1, exit 0, the unit inactive with Result=success, the Lease released.

Skipped, with the reason, where containers cannot be booted (not root, no util-linux, no Debian
archive to fetch systemd-nspawn and mmdebstrap from).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from agent import settings
from agent.devcluster.controlplane import ControlPlane
from tests.cluster.conftest import PASSWORD, World
from tests.systemd import nspawn
from tests.waiting import until

pytestmark = pytest.mark.controlplane

ROOT = Path(__file__).resolve().parents[2]
UNIT = "cohdi-agent-cluster.service"
NODE_UNIT = "cohdi-agent.service"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases"


def build_wheelhouse(out: Path) -> Path:
    """The agent's wheel, built from the tracked files of this tree, and the wheels of its
    dependencies (for this interpreter's Python: 3.11, the rootfs's), in one directory."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    src = out / "src"
    for rel in {f for f in files.split("\0") if f and (ROOT / f).is_file()}:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel, follow_symlinks=False)
    wheels = out / "wheels"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    for argv in (
        ["wheel", "--no-deps", "-w", str(wheels), str(src)],
        ["wheel", "-w", str(wheels), "--find-links", str(wheels), "cohdi-agent"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    return wheels


def flat_kubeconfig(cp: ControlPlane) -> str:
    """The admin kubeconfig with its certificates inline (as `kubectl config view --flatten`)."""
    doc = yaml.safe_load(cp.kubeconfig.read_text())
    cluster, user = doc["clusters"][0]["cluster"], doc["users"][0]["user"]
    pairs = [(cluster, "certificate-authority"), (user, "client-certificate"), (user, "client-key")]
    for entry, key in pairs:
        entry[f"{key}-data"] = base64.b64encode(Path(entry.pop(key)).read_bytes()).decode()
    return yaml.safe_dump(doc)


def etc_files(world: World, cp: ControlPlane, etc: Path, lease: str, identity: str) -> None:
    """/etc/cohdi-agent as the README has it, for this test's world."""
    assert world.emulator.ca_file is not None
    etc.mkdir()
    shutil.copy(world.emulator.ca_file, etc / "fabric-ca.pem")
    (etc / "kubeconfig").write_text(flat_kubeconfig(cp))
    (etc / "fabric-password").write_text(PASSWORD + "\n")
    for secret in ("kubeconfig", "fabric-password"):
        (etc / secret).chmod(0o600)
    (etc / "cohdi-agent.env").write_text(
        "\n".join(
            [
                f"COHDI_DRIVER={world.driver}",
                "COHDI_LOG_FORMAT=json",
                f"COHDI_LEASE_NAME={lease}",
                f"COHDI_LEASE_IDENTITY={identity}",
                f"COHDI_FABRIC_URL={world.emulator.url}",
                "COHDI_FABRIC_USER=admin",
                "COHDI_FABRIC_CA_BUNDLE=/etc/cohdi-agent/fabric-ca.pem",
                "COHDI_FABRIC_POLL_INTERVAL=0.5",
                "COHDI_STALL_ON_SIGUSR2=60",
                "",
            ]
        )
    )
    dropin(etc, UNIT)


def dropin(etc: Path, unit: str) -> None:
    """The test's only change to a unit: a 3 s watchdog and a 1 s restart delay."""
    d = etc / f"{unit}.d"
    d.mkdir()
    (d / "test.conf").write_text("[Service]\nWatchdogSec=3s\nRestartSec=1s\n")


@dataclass(frozen=True)
class Installed:
    tools: nspawn.Tools
    rootfs: Path
    opt: Path  # holds venv/, bound at /opt/cohdi-agent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The cached rootfs, and the agent installed from a wheel of this tree into a venv made by
    the rootfs's own Python (a directory bound at /opt/cohdi-agent), once for this module."""
    why = nspawn.unavailable()
    if why:
        pytest.skip(why)
    cache = settings.Settings().cache_dir
    started = time.monotonic()
    try:
        tools = nspawn.tools(cache)
        rootfs, built = nspawn.rootfs(cache, tools)
    except RuntimeError as exc:  # no archive reachable, no apt lists, ...
        pytest.skip(f"cannot make a Debian rootfs with systemd here: {exc}")
    print(f"\nrootfs {rootfs}: " + (f"built in {built:.0f} s" if built else "cached"))
    base = tmp_path_factory.mktemp("install")
    wheels = build_wheelhouse(base / "build")
    opt = base / "opt"
    opt.mkdir()
    nspawn.run_in(
        tools,
        rootfs,
        [f"--bind={opt}:/opt/cohdi-agent", f"--bind-ro={wheels}:/wheels"],
        [
            "/bin/sh",
            "-c",
            "python3 -m venv /opt/cohdi-agent/venv && /opt/cohdi-agent/venv/bin/pip install "
            "--quiet --no-index --find-links /wheels cohdi-agent",
        ],
    )
    print(f"wheel built and installed into the venv in {time.monotonic() - started:.0f} s")
    return Installed(tools, rootfs, opt)


@contextlib.asynccontextmanager
async def booted(
    installed: Installed, unit: str, etc: Path, tmp_path: Path, extra: Sequence[str] = ()
) -> AsyncIterator[nspawn.Machine]:
    """A container with `unit` as shipped (plus the test drop-in in etc/<unit>.d) and
    /etc/cohdi-agent = `etc`; the unit's journal is kept in tmp_path/journal.txt."""
    binds = [
        f"--bind-ro={installed.opt}:/opt/cohdi-agent",
        f"--bind-ro={etc}:/etc/cohdi-agent",
        f"--bind-ro={ROOT / 'systemd' / unit}:/etc/systemd/system/{unit}",
        f"--bind-ro={etc / (unit + '.d')}:/etc/systemd/system/{unit}.d",
        *extra,
    ]
    started = time.monotonic()
    with nspawn.Machine(installed.tools, installed.rootfs, binds, tmp_path / "console.log") as m:
        state = await asyncio.to_thread(m.wait_booted)
        print(f"\ncontainer booted ({state}) in {time.monotonic() - started:.0f} s")
        try:
            yield m
        finally:
            journal = await asyncio.to_thread(
                m.sh, f"journalctl --no-pager -o cat -u {unit}", check=False
            )
            (tmp_path / "journal.txt").write_text(journal.stdout)


@pytest.mark.parametrize("world", [{"nodes": 1, "gpus": 2}], indirect=True)
async def test_cluster_unit_under_systemd_starts_is_restarted_by_the_watchdog_and_stops(
    world: World, control_plane: ControlPlane, tmp_path: Path, installed: Installed
) -> None:
    lease, identity = f"lease-{world.suffix}", f"systemd-{world.suffix}"
    etc = tmp_path / "etc"
    etc_files(world, control_plane, etc, lease, identity)
    async with booted(installed, UNIT, etc, tmp_path) as machine:
        await _start_stall_stop(world, machine, lease, identity)


@pytest.mark.parametrize("world", [{"nodes": 1, "gpus": 2}], indirect=True)
async def test_node_unit_under_systemd_serves_kubelet_inside_its_sandbox(
    world: World, control_plane: ControlPlane, tmp_path: Path, installed: Installed
) -> None:
    """cohdi-agent.service as shipped (the node role over the machine's real /sys, NVML absent):
    active once the plugin serves, root with exactly CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH,
    writes allowed exactly where ReadWritePaths= says; the sockets gone after stop."""
    node = world.nodes[0]
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "kubeconfig").write_text(flat_kubeconfig(control_plane))
    (etc / "cohdi-agent.env").write_text(
        f"COHDI_DRIVER={world.driver}\nCOHDI_NODE_NAME={node}\nCOHDI_LOG_FORMAT=json\n"
    )
    dropin(etc, NODE_UNIT)
    tmpfiles = f"--bind-ro={ROOT / 'systemd' / 'cohdi-agent.tmpfiles'}:/etc/tmpfiles.d/cohdi.conf"
    sockets = [  # shell globs: the process's own names (<instance>), and the node-local one
        f"/var/lib/kubelet/plugins_registry/{world.driver}-*-reg.sock",
        f"/var/lib/kubelet/plugins/{world.driver}/dra-*.sock",
        f"/var/lib/kubelet/plugins/{world.driver}/dra.sock",
    ]
    async with booted(installed, NODE_UNIT, etc, tmp_path, [tmpfiles]) as machine:

        async def sh(command: str) -> subprocess.CompletedProcess[str]:
            return await asyncio.to_thread(machine.sh, command, check=False)

        done = await sh(f"systemctl start {NODE_UNIT}")
        assert done.returncode == 0, done.stdout + done.stderr
        unit = await asyncio.to_thread(
            machine.show, NODE_UNIT, "ActiveState", "SubState", "MainPID", "StatusText"
        )
        print(f"started: {unit}")
        assert (unit["ActiveState"], unit["SubState"]) == ("active", "running")
        assert unit["StatusText"].startswith(f"node {node}: "), unit
        assert "kubelet plugin serving" in unit["StatusText"]
        for sock in sockets:
            assert (await sh(f"test -S {sock}")).returncode == 0, f"{sock} is not a socket"
        pid = unit["MainPID"]
        status = dict(
            line.split(":", 1) for line in (await sh(f"cat /proc/{pid}/status")).stdout.splitlines()
        )
        caps = int(status["CapBnd"].strip(), 16)
        print(f"Uid {status['Uid'].split()[0]}, CapBnd {caps:#x}, Seccomp {status['Seccomp']}")
        assert status["Uid"].split()[0] == "0"
        assert caps == (1 << 19) | (1 << 2), "exactly CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH"
        assert status["Seccomp"].strip() == "2"
        assert status["NoNewPrivs"].strip() == "1"
        # the service's own view of the file system (its mount namespace)
        writes = {
            path: (await sh(f"nsenter -t {pid} -m touch {path}")).returncode == 0
            for path in (
                f"/var/lib/kubelet/plugins/{world.driver}/probe",
                "/var/lib/kubelet/plugins_registry/probe",
                "/run/cdi/probe",
                "/var/lib/kubelet/probe",
                "/etc/cohdi-agent-probe",
                "/opt/cohdi-agent/probe",
                "/run/probe",
                "/run/lock/probe",
            )
        }
        print(f"writable in the service's mount namespace: {writes}")
        # The sysfs files it writes are mounts of their own under ProtectKernelTunables' read-only
        # /sys. (Here they stay read-only, as nspawn gives the container a read-only /sys, and
        # ReadWritePaths= only undoes the unit's own read-only mounts; on a host they are rw.)
        mounts = (await sh(f"cut -d' ' -f5 /proc/{pid}/mountinfo")).stdout.split()
        assert {"/sys", "/sys/bus/pci/rescan", "/sys/devices"} <= set(mounts)
        assert writes == {
            f"/var/lib/kubelet/plugins/{world.driver}/probe": True,
            "/var/lib/kubelet/plugins_registry/probe": True,
            "/run/cdi/probe": True,
            "/var/lib/kubelet/probe": False,
            "/etc/cohdi-agent-probe": False,
            "/opt/cohdi-agent/probe": False,
            "/run/probe": False,
            "/run/lock/probe": False,
        }
        stop = await sh(f"systemctl stop {NODE_UNIT}")
        assert stop.returncode == 0, stop.stdout + stop.stderr
        last = await asyncio.to_thread(machine.show, NODE_UNIT, "ActiveState", "Result")
        assert (last["ActiveState"], last["Result"]) == ("inactive", "success"), last
        for sock in sockets:
            assert (await sh(f"ls -d {sock}")).returncode != 0, f"{sock} left behind"


async def _start_stall_stop(
    world: World, machine: nspawn.Machine, lease: str, identity: str
) -> None:
    props = ("ActiveState", "SubState", "Result", "NRestarts", "MainPID", "StatusText")

    # Every call into the container runs on a thread: the fabric emulator and the API client
    # live on this test's event loop, which must keep answering the agent meanwhile.
    async def sh(command: str, limit: float = 120) -> str:
        return (await asyncio.to_thread(machine.sh, command, timeout=limit)).stdout

    async def show() -> dict[str, str]:
        return await asyncio.to_thread(machine.show, UNIT, *props)

    async def holder() -> str:
        return str((await world.kube.get(f"{LEASES}/{lease}"))["spec"].get("holderIdentity") or "")

    # start: returns once READY=1 came (Type=notify)
    t0 = time.monotonic()
    done = await asyncio.to_thread(machine.sh, f"systemctl start {UNIT}", check=False, timeout=180)
    if done.returncode != 0:
        journal = await sh(f"journalctl --no-pager -o cat -u {UNIT}")
        raise AssertionError(f"{done.stdout}{done.stderr}\n{journal[-4000:]}")
    first = await show()
    print(f"started in {time.monotonic() - t0:.1f} s: {first}")
    assert (first["ActiveState"], first["SubState"]) == ("active", "running")
    assert first["StatusText"].startswith("cluster: leader"), first
    assert await holder() == identity
    sandbox = await sh(f"cat /proc/{first['MainPID']}/status")
    caps = next(line for line in sandbox.splitlines() if line.startswith("CapBnd:"))
    seccomp = next(line for line in sandbox.splitlines() if line.startswith("Seccomp:"))
    assert caps.split()[1] == "0000000000000000", f"no capability at all: {caps}"
    assert seccomp.split()[1] == "2", f"a seccomp filter is in force: {seccomp}"
    uid = next(line for line in sandbox.splitlines() if line.startswith("Uid:")).split()[1]
    print(f"running as uid {uid} (DynamicUser=yes), {caps}, {seccomp}")
    assert uid != "0"

    # stall the event loop: the watchdog (3 s) kills and restarts it
    await sh(f"systemctl kill --kill-whom=main --signal=SIGUSR2 {UNIT}")
    stalled = time.monotonic()

    async def restarted() -> dict[str, str] | None:
        now = await show()
        fresh = now["NRestarts"] == "1" and now["MainPID"] not in ("0", first["MainPID"])
        return now if fresh and now["ActiveState"] == "active" else None

    again = await until(restarted, what="the watchdog's restart, active again", timeout=90)
    print(f"restarted by the watchdog {time.monotonic() - stalled:.1f} s after SIGUSR2: {again}")
    journal = await sh(f"journalctl --no-pager -o cat -u {UNIT}")
    assert "Watchdog timeout" in journal, journal[-3000:]
    assert "blocking the event loop" in journal

    async def leading() -> bool:
        return await holder() == identity

    await until(leading, what="the Lease held again", timeout=60)

    # stop: clean, Lease released
    t1 = time.monotonic()
    await sh(f"systemctl stop {UNIT}", limit=60)
    last = await show()
    print(f"stopped in {time.monotonic() - t1:.1f} s: {last}")
    assert (last["ActiveState"], last["Result"]) == ("inactive", "success"), last
    assert await holder() == "", "the Lease was released on stop"
