"""`cohdi-agent run` as a `Type=notify` service would run it, with this test playing systemd: our
own NOTIFY_SOCKET (tests/systemd/listener.py) and WATCHDOG_USEC in its environment.

- node role on a synthetic sysfs tree (no control plane: the kubeconfig points at a closed port,
  which the node role's start-up does not need): while the kubelet plugin cannot serve (its
  registry directory is blocked by a file) the watchdog is fed but READY=1 never comes; once the
  block is gone, the restarted role serves and READY=1 follows, from the agent's own pid, with
  the plugin's sockets already there; SIGTERM → STOPPING=1 and exit 0.
- the loop blocked by SIGUSR2 (--stall-on-sigusr2 5): no ping for the whole stall, pings after.
- cluster role against the local control plane through a proxy: while the API server does not
  answer, no READY=1; once it does, READY=1 comes after the Lease names us, with a `leader`
  STATUS; a second replica says READY=1 as `standby`; SIGTERM → STOPPING=1, exit 0, Lease free.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import settings
from agent.devcluster.controlplane import ControlPlane
from agent.simulated import stubnvml
from agent.simulated.sysfs import add_function
from tests.cluster.conftest import PASSWORD, World
from tests.conftest import kubeconfig_via
from tests.systemd.listener import Message, NotifyListener
from tests.tcpproxy import TcpProxy
from tests.waiting import until

#: 2 s: pings every 1 s. systemd would kill at a 2 s gap, so a loaded machine's loop may lag up
#: to 1 s without failing a test.
WATCHDOG_USEC = 2_000_000
LEASES = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases"

DEAD_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: u, user: {token: not-used}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
"""


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    sock = NotifyListener(tmp_path)
    try:
        yield sock
    finally:
        sock.close()


def spawn(
    args: list[str], listener: NotifyListener, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "agent", "run", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "NOTIFY_SOCKET": str(listener.path),
                "WATCHDOG_USEC": str(WATCHDOG_USEC),
                **(env or {}),
            },
        )


async def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then the exit status (SIGKILL after 20 s: a hang is a failure of its own)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.to_thread(proc.wait, 20)
    except subprocess.TimeoutExpired:
        proc.kill()
        await asyncio.to_thread(proc.wait)
        raise AssertionError("the agent did not stop within 20 s of SIGTERM") from None


def pings(listener: NotifyListener, pid: int) -> list[float]:
    return [m.at for m in listener.seen("WATCHDOG", "1") if m.pid == pid]


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


# --- node role -----------------------------------------------------------------------------------


def node_args(tmp_path: Path, kubelet_dir: Path, stub: Path) -> list[str]:
    kubeconfig = tmp_path / "dead.kubeconfig"
    kubeconfig.write_text(DEAD_KUBECONFIG)
    return [
        "--roles",
        "node",
        "--kubeconfig",
        str(kubeconfig),
        "--node-name",
        "n1",
        "--node-sysfs-root",
        str(tmp_path / "sys"),
        "--node-nvml-path",
        str(stub),
        "--node-kubelet-dir",
        str(kubelet_dir),
        "--node-cdi-dir",
        str(tmp_path / "cdi"),
        "--node-rescan",
        "never",
        "--stall-on-sigusr2",
        "5",
    ]


