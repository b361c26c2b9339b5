"""The kubelet plugin through a DaemonSet's surge update: each process registers under socket
names of its own, so kubelet (whose DRA manager keeps a list of plugins per driver) holds the old
and the new one side by side and never has none; sockets of a process killed before its stop
are removed by the next one. (kubelet replaces the registration of a socket path that is
replaced by unregistering it first, and refuses a second registration of an endpoint already
registered: the real-node Helm test, tests/realnode/test_helm_node.py, shows its log.)"""

from __future__ import annotations

import socket
from pathlib import Path

import grpc

from agent._proto.dra.v1 import api_pb2 as v1
from agent._proto.dra.v1 import api_pb2_grpc as v1_grpc
from tests.node.simnode import DRIVER, SimNode
from tests.node.test_plugin import get_info, kubelet_dir, node, plugin_on

__all__ = ["kubelet_dir", "node"]  # fixtures


async def test_overlapping_processes_register_under_names_of_their_own(
    node: SimNode, kubelet_dir: Path
) -> None:
    old = plugin_on(node, kubelet_dir)
    await old.start()
    new = plugin_on(node, kubelet_dir)
    try:
        await new.start()
        assert old.reg_socket != new.reg_socket
        assert old.dra_socket != new.dra_socket
        endpoints = {(await get_info(p.reg_socket)).endpoint for p in (old, new)}
        assert endpoints == {str(old.dra_socket), str(new.dra_socket)}
        await old.stop()
        assert not old.reg_socket.exists()
        assert not old.dra_socket.exists()
        assert (await get_info(new.reg_socket)).endpoint == str(new.dra_socket)
        # the node-local name is the newest process's, and the old one left it
        async with grpc.aio.insecure_channel(f"unix://{new.local_socket}") as channel:
            answer = await v1_grpc.DRAPluginStub(channel).NodePrepareResources(
                v1.NodePrepareResourcesRequest()
            )
        assert len(answer.claims) == 0
    finally:
        await old.stop()
        await new.stop()
    for path in (new.reg_socket, new.dra_socket, new.local_socket):
        assert not path.exists(), path


def _dead_socket(path: Path) -> Path:
    """A unix socket file no process listens on (a process killed before its stop)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    return path


async def test_sockets_of_a_killed_process_are_removed_at_start(
    node: SimNode, kubelet_dir: Path
) -> None:
    registry, plugins = kubelet_dir / "plugins_registry", kubelet_dir / "plugins" / DRIVER
    dead = [
        _dead_socket(registry / f"{DRIVER}-deadbeef-reg.sock"),
        _dead_socket(registry / f"{DRIVER}-reg.sock"),  # the earlier one-name layout
        _dead_socket(plugins / "dra-deadbeef.sock"),
    ]
    other_driver = _dead_socket(registry / f"other.{DRIVER}-deadbeef-reg.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live_path = registry / f"{DRIVER}-cafecafe-reg.sock"
    live.bind(str(live_path))
    live.listen()
    plugin = plugin_on(node, kubelet_dir)
    try:
        await plugin.start()
        assert [p for p in dead if p.exists()] == []
        assert other_driver.exists()  # not this driver's
        assert live_path.exists()  # a process still answers there (the old pod of a surge)
    finally:
        await plugin.stop()
        live.close()
