"""RealNode's own contract: a start that fails half-way raises with the failing process's log
and leaves nothing behind (no process, interface, mount or state directory); the Node as
registered; workloads (a DaemonSet) run there through kube-controller-manager."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent import errors
from agent.devcluster.controlplane import ControlPlane
from agent.devcluster.nodebuild import PAUSE_IMAGE
from agent.devcluster.realnode import TOLERATION, RealNode
from agent.kube.client import Kube, path_of
from tests.waiting import until

pytestmark = pytest.mark.controlplane

PODS = path_of(group="", version="v1", plural="pods", namespace="default")


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
    with pytest.raises(errors.DevClusterError, match="cannot start here") as failed:
        node.start(timeout=30)
    # the message names the log in the node's state directory, which is gone
    (state_dir,) = set(re.findall(r"/tmp/rn-[^/\s]+", str(failed.value)))
    assert not Path(state_dir).exists()
    assert node.procs == {}
    assert node.state_dir == Path()
    assert node.node_ip  # the interface was made before containerd failed, and is gone again
    addresses = subprocess.run(
        ["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    assert f" {node.node_ip}/" not in addresses
    assert state_dir not in Path("/proc/self/mountinfo").read_text()
    assert not [h for h in Path("/sys/fs/cgroup").glob(f"*/cohdi-{Path(state_dir).name}")]
    node.stop()  # twice is fine


async def test_the_node_is_ready_at_its_own_address_with_the_taints_asked_for(
    real_node: RealNode, kube: Kube
) -> None:
    node = await kube.get(f"/api/v1/nodes/{real_node.name}")
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
    assert ready == "True"
    # the admission plugin's not-ready taint is lifted, the ones asked for stay
    assert node["spec"].get("taints", []) == real_node.taints
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == real_node.node_ip
    assert node["metadata"]["labels"]["kubernetes.io/hostname"] == real_node.name
    assert node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == real_node.kubelet_port


async def test_a_daemonset_runs_on_the_node_with_a_pod_ip_and_goes_with_its_owner(
    real_node: RealNode, kube: Kube
) -> None:
    """kube-controller-manager creates the DaemonSet's pod, the kubelet runs it (the pause image)
    on the CNI bridge; deleting the DaemonSet deletes the pod (garbage collector)."""
    name = f"ds-{uuid.uuid4().hex[:6]}"
    daemonsets = "/apis/apps/v1/namespaces/default/daemonsets"
    labels = {"app": name}
    await kube.create(
        daemonsets,
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": name},
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "nodeSelector": {"kubernetes.io/hostname": real_node.name},
                        "tolerations": [TOLERATION],
                        "automountServiceAccountToken": False,
                        "enableServiceLinks": False,
                        "containers": [
                            {"name": "pause", "image": PAUSE_IMAGE, "imagePullPolicy": "Never"}
                        ],
                    },
                },
            },
        },
    )
    selector = f"app={name}"

    async def running() -> dict[str, Any] | None:
        pods = (await kube.get(PODS, labelSelector=selector))["items"]
        return next((p for p in pods if p.get("status", {}).get("phase") == "Running"), None)

    try:
        pod = await until(running, what="the DaemonSet's pod running", timeout=120, interval=0.5)
        assert pod["spec"]["nodeName"] == real_node.name
        assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(
            real_node.pod_subnet
        )
    finally:
        await kube.request(
            "DELETE", f"{daemonsets}/{name}", body={"propagationPolicy": "Background"}
        )

    async def gone() -> bool:
        return not (await kube.get(PODS, labelSelector=selector))["items"]

    await until(gone, what="the DaemonSet's pod deleted with it", timeout=120, interval=0.5)