@pytest.fixture
def node_tree(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(kubelet dir, stub NVML): a synthetic tree with one GPU, NVML listing none."""
    add_function(tmp_path / "sys", "0000:41:00.0")
    (tmp_path / "nvml-gpus").touch()
    stub = stubnvml.build(settings.Settings().cache_dir)
    kubelet_dir = Path(tempfile.mkdtemp(prefix="kl-", dir="/tmp"))  # socket paths < 108 bytes
    try:
        yield kubelet_dir, stub
    finally:
        shutil.rmtree(kubelet_dir, ignore_errors=True)


async def test_node_role_ready_only_once_serving_then_watchdog_then_stopping(
    tmp_path: Path, listener: NotifyListener, node_tree: tuple[Path, Path]
) -> None:
    kubelet_dir, stub = node_tree
    blocker = kubelet_dir / "plugins_registry"
    blocker.write_text("a file where the plugin's registry directory must go\n")
    registry = kubelet_dir / "plugins_registry"
    log = tmp_path / "agent.log"
    proc = spawn(
        node_args(tmp_path, kubelet_dir, stub),
        listener,
        log,
        {"STUB_NVML_GPUS": str(tmp_path / "nvml-gpus")},
    )
    try:

        async def fed(n: int) -> bool:
            assert proc.poll() is None, f"the agent exited ({proc.returncode}): {log.read_text()}"
            return len(pings(listener, proc.pid)) >= n

        await until(lambda: fed(4), what="3 s of watchdog pings", timeout=60)
        assert listener.seen("READY") == [], "READY=1 while the kubelet plugin cannot serve"
        blocked = [s for s in listener.statuses() if "node: failed" in s and str(blocker) in s]
        assert blocked, listener.statuses()
        print(f"\nwhile blocked: {len(pings(listener, proc.pid))} pings, STATUS {blocked[-1]!r}")

        blocker.unlink()
        unblocked = time.monotonic()
        ready: Message = await until(
            lambda: _first(listener, "READY"), what="READY=1 after the block is gone", timeout=60
        )
        assert _registrations(registry), "READY=1 before the registration socket was there"
        assert ready.at > unblocked
        assert ready.pid == proc.pid, "systemd (NotifyAccess=main) takes READY from the main pid"
        assert ready.fields["STATUS"].startswith("node n1: 1 GPU(s), kubelet plugin serving")
        print(f"READY=1 {ready.at - unblocked:.1f} s after the block went: {ready.fields}")
        so_far = len(pings(listener, proc.pid))
        await until(lambda: fed(so_far + 3), what="pings after READY")
    finally:
        rc = await stop(proc)
    stopping = listener.first("STOPPING", "1")
    assert stopping is not None, listener.messages
    assert stopping.pid == proc.pid
    assert rc == 0, log.read_text()
    assert not _registrations(registry), "the plugin removed its sockets on SIGTERM"
    times = pings(listener, proc.pid)
    assert times[0] < ready.at, "the watchdog is fed from the start, not only once ready"
    spacing = gaps(times)
    print(
        f"WATCHDOG_USEC={WATCHDOG_USEC}: {len(times)} pings, gap max {max(spacing):.2f} s, "
        f"median {sorted(spacing)[len(spacing) // 2]:.2f} s"
    )
    assert max(spacing) < WATCHDOG_USEC / 1e6, "a gap long enough for systemd to kill us"
    half, median = WATCHDOG_USEC / 2e6, sorted(spacing)[len(spacing) // 2]
    assert 0.8 * half <= median <= 1.2 * half, "pings at half the period"


async def test_a_blocked_event_loop_stops_the_pings(
    tmp_path: Path, listener: NotifyListener, node_tree: tuple[Path, Path]
) -> None:
    kubelet_dir, stub = node_tree
    log = tmp_path / "agent.log"
    proc = spawn(
        node_args(tmp_path, kubelet_dir, stub),
        listener,
        log,
        {"STUB_NVML_GPUS": str(tmp_path / "nvml-gpus")},
    )
    try:
        await until(lambda: _first(listener, "READY"), what="READY=1", timeout=60)
        before = len(pings(listener, proc.pid))
        proc.send_signal(signal.SIGUSR2)  # --stall-on-sigusr2 5: the loop sleeps 5 s
        sent = time.monotonic()

        async def resumed() -> bool:
            assert proc.poll() is None, f"the agent exited ({proc.returncode}): {log.read_text()}"
            return any(t > sent + 4.5 for t in pings(listener, proc.pid))

        await until(resumed, what="pings after the stall", timeout=30)
    finally:
        rc = await stop(proc)
    assert rc == 0, log.read_text()
    times = pings(listener, proc.pid)
    longest = max(gaps(times[before - 1 :]))
    print(f"\nSIGUSR2 stalled the loop for 5 s: longest gap between pings {longest:.2f} s")
    assert longest >= 4.5, "the pings went on while the loop was blocked"
    assert "blocking the event loop for 5.0 s" in log.read_text()


# --- cluster role --------------------------------------------------------------------------------


def cluster_args(world: World, kubeconfig: Path, lease: str, identity: str) -> list[str]:
    assert world.emulator.ca_file is not None
    return [
        "--kubeconfig",
        str(kubeconfig),
        "--driver",
        world.driver,
        "--lease-name",
        lease,
        "--lease-identity",
        identity,
        "--fabric-url",
        world.emulator.url,
        "--fabric-user",
        "admin",
        "--fabric-ca-bundle",
        str(world.emulator.ca_file),
        "--fabric-poll-interval",
        "0.5",
    ]


@pytest.mark.controlplane
@pytest.mark.parametrize("world", [{"nodes": 1, "gpus": 2}], indirect=True)
async def test_cluster_role_ready_after_leading_with_synced_informers_standby_too(
    world: World, control_plane: ControlPlane, tmp_path: Path, listener: NotifyListener
) -> None:
    proxy = TcpProxy(control_plane.apiserver_port)
    await proxy.start()
    proxy.block()
    kubeconfig = kubeconfig_via(control_plane, proxy.port, tmp_path / "via-proxy.kubeconfig")
    lease = f"lease-{world.suffix}"
    leader = f"leader-{world.suffix}"
    env = {"COHDI_FABRIC_PASSWORD": PASSWORD}
    log = tmp_path / "leader.log"
    proc = spawn(cluster_args(world, kubeconfig, lease, leader), listener, log, env)
    standby_dir = tmp_path / "standby"
    standby_dir.mkdir()
    standby_listener = NotifyListener(standby_dir)
    second: subprocess.Popen[bytes] | None = None
    try:

        async def refused() -> bool:
            assert proc.poll() is None, f"the agent exited ({proc.returncode}): {log.read_text()}"
            return proxy.refused >= 3 and len(pings(listener, proc.pid)) >= 3

        await until(refused, what="the agent trying the API server", timeout=60)
        assert listener.seen("READY") == [], "READY=1 before the API server ever answered"
        print(f"\nAPI server unreachable: STATUS {listener.statuses()}")

        proxy.unblock()
        ready = await until(lambda: _first(listener, "READY"), what="READY=1", timeout=60)
        holder = (await world.kube.get(f"{LEASES}/{lease}"))["spec"]["holderIdentity"]
        assert holder == leader, "READY=1 came before the Lease named us"
        assert ready.pid == proc.pid
        assert ready.fields["STATUS"].startswith("cluster: leader"), ready.fields
        print(f"leader READY=1: {ready.fields}")
        await until(
            lambda: _status_has(listener, "cluster: leader, fabric manager reachable"),
            what="the leader's STATUS once the fabric answered",
            timeout=60,
        )

        second = spawn(
            cluster_args(world, kubeconfig, lease, f"standby-{world.suffix}"),
            standby_listener,
            tmp_path / "standby.log",
            env,
        )
        standby = await until(
            lambda: _first(standby_listener, "READY"), what="the standby's READY=1", timeout=60
        )
        assert standby.fields["STATUS"] == f"cluster: standby, Lease held by {leader}"
        print(f"standby READY=1: {standby.fields}")
    finally:
        rc = await stop(proc)
        rc2 = await stop(second) if second is not None else 0
        standby_listener.close()
        await proxy.close()
    stopping = listener.first("STOPPING", "1")
    assert stopping is not None
    assert rc == 0, log.read_text()
    assert rc2 == 0
    holder = (await world.kube.get(f"{LEASES}/{lease}"))["spec"].get("holderIdentity") or ""
    assert holder in ("", f"standby-{world.suffix}"), "the leader released its Lease"
    spacing = gaps(pings(listener, proc.pid))
    print(f"leader: {len(spacing) + 1} pings, longest gap {max(spacing):.2f} s")
    assert max(spacing) < WATCHDOG_USEC / 1e6


# --- helpers -------------------------------------------------------------------------------------


def _registrations(registry: Path) -> list[Path]:
    """The plugin's registration sockets in kubelet's registry (`<driver>-<instance>-reg.sock`,
    one per agent process)."""
    return [p for p in registry.glob("composable.cohdi.io-*-reg.sock") if p.is_socket()]


async def _first(listener: NotifyListener, key: str) -> Message | None:
    return listener.first(key)


async def _status_has(listener: NotifyListener, text: str) -> bool:
    return text in listener.statuses()
