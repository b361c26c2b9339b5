"""The kubelet plugin's standard gRPC health service (grpc.health.v1.Health), asked with gRPC's
own health client stub over the plugin's unix sockets, as `grpc_health_probe -addr unix://...`
does: SERVING while the plugin serves and the node role is ready, NOT_SERVING when it is not (a
reason from the role, an unreadable checkpoint) and once it stops; Watch streams each change; a
service the socket does not serve is NOT_FOUND. And through the real node role: a corrupt
checkpoint makes the DRA socket say NOT_SERVING until the file is moved away."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.node.plugin import KubeletPlugin
from tests import kubelet
from tests.node.simnode import DRIVER, SimNode, make_node, node_role
from tests.waiting import until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DRA_V1 = "k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin"
DRA_V1BETA1 = "k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin"
RESOURCE_HEALTH = "v1alpha1.DRAResourceHealth"
REGISTRATION = "pluginregistration.Registration"


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimNode:
    return make_node(tmp_path, monkeypatch)


@pytest.fixture
def kubelet_dir() -> Iterator[Path]:
    """Short, like /var/lib/kubelet: a unix socket path holds at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="kh-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Reasons:
    """A node role's readiness that the test sets: why it is not ready, empty when ready."""

    def __init__(self) -> None:
        self.now: list[str] = []

    def __call__(self) -> list[str]:
        return list(self.now)


@pytest.fixture
async def plugin(node: SimNode, kubelet_dir: Path) -> AsyncIterator[tuple[KubeletPlugin, Reasons]]:
    reasons = Reasons()
    plugin = KubeletPlugin(
        node.kube,
        driver=DRIVER,
        kubelet_dir=kubelet_dir,
        cdi_dir=node.root / "cdi",
        reporter=node.reporter,
        not_ready=reasons,
    )
    await plugin.start()
    try:
        yield plugin, reasons
    finally:
        await plugin.stop()


async def check(socket: Path, service: str = "") -> Any:
    """Health/Check over the unix socket: the status, or the gRPC status code of a failure."""
    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return answer.status


def status_is(socket: Path, want: int, service: str = "") -> Any:
    async def probe() -> bool:
        return bool(await check(socket, service) == want)

    return probe


async def test_serving_on_both_sockets_for_the_server_and_each_service(
    plugin: tuple[KubeletPlugin, Reasons],
) -> None:
    p, _ = plugin
    await until(status_is(p.dra_socket, SERVING), what="the DRA socket SERVING", timeout=10)
    for service in (DRA_V1, DRA_V1BETA1, RESOURCE_HEALTH):
        assert await check(p.dra_socket, service) == SERVING, service
    for service in ("", REGISTRATION):
        assert await check(p.reg_socket, service) == SERVING, service
    # a service the socket does not serve is unknown to it, as gRPC's health protocol says
    assert await check(p.dra_socket, REGISTRATION) == grpc.StatusCode.NOT_FOUND
    assert await check(p.reg_socket, DRA_V1) == grpc.StatusCode.NOT_FOUND
    assert p.grpc_health.reasons == []


async def test_a_node_role_that_is_not_ready_is_not_serving_and_watch_follows(
    plugin: tuple[KubeletPlugin, Reasons],
) -> None:
    """Watch on the DRA socket: SERVING, NOT_SERVING while the role gives a reason, SERVING
    again, and NOT_SERVING when the plugin stops, before the stream ends."""
    p, reasons = plugin
    await until(status_is(p.dra_socket, SERVING), what="the DRA socket SERVING", timeout=10)
    seen: list[int] = []
    async with grpc.aio.insecure_channel(f"unix://{p.dra_socket}") as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())

        async def next_status() -> int:
            answer = await asyncio.wait_for(stream.read(), timeout=10)
            assert answer is not grpc.aio.EOF
            seen.append(answer.status)
            return int(answer.status)

        assert await next_status() == SERVING
        reasons.now = ["first PCI scan not done"]
        assert await next_status() == NOT_SERVING
        assert await check(p.reg_socket) == NOT_SERVING
        assert p.grpc_health.reasons == ["first PCI scan not done"]
        reasons.now = []
        assert await next_status() == SERVING
        stopping = asyncio.create_task(p.stop())
        assert await next_status() == NOT_SERVING
        await stopping
        stream.cancel()
    assert seen == [SERVING, NOT_SERVING, SERVING, NOT_SERVING]
    assert p.grpc_health.reasons == ["stopping"]


async def test_not_serving_from_the_start_until_the_first_verdict(
    node: SimNode, kubelet_dir: Path
) -> None:
    """A role not ready when the sockets appear: never SERVING in between."""
    reasons = Reasons()
    reasons.now = ["kubelet plugin not serving"]
    p = KubeletPlugin(
        node.kube,
        driver=DRIVER,
        kubelet_dir=kubelet_dir,
        cdi_dir=node.root / "cdi",
        reporter=node.reporter,
        not_ready=reasons,
    )
    await p.start()
    try:
        assert await check(p.dra_socket) == NOT_SERVING
        assert await check(p.reg_socket, REGISTRATION) == NOT_SERVING
        reasons.now = []
        await until(status_is(p.dra_socket, SERVING), what="SERVING once ready", timeout=10)
    finally:
        await p.stop()


