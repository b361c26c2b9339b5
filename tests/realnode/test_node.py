"""RealNode's own contract: a start that fails half-way raises with the failing process's log
and leaves nothing behind (no process, interface, mount or state directory)."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from agent import errors
from agent.devcluster.controlplane import ControlPlane
from agent.devcluster.realnode import REAL_NODE_TAINT, RealNode
from agent.kube.client import Kube

pytestmark = pytest.mark.controlplane


def test_a_failed_start_stops_what_it_started(
    control_plane: ControlPlane, real_node: RealNode, tmp_path: Path
) -> None:
    broken = tmp_path / "containerd"
    broken.write_text("#!/bin/sh\necho 'containerd: cannot start here' >&2\nexit 3\n")
    broken.chmod(0o755)
    node = RealNode(
        binaries=dataclasses.replace(real_node.binaries, containerd=broken),
        control_plane=control_plane,
        name="realnode-broken",
    )
    with pytest.raises(errors.DevClusterError, match="cannot start here"):
        node.start(timeout=30)
    assert node.procs == {}
    assert node.state_dir == Path()
    assert node.node_ip  # the interface was made before containerd failed, and is gone again
    addresses = subprocess.run(
        ["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    assert f" {node.node_ip}/" not in addresses
    assert [str(p) for p in Path("/tmp").glob("rn-*")] == [str(real_node.state_dir)]
    assert "/tmp/rn-" not in Path("/proc/self/mountinfo").read_text().replace(
        str(real_node.state_dir), ""
    )
    node.stop()  # twice is fine


async def test_the_node_is_ready_at_its_own_address_and_tainted_for_its_own_pods(
    real_node: RealNode, kube: Kube
) -> None:
    node = await kube.get(f"/api/v1/nodes/{real_node.name}")
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
    assert ready == "True"
    # the admission plugin's not-ready taint is lifted; ours stays, so only pods that tolerate it
    # (TOLERATION) are scheduled here, never the pods other tests make for their own Nodes
    assert node["spec"]["taints"] == [REAL_NODE_TAINT]
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == real_node.node_ip
    assert node["metadata"]["labels"]["kubernetes.io/hostname"] == real_node.name
    assert node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == real_node.kubelet_port
