"""`helm install` of packaging/helm/cohdi-agent into the real control plane creates every object,
its access control works under real ServiceAccount tokens, `helm upgrade` to a new image
changes the workloads' templates, and `helm uninstall` removes it all.

The test bed has no kubelet and no kube-controller-manager: the Deployment and the DaemonSet are
created, but no pod of theirs is (nothing turns them into pods); the workloads' pods, and the
image they run, are out of this test's reach."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from agent import errors, settings
from agent.devcluster import helm, local
from agent.devcluster.controlplane import ControlPlane
from agent.kube.client import Kube
from agent.kube.resources import RESOURCES
from agent.manifests import crds, installing, rbac
from tests.cluster import access
from tests.packaging.test_helm_chart import CHART, run_helm
from tests.waiting import until

pytestmark = pytest.mark.controlplane


def _objects(ns: str, name: str, driver: str) -> dict[str, str]:
    """What the chart should have created: description -> API path."""
    r, a = "/apis/rbac.authorization.k8s.io/v1", "/apis/admissionregistration.k8s.io/v1"
    return {
        "cluster ServiceAccount": f"/api/v1/namespaces/{ns}/serviceaccounts/{name}-cluster",
        "node ServiceAccount": f"/api/v1/namespaces/{ns}/serviceaccounts/{name}-node",
        "cluster ClusterRole": f"{r}/clusterroles/{name}-cluster",
        "cluster ClusterRoleBinding": f"{r}/clusterrolebindings/{name}-cluster",
        "leader Role": f"{r}/namespaces/{ns}/roles/{name}-leader",
        "leader RoleBinding": f"{r}/namespaces/{ns}/rolebindings/{name}-leader",
        "node ClusterRole": f"{r}/clusterroles/{name}-node",
        "node ClusterRoleBinding": f"{r}/clusterrolebindings/{name}-node",
        "admission policy": f"{a}/validatingadmissionpolicies/{name}-node-own-resources",
        "admission binding": f"{a}/validatingadmissionpolicybindings/{name}-node-own-resources",
        "DeviceClass": f"/apis/resource.k8s.io/v1/deviceclasses/gpu.{driver}",
        "fabric Secret": f"/api/v1/namespaces/{ns}/secrets/{name}-fabric",
        "metrics Service": f"/api/v1/namespaces/{ns}/services/{name}-metrics",
        "cluster Deployment": f"/apis/apps/v1/namespaces/{ns}/deployments/{name}-cluster",
        "node DaemonSet": f"/apis/apps/v1/namespaces/{ns}/daemonsets/{name}-node",
        "cluster PDB": f"/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets/{name}-cluster",
    }


async def _present(kube: Kube, paths: dict[str, str]) -> dict[str, bool]:
    out = {}
    for what, path in paths.items():
        try:
            await kube.get(path)
            out[what] = True
        except errors.KubeNotFound:
            out[what] = False
    return out


async def test_helm_install_creates_everything_and_uninstall_removes_it(
    kube: Kube, control_plane: ControlPlane, tmp_path: Path
) -> None:
    binary = helm.ensure_built(settings.Settings().cache_dir, progress=local.progress)
    suffix = uuid.uuid4().hex[:6]
    release, ns, driver = f"cohdi-agent-{suffix}", f"gpu-{suffix}", f"h{suffix}.cohdi.io"
    base = ["--kubeconfig", str(control_plane.kubeconfig), "--namespace", ns]
    installed = run_helm(
        binary,
        tmp_path,
        "install",
        release,
        str(CHART),
        *base,
        "--create-namespace",
        "--set",
        f"driver={driver}",
        "--set",
        "fabric.url=https://fabric.invalid:443",
        "--set",
        "fabric.password=not-a-real-one",
    )
    assert installed.returncode == 0, installed.stderr
    paths = _objects(ns, release, driver)
    try:
        present = await _present(kube, paths)
        assert present == dict.fromkeys(paths, True)
        for crd in crds.all_crds():  # crds/ (or an earlier test's install, which Helm keeps)
            await kube.get(f"{installing.CRDS}/{crd['metadata']['name']}")
        status = json.loads(
            run_helm(binary, tmp_path, "status", release, *base, "-o", "json").stdout
        )
        assert status["info"]["status"] == "deployed"
        pods = (await kube.get(f"/api/v1/namespaces/{ns}/pods"))["items"]
        print(
            f"\nhelm install: {len(paths)} objects created, release {status['info']['status']}; "
            f"{len(pods)} pods (no kube-controller-manager or kubelet in this test bed)"
        )

        # The installed access control, under real tokens: the node role writes only its node.
        for target in ("mine", "other"):
            await kube.create(
                RESOURCES,
                {
                    "apiVersion": f"{crds.GROUP}/{crds.VERSION}",
                    "kind": "ComposableResource",
                    "metadata": {"name": f"gpu-{target}-{suffix}"},
                    "spec": {"type": "gpu", "model": "A100", "target_node": f"{target}-{suffix}"},
                },
            )
        node_sa = rbac.service_account_name(release, "node")
        pod = await access.pod_on(kube, ns, f"node-{suffix}", node_sa, f"mine-{suffix}")
        cfg = access.token_kubeconfig(
            control_plane, await access.token(kube, ns, node_sa, pod=pod), tmp_path / "n.kubeconfig"
        )
        async with await Kube.connect(kubeconfig=str(cfg)) as node_kube:
            status_patch = {"status": {"pci_address": "0000:01:00.0"}}

            async def refused() -> str | None:
                try:
                    await node_kube.patch(f"{RESOURCES}/gpu-other-{suffix}/status", status_patch)
                except errors.KubeForbidden as exc:
                    return str(exc) if "may not write ComposableResources" in str(exc) else None
                return None  # the policy is not in force yet (its informer syncs)

            print(await until(refused, what="the chart's policy refusing another node", timeout=30))
            await node_kube.patch(f"{RESOURCES}/gpu-mine-{suffix}/status", status_patch)
        await kube.delete(f"/api/v1/namespaces/{ns}/pods/node-{suffix}")

        # A new image: the DaemonSet's template changes, its surge-first strategy stays.
        upgraded = run_helm(
            binary,
            tmp_path,
            "upgrade",
            release,
            str(CHART),
            *base,
            "--reuse-values",
            "--set",
            "image.tag=0.2.0",
        )
        assert upgraded.returncode == 0, upgraded.stderr
        ds = await kube.get(paths["node DaemonSet"])
        (container,) = ds["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "cohdi-agent:0.2.0"
        assert ds["metadata"]["generation"] == 2
        assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 1
        dep = await kube.get(paths["cluster Deployment"])
        assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "cohdi-agent:0.2.0"
    finally:
        for target in ("mine", "other"):
            try:
                await kube.delete(f"{RESOURCES}/gpu-{target}-{suffix}")
            except errors.AgentError as exc:
                print(f"clean-up of gpu-{target}-{suffix}: {exc}")
        removed = run_helm(binary, tmp_path, "uninstall", release, *base)
    assert removed.returncode == 0, removed.stderr
    assert await _present(kube, paths) == dict.fromkeys(paths, False)
    for crd in crds.all_crds():  # Helm never deletes crds/: that would delete every resource
        await kube.get(f"{installing.CRDS}/{crd['metadata']['name']}")