async def test_without_the_roles_readiness_an_unreadable_checkpoint_is_not_serving(
    node: SimNode, kubelet_dir: Path
) -> None:
    """The plugin on its own (no `not_ready`): NOT_SERVING while its checkpoint cannot be read,
    SERVING once an operator moved the file away."""
    p = KubeletPlugin(
        node.kube,
        driver=DRIVER,
        kubelet_dir=kubelet_dir,
        cdi_dir=node.root / "cdi",
        reporter=node.reporter,
    )
    cp_path = p.plugin_dir / "checkpoint.json"
    cp_path.parent.mkdir(parents=True)
    cp_path.write_text('{"version": 1, "claims": {"x": ')  # half a file
    await p.start()
    try:

        async def judged() -> bool:
            return any("checkpoint unreadable" in r for r in p.grpc_health.reasons)

        await until(judged, what="the verdict: checkpoint unreadable", timeout=10)
        assert await check(p.dra_socket) == NOT_SERVING
        cp_path.rename(cp_path.with_suffix(".broken"))
        await until(status_is(p.dra_socket, SERVING), what="SERVING once moved", timeout=10)
    finally:
        await p.stop()


async def test_the_node_role_with_a_corrupt_checkpoint_says_not_serving(tmp_path: Path) -> None:
    """The real node role: its /readyz reason, an unreadable checkpoint, is the DRA socket's
    NOT_SERVING; moved away, the socket says SERVING."""
    root = Path(tempfile.mkdtemp(prefix="khr-", dir="/tmp"))  # short: unix socket paths
    try:
        cp_path = root / "kubelet" / "plugins" / DRIVER / "checkpoint.json"
        cp_path.parent.mkdir(parents=True)
        cp_path.write_text('{"version": 1, "garb')
        async with node_role(root) as role:
            assert role.plugin is not None
            socket = role.plugin.dra_socket
            health = role.plugin.grpc_health

            async def judged() -> bool:
                return bool(health.reasons) and health.reasons == role.not_ready()

            await until(judged, what="the health verdict on the role's readiness", timeout=10)
            assert await check(socket) == NOT_SERVING
            assert any("checkpoint unreadable" in r for r in role.not_ready())
            cp_path.rename(cp_path.with_suffix(".broken"))
            await until(status_is(socket, SERVING), what="SERVING once moved", timeout=10)
            assert role.not_ready() == []
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_ready_after_registration_waits_for_kubelets_word(tmp_path: Path) -> None:
    """--node-ready-after-registration: the role is not ready (its /readyz reason says why and
    where kubelet should look) until kubelet's registration client, generated from kubelet's own
    API (tests/kubelet), has called GetInfo and NotifyRegistrationStatus; meanwhile it has
    started (systemd's READY=1) and its gRPC health says SERVING, which kubelet may ask before
    it registers. A DaemonSet's rolling update stops the old pod only once the new one is
    Ready, so kubelet never goes without a registered plugin of the driver."""
    binary = await asyncio.to_thread(kubelet.build)
    root = Path(tempfile.mkdtemp(prefix="khr-", dir="/tmp"))
    try:
        async with node_role(root, ready_after_registration=True) as role:
            plugin = role.plugin
            assert plugin is not None
            (reason,) = role.not_ready()
            assert reason.startswith("kubelet has not registered the plugin yet")
            assert str(plugin.reg_socket) in reason
            assert role.serving()  # systemd's READY=1 does not wait for kubelet
            assert "kubelet plugin serving" in role.status()
            await until(status_is(plugin.dra_socket, SERVING), what="SERVING", timeout=10)
            done = await asyncio.to_thread(
                subprocess.run,
                [
                    str(binary),
                    "-registration",
                    str(plugin.reg_socket),
                    "-driver",
                    DRIVER,
                    "-op",
                    "info",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            assert role.not_ready() == []
            assert "kubelet plugin registered" in role.status()
        async with node_role(root) as role:  # off (the default): ready at once
            assert role.not_ready() == []
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_a_readiness_that_cannot_be_had_is_not_serving(
    node: SimNode, kubelet_dir: Path
) -> None:
    """The role's readiness check fails (an OSError stat'ing the checkpoint, say): NOT_SERVING
    with that reason, and the health service keeps following it."""
    failing = [True]

    def not_ready() -> list[str]:
        if failing[0]:
            raise PermissionError(13, "Permission denied", "checkpoint.json")
        return []

    p = KubeletPlugin(
        node.kube,
        driver=DRIVER,
        kubelet_dir=kubelet_dir,
        cdi_dir=node.root / "cdi",
        reporter=node.reporter,
        not_ready=not_ready,
    )
    await p.start()
    try:

        async def judged() -> bool:
            return any("readiness unknown" in r for r in p.grpc_health.reasons)

        await until(judged, what="the verdict: readiness unknown", timeout=10)
        assert "Permission denied" in p.grpc_health.reasons[0]
        assert await check(p.dra_socket) == NOT_SERVING
        failing[0] = False
        await until(status_is(p.dra_socket, SERVING), what="SERVING again", timeout=10)
    finally:
        await p.stop()
