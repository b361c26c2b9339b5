"""The kubelet plugin's socket paths when something else is in the way: a directory where its
node-local socket goes, a file where its socket directories go. Start fails with a ConfigError
that names the path (what an operator has to move), and leaves nothing of its own behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import errors
from tests.node.simnode import DRIVER, SimNode
from tests.node.test_plugin import kubelet_dir, node, plugin_on

__all__ = ["kubelet_dir", "node"]  # fixtures


async def test_a_directory_where_the_local_socket_goes(node: SimNode, kubelet_dir: Path) -> None:
    blocker = kubelet_dir / "plugins" / DRIVER / "dra.sock"
    blocker.mkdir(parents=True)
    plugin = plugin_on(node, kubelet_dir)
    with pytest.raises(errors.ConfigError) as caught:
        await plugin.start()
    assert str(blocker) in str(caught.value)
    assert not plugin.dra_socket.exists()
    assert not plugin.reg_socket.exists()


async def test_a_file_where_the_registry_directory_goes(node: SimNode, kubelet_dir: Path) -> None:
    blocker = kubelet_dir / "plugins_registry"
    blocker.write_text("")
    plugin = plugin_on(node, kubelet_dir)
    with pytest.raises(errors.ConfigError) as caught:
        await plugin.start()
    assert str(blocker) in str(caught.value)
