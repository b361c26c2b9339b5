"""The Helm chart packaging/helm/cohdi-agent, with the real `helm` (built from the Go module proxy
into the cache, `agent.devcluster.helm`), no cluster: `helm lint --strict`, and `helm template`
renders the same RBAC, admission policy, DeviceClass and CRDs as `agent.manifests` (labels
aside), the workloads the issue asks for, and refuses values its schema does not allow."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import cli, settings
from agent.devcluster import helm, local
from agent.manifests import cluster, crds, installing, rbac

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "packaging" / "helm" / "cohdi-agent"
ACCESS_KINDS = {
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}


@pytest.fixture(scope="module")
def helm_bin() -> Path:
    return helm.ensure_built(settings.Settings().cache_dir, progress=local.progress)


def run_helm(binary: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """helm with its cache, config and data under `home` (nothing of the user's is read)."""
    env = {
        "HOME": str(home),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(
        [str(binary), *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def render(
    binary: Path, home: Path, release: str, namespace: str, *sets: str
) -> list[dict[str, Any]]:
    args = ["template", release, str(CHART), "--namespace", namespace]
    for s in sets:
        args += ["--set", s]
    done = run_helm(binary, home, *args)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def keyed(docs: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Objects by (kind, namespace, name), without the chart's bookkeeping labels."""
    out = {}
    for d in docs:
        meta = {k: v for k, v in d["metadata"].items() if k != "labels"}
        out[(d["kind"], meta.get("namespace", ""), meta["name"])] = {**d, "metadata": meta}
    return out


def test_lint_strict_passes(helm_bin: Path, tmp_path: Path) -> None:
    for sets in (
        [],
        [
            "fabric.backend=fti",
            "vendorDriver=gpu.nvidia.com",
            "cohdiConfigNamespace=composable-dra",
        ],
    ):
        args = ["lint", "--strict", str(CHART)]
        for s in sets:
            args += ["--set", s]
        done = run_helm(helm_bin, tmp_path, *args)
        print(done.stdout)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize(
    ("release", "namespace", "sets", "access"),
    [
        ("cohdi-agent", "kube-system", [], {}),
        (
            "gpus",
            "gpu-system",
            [
                "driver=gpu.example.com",
                "vendorDriver=gpu.nvidia.com",
                "cohdiConfigNamespace=composable-dra",
                "leaderElection.leaseName=the-lease",
            ],
            {
                "name": "gpus-cohdi-agent",
                "lease": "the-lease",
                "vendor_driver": "gpu.nvidia.com",
                "cohdi_config_namespace": "composable-dra",
            },
        ),
    ],
)
def test_template_access_equals_the_generated(
    helm_bin: Path,
    tmp_path: Path,
    release: str,
    namespace: str,
    sets: list[str],
    access: dict[str, str],
) -> None:
    docs = render(helm_bin, tmp_path, release, namespace, *sets)
    driver = next(
        (s.split("=", 1)[1] for s in sets if s.startswith("driver=")), "composable.cohdi.io"
    )
    chart = keyed([d for d in docs if d["kind"] in ACCESS_KINDS])
    generated = keyed(
        rbac.rbac(driver, namespace, **{"lease": access.get("name", release), **access})
    )
    assert sorted(chart) == sorted(generated)
    for key, obj in generated.items():
        assert chart[key] == obj, key
    (device_class,) = [d for d in docs if d["kind"] == "DeviceClass"]
    assert keyed([device_class]) == keyed([cluster.device_class(driver)])


def test_packaging_rbac_is_the_chart_with_default_values(helm_bin: Path, tmp_path: Path) -> None:
    docs = render(helm_bin, tmp_path, "cohdi-agent", "kube-system")
    chart = keyed([d for d in docs if d["kind"] in ACCESS_KINDS])
    packaged = keyed(list(yaml.safe_load_all((ROOT / "packaging" / "rbac.yaml").read_text())))
    assert chart == packaged


def test_chart_crds_are_the_generated() -> None:
    text = (CHART / "crds" / "crds.yaml").read_text()
    assert text == installing.render(crds.all_crds()), "stale: run `cohdi-agent manifests`"


def test_workloads(helm_bin: Path, tmp_path: Path) -> None:
    docs = keyed(
        render(helm_bin, tmp_path, "cohdi-agent", "gpu-system", "fabric.url=https://fm:443")
    )
    ds = docs[("DaemonSet", "gpu-system", "cohdi-agent-node")]
    dep = docs[("Deployment", "gpu-system", "cohdi-agent-cluster")]
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert ds["spec"]["minReadySeconds"] == 10  # a margin beyond readiness
    pod = ds["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["serviceAccountName"] == "cohdi-agent-node"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert term["matchExpressions"] == [{"key": "cohdi.io/fabric", "operator": "Exists"}]
    paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert paths == {
        "/var/lib/kubelet/plugins",
        "/var/lib/kubelet/plugins_registry",
        "/var/run/cdi",
        "/sys",
        "/dev",
    }
    (node,) = pod["containers"]
    assert "--roles=node" in node["args"]
    assert "--metrics-address=$(POD_IP)" in node["args"]

    assert dep["spec"]["replicas"] == 2
    cpod = dep["spec"]["template"]["spec"]
    assert cpod["serviceAccountName"] == "cohdi-agent-cluster"
    (agent,) = cpod["containers"]
    assert {
        "--roles=cluster",
        "--lease-namespace=gpu-system",
        "--lease-name=cohdi-agent",
        "--fabric-url=https://fm:443",
        "--fabric-password-file=/etc/cohdi-agent/fabric/password",
        "--idle-grace=300",
    } <= set(agent["args"])
    for c in (node, agent):
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    svc = docs[("Service", "gpu-system", "cohdi-agent-metrics")]
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert ("Secret", "gpu-system", "cohdi-agent-fabric") in docs
    pdb = docs[("PodDisruptionBudget", "gpu-system", "cohdi-agent-cluster")]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == dep["spec"]["selector"]


def test_node_selectors_narrow_both_roles(helm_bin: Path, tmp_path: Path) -> None:
    """node.nodeSelector narrows the DaemonSet beyond the fabric label (which other nodes may
    carry), cluster.nodeSelector the Deployment; by default neither is set."""
    sets = ("fabric.url=https://fm:443",)
    pin = ("node.nodeSelector.gpu-server=yes", "cluster.nodeSelector.role=control")
    plain = keyed(render(helm_bin, tmp_path, "cohdi-agent", "ns", *sets))
    pinned = keyed(render(helm_bin, tmp_path, "cohdi-agent", "ns", *sets, *pin))
    ds, dep = ("DaemonSet", "ns", "cohdi-agent-node"), ("Deployment", "ns", "cohdi-agent-cluster")
    for key in (ds, dep):
        assert "nodeSelector" not in plain[key]["spec"]["template"]["spec"]
    assert pinned[ds]["spec"]["template"]["spec"]["nodeSelector"] == {"gpu-server": "yes"}
    assert pinned[dep]["spec"]["template"]["spec"]["nodeSelector"] == {"role": "control"}
    affinity = pinned[ds]["spec"]["template"]["spec"]["affinity"]  # the fabric label still holds
    assert affinity == plain[ds]["spec"]["template"]["spec"]["affinity"]


@pytest.mark.parametrize(
    "bad",
    ["fabric.backend=soap", "driver=Not_A_Name", "metrics.port=0", "unknownKey=1", "idleGrace=-1"],
)
def test_schema_refuses_bad_values(helm_bin: Path, tmp_path: Path, bad: str) -> None:
    done = run_helm(helm_bin, tmp_path, "template", "x", str(CHART), "--set", bad)
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr, done.stderr


def test_kube_version_constraint(helm_bin: Path, tmp_path: Path) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.36.0-0"
    old = run_helm(helm_bin, tmp_path, "template", "x", str(CHART), "--kube-version", "1.35.0")
    assert old.returncode != 0
    assert "kubeVersion" in old.stderr or "incompatible" in old.stderr, old.stderr
    for release in settings.KUBE_VERSIONS:  # every release the suite runs against is admitted
        done = run_helm(helm_bin, tmp_path, "template", "x", str(CHART), "--kube-version", release)
        assert done.returncode == 0, (release, done.stderr)


@pytest.mark.parametrize(
    "sets",
    [
        ["fabric.url=https://fm:443", "fabric.user=admin", "fabric.ca=PEM"],
        [
            "fabric.backend=fti",
            "fabric.url=https://fm:443",
            "fabric.tenant=00000000-0000-0000-0000-000000000001",
            "fabric.clientId=cohdi",
            "fabric.models={NVIDIA-A100-PCIE-40GB,NVIDIA-H100-PCIe}",
            "vendorDriver=gpu.nvidia.com",
        ],
        ["cohdiConfigNamespace=composable-dra"],
    ],
)
def test_every_container_command_is_one_the_agent_accepts(
    helm_bin: Path, tmp_path: Path, sets: list[str]
) -> None:
    """The rendered command lines go through the agent's own parser and settings checks (what
    `cohdi-agent run` does before anything else): no unknown flag, no value it refuses."""
    docs = keyed(render(helm_bin, tmp_path, "cohdi-agent", "gpu-system", *sets))
    roles = {}
    for kind, name in (("Deployment", "cohdi-agent-cluster"), ("DaemonSet", "cohdi-agent-node")):
        (container,) = docs[(kind, "gpu-system", name)]["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["cohdi-agent"]
        argv = [
            a.replace("$(POD_IP)", "10.1.2.3").replace("$(POD_NAME)", "pod-0")
            for a in container["args"]
        ]
        cfg = cli.load_settings(cli.build_parser().parse_args(argv), {"NODE_NAME": "gpu-node-1"})
        roles[cfg.cluster.roles] = cfg
    cluster_cfg, node_cfg = roles["cluster"], roles["node"]
    assert cluster_cfg.leader.namespace == "gpu-system"
    assert cluster_cfg.leader.identity == "pod-0"
    assert node_cfg.node.kubelet_dir == "/var/lib/kubelet"
    # Ready (the old pod stopped in an upgrade) once kubelet registered our plugin; with a
    # vendor's driver ours does not run, and there is nothing to wait for
    assert node_cfg.node.ready_after_registration == ("vendorDriver=gpu.nvidia.com" not in sets)
    for cfg in (cluster_cfg, node_cfg):
        assert cfg.cluster.metrics_address == "10.1.2.3"
        assert cfg.cluster.metrics_port == 9464
    if "cohdiConfigNamespace=composable-dra" in sets:
        assert cluster_cfg.cluster.cohdi_config_namespace == "composable-dra"
        assert cluster_cfg.fabric.password_file == ""  # CoHDI's Secret has the credentials
    else:
        assert cluster_cfg.fabric.password_file == "/etc/cohdi-agent/fabric/password"


@pytest.mark.parametrize(
    "bad",
    [
        "apiServer.host=10.0.0.1:6443",  # a port in the host: the client dialled https://[10.0.0.1:6443]:443
        "apiServer.host=https://api.example",
        "apiServer.host=[fd00::1]",  # brackets are the client's to add
        "fullnameOverride=Foo_Bar",  # not a DNS label: every object name would be refused
    ],
)
def test_schema_refuses_bad_names(helm_bin: Path, tmp_path: Path, bad: str) -> None:
    done = run_helm(helm_bin, tmp_path, "template", "x", str(CHART), "--set", bad)
    assert done.returncode != 0, done.stdout[:500]
    assert "values don't meet the specifications of the schema" in done.stderr, done.stderr


@pytest.mark.parametrize("host", ["api.example.com", "10.0.0.1", "fd00::1", "API-1.example"])
def test_api_server_host_forms_accepted(helm_bin: Path, tmp_path: Path, host: str) -> None:
    docs = render(helm_bin, tmp_path, "x", "default", f"apiServer.host={host}")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    env = {
        e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["KUBERNETES_SERVICE_HOST"] == host


@pytest.mark.parametrize("release", ["1gpu", "gpu.pool"])
def test_release_name_that_makes_no_service_name_is_refused(
    helm_bin: Path, tmp_path: Path, release: str
) -> None:
    """A Service's name must be a DNS-1035 label (a letter first, no dot); Helm admits release
    names that are not, and the names the chart derives from them would be refused by the API
    server object by object. The chart refuses them up front, naming fullnameOverride."""
    done = run_helm(helm_bin, tmp_path, "template", release, str(CHART))
    assert done.returncode != 0, done.stdout[:500]
    assert "fullnameOverride" in done.stderr, done.stderr
    ok = run_helm(
        helm_bin, tmp_path, "template", release, str(CHART), "--set", "fullnameOverride=gpu"
    )
    assert ok.returncode == 0, ok.stderr
