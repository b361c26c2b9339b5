"""Our resource-health stream against the code kubelet 1.37 runs (k8s.io/kubernetes v1.37.2
pkg/kubelet/cm/dra/plugin, built into the cache by tests/kubelet like the 1.36 one). From 1.37
kubelet opens NodeWatchResources only to a plugin whose registration lists a DRAResourceHealth
service among its supported versions; 1.36 tried every plugin. Our registration did not list it,
so on 1.37 no GPU's health reached kubelet (and so no pod's status) at all: the test shows that
with the old list, and the stream working with the list as it is now."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from agent.model.pool import device_name
from agent.node import plugin as plugin_module
from agent.node.plugin import KubeletPlugin
from tests import kubelet
from tests.node.simnode import POOL, SimNode
from tests.node.test_health import drive, kubelet_dir, node

__all__ = ["kubelet_dir", "node"]  # fixtures, shared with the 1.36 test


async def manager_run(
    binary: Path, plugin: KubeletPlugin, seconds: float, until: str
) -> tuple[list[dict[str, Any]], str]:
    """kubelet 1.37's DRA plugin manager registered with the plugin: the responses its stream
    handler printed, up to the first line containing `until` or until it exits after `seconds`,
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
            line = await asyncio.wait_for(proc.stdout.readline(), seconds + 30)
            if not line:
                break
            lines.append(json.loads(line))
            if until in line.decode():
                break
    finally:
        if proc.returncode is None:
            proc.kill()
        log = (await proc.stderr.read()).decode()
        await proc.wait()
    return lines, log


async def test_kubelet_1_37_streams_our_health_only_because_the_registration_lists_it(
    node: tuple[SimNode, KubeletPlugin], monkeypatch: pytest.MonkeyPatch
) -> None:
    n, plugin = node
    binary = await asyncio.to_thread(kubelet.build)
    manager = await asyncio.to_thread(
        kubelet.build_manager, kubelet.KUBERNETES_1_37, kubelet.MANAGER_1_37
    )
    claim = n.claim("c1", ["gpu-a"])
    await asyncio.to_thread(drive, binary, plugin, "prepare", claim)

    lines, log = await manager_run(manager, plugin, 20, '"HEALTHY"')
    assert lines, "kubelet 1.37 never opened the health stream:\n" + log[-2000:]
    (seen,) = lines[-1]["devices"]
    assert (seen["pool"], seen["device"], seen["health"]) == (
        POOL,
        device_name("gpu-a"),
        "HEALTHY",
    )
    assert "Successfully started WatchResources health stream" in log
    assert not [line for line in lines if "error" in line]

    # The registration as it was (no DRAResourceHealth listed): kubelet 1.37 registers the
    # plugin but never asks for the health of its devices.
    await plugin.stop()
    monkeypatch.setattr(plugin_module, "SUPPORTED", ["v1.DRAPlugin", "v1beta1.DRAPlugin"])
    await plugin.start()
    lines, log = await manager_run(manager, plugin, 8, '"devices"')
    assert lines == []
    assert "WatchResources" not in log
