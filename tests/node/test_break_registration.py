"""--node-ready-after-registration under attack: kubelet refusing the plugin and then accepting
it, kubelet's word before and after a restart of the node role by its supervisor (a new plugin:
readiness must wait for kubelet again, for the new sockets, and an old registration must not
count), vendor-driver mode (no plugin of ours: nothing to wait for), and what must never wait for
kubelet (systemd's READY=1, the plugin's gRPC health). Kubelet's side is played with the
registration API's own generated client over the plugin's registration socket."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent import app, health, settings, supervision
from agent._proto.pluginregistration.v1 import api_pb2 as reg
from agent._proto.pluginregistration.v1 import api_pb2_grpc as reg_grpc
from agent.node.plugin import KubeletPlugin
from agent.node.reporting import NodeReporter
from tests.node.simnode import make_node_role, node_role
from tests.waiting import until

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def root() -> Iterator[Path]:
    """Short, like /var/lib/kubelet: a unix socket path holds at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="kbr-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def kubelet_says(plugin: KubeletPlugin, *, registered: bool, error: str = "") -> str:
    """What kubelet's plugin watcher does with a registration socket: GetInfo, then
    NotifyRegistrationStatus with its verdict. Returns the endpoint GetInfo announced."""
    async with grpc.aio.insecure_channel(f"unix://{plugin.reg_socket}") as channel:
        stub = reg_grpc.RegistrationStub(channel)
        info = await stub.GetInfo(reg.InfoRequest(), timeout=10)
        await stub.NotifyRegistrationStatus(
            reg.RegistrationStatus(plugin_registered=registered, error=error), timeout=10
        )
    return str(info.endpoint)


async def grpc_health(socket: Path) -> int:
    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    return int(answer.status)


async def test_a_refusal_then_an_acceptance(root: Path) -> None:
    """Kubelet refuses the plugin (a version it does not support, say), then, asked again (its
    watcher retries on a new event), accepts it: /readyz names the refusal meanwhile, and is
    ready after. Neither systemd's READY=1 nor the gRPC health waits for any of it."""
    async with node_role(root, ready_after_registration=True) as role:
        plugin = role.plugin
        assert plugin is not None
        await until(lambda: _serving(plugin.dra_socket), what="the DRA socket SERVING", timeout=10)
        assert await kubelet_says(plugin, registered=False, error="no v1 service") == str(
            plugin.dra_socket
        )
        assert role.not_ready() == ["kubelet refused the plugin: no v1 service"]
        assert role.serving()
        assert await grpc_health(plugin.dra_socket) == SERVING
        assert await grpc_health(plugin.reg_socket) == SERVING
        await kubelet_says(plugin, registered=True)
        assert role.not_ready() == []
        # accepted, then refused (kubelet restarted with another configuration): not ready
        await kubelet_says(plugin, registered=False)
        assert role.not_ready() == ["kubelet refused the plugin: no reason given"]
        await kubelet_says(plugin, registered=True)
        assert role.not_ready() == []


async def _serving(socket: Path) -> bool:
    try:
        return await grpc_health(socket) == SERVING
    except grpc.aio.AioRpcError:
        return False


def _role(root: Path, **node: object) -> app._NodeRole:
    return make_node_role(root, **node)


async def test_a_restarted_role_waits_for_kubelet_again(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node role fails after kubelet registered its plugin, and its supervisor restarts it:
    the new run has a new plugin (new sockets), which kubelet has not registered; /readyz must
    say so until kubelet registers the new one — the old plugin's registration does not carry
    over, and a late word to the old socket is impossible (it is gone)."""
    role = _role(root, ready_after_registration=True)
    crash = asyncio.Event()
    real_run = NodeReporter.run

    async def run(self: NodeReporter) -> None:
        task = asyncio.create_task(real_run(self))
        waiter = asyncio.create_task(crash.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if crash.is_set():
                crash.clear()
                raise RuntimeError("the reporter broke")
            await task
        finally:
            task.cancel()
            waiter.cancel()
            await asyncio.gather(task, waiter, return_exceptions=True)

    monkeypatch.setattr(NodeReporter, "run", run)
    board = health.Health()
    cfg = settings.Settings()
    policy = supervision.Policy(first=0.01, settle=0.05, jitter=0)
    task = asyncio.create_task(app.run_roles({"node": role}, board, cfg, policy=policy))
    try:

        async def started() -> bool:
            return (
                role.plugin_serving and role.reporter is not None and role.reporter.scanned.is_set()
            )

        await until(started, what="the plugin serving", timeout=10)
        first = role.plugin
        assert first is not None
        await kubelet_says(first, registered=True)
        await until(_ready(board), what="ready once kubelet registered the plugin", timeout=10)
        crash.set()

        async def restarted() -> bool:
            return await started() and role.plugin is not first

        await until(restarted, what="the role restarted with a new plugin", timeout=10)
        second = role.plugin
        assert second is not None
        assert second.reg_socket != first.reg_socket
        assert not first.reg_socket.exists()  # kubelet drops the old registration
        reasons = board.failing().get("node", [])
        (reason,) = reasons
        assert "has not registered the plugin yet" in reason
        assert str(second.reg_socket) in reason
        assert role.serving()
        await until(lambda: _serving(second.dra_socket), what="SERVING again", timeout=10)
        assert board.failing().get("node") == reasons  # still waiting for kubelet
        await kubelet_says(second, registered=True)
        await until(_ready(board), what="ready once kubelet registered the new plugin", timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _ready(board: health.Health) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return board.failing() == {}

    return probe


async def test_vendor_mode_with_the_flag_is_ready_without_kubelet(root: Path) -> None:
    """--vendor-driver with --node-ready-after-registration (set by hand: the chart leaves it
    out in vendor mode): no plugin of ours runs, so there is nothing for kubelet to register
    and the role is ready once its first scan is done — never waiting for good."""
    async with node_role(root, vendor_driver="gpu.nvidia.com", ready_after_registration=True) as r:
        assert r.plugin is None
        assert r.not_ready() == []
        assert r.serving()


async def test_nothing_but_readyz_waits_before_kubelet_ever_calls(root: Path) -> None:
    """Kubelet never calls (a wrong --node-kubelet-dir): /readyz fails with where to look, and
    stays failing; systemd's READY=1 (serving) and the gRPC health do not wait."""
    async with node_role(root, ready_after_registration=True) as role:
        plugin = role.plugin
        assert plugin is not None
        await until(lambda: _serving(plugin.dra_socket), what="SERVING", timeout=10)
        await asyncio.sleep(0.3)
        (reason,) = role.not_ready()
        assert "has not registered the plugin yet" in reason
        assert role.serving()
        assert "kubelet plugin serving" in role.status()
        assert plugin.grpc_health.reasons == []
