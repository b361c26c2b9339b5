"""A real node for the session's control plane (`agent.devcluster.realnode`): containerd with CDI,
runc, a CNI bridge, a kubelet registered as a Node, kube-controller-manager. Built into the cache
on first use (`cohdi-agent dev-cluster build` builds it before pytest); started once per session
in a temporary directory and stopped, every process by pid, at the end."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from agent import settings
from agent.devcluster import local, nodebuild
from agent.devcluster.controlplane import ControlPlane
from agent.devcluster.realnode import RealNode
from tests.conftest import kube_version

NODE_NAME = "realnode-0"


@pytest.fixture(scope="session")
def real_node(
    control_plane: ControlPlane,
    tmp_path_factory: pytest.TempPathFactory,
    pytestconfig: pytest.Config,
) -> Iterator[RealNode]:
    """The node, its kubelet and kube-controller-manager of the session's Kubernetes release
    (`--kube-version`), like the control plane."""
    if os.geteuid() != 0:
        pytest.skip("a real kubelet + containerd node needs root (mounts, cgroups, interfaces)")
    binaries = nodebuild.ensure_built(
        settings.Settings().cache_dir,
        kube_version=kube_version(pytestconfig),
        progress=local.progress,
    )
    node = RealNode(
        binaries=binaries,
        control_plane=control_plane,
        name=NODE_NAME,
        keep_logs=tmp_path_factory.mktemp("realnode-logs"),
        progress=local.progress,
    )
    node.start()
    try:
        yield node
    finally:
        node.stop()
