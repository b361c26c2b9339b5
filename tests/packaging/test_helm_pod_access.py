"""How the chart's pods reach the API server (`helm template`, no cluster): the token, CA and
namespace as an explicit projected volume in both roles (so a bound token arrives also where the
ServiceAccount admission plugin is off), `apiServer.host/port` as KUBERNETES_SERVICE_HOST/PORT
(clusters whose pods cannot reach the `kubernetes` Service), and each role's `extraEnv`. The
real-node Helm test (tests/realnode/test_helm_node.py) runs the pods so configured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.packaging.test_helm_chart import CHART, helm_bin, keyed, render, run_helm

__all__ = ["helm_bin"]  # fixture

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def _pods(binary: Path, home: Path, *sets: str) -> dict[str, dict[str, Any]]:
    docs = keyed(
        render(binary, home, "cohdi-agent", "gpu-system", "fabric.url=https://fm:443", *sets)
    )
    return {
        "node": docs[("DaemonSet", "gpu-system", "cohdi-agent-node")]["spec"]["template"]["spec"],
        "cluster": docs[("Deployment", "gpu-system", "cohdi-agent-cluster")]["spec"]["template"][
            "spec"
        ],
    }


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_both_roles_mount_a_projected_token_of_their_own(helm_bin: Path, tmp_path: Path) -> None:
    for role, pod in _pods(helm_bin, tmp_path).items():
        assert pod["automountServiceAccountToken"] is False, role
        assert pod["serviceAccountName"] == f"cohdi-agent-{role}"
        (volume,) = [v for v in pod["volumes"] if v["name"] == "kube-api-access"]
        sources = volume["projected"]["sources"]
        assert {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}} in sources
        assert {
            "configMap": {
                "name": "kube-root-ca.crt",
                "items": [{"key": "ca.crt", "path": "ca.crt"}],
            }
        } in sources
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "kube-api-access"]
        assert mount == {"name": "kube-api-access", "mountPath": SA_DIR, "readOnly": True}
        assert "KUBERNETES_SERVICE_HOST" not in _env(pod)  # the Service's, from the kubelet


def test_api_server_address_and_extra_env(helm_bin: Path, tmp_path: Path) -> None:
    pods = _pods(
        helm_bin,
        tmp_path,
        "apiServer.host=10.1.2.3",
        "apiServer.port=6443",
        "node.extraEnv[0].name=A",
        "node.extraEnv[0].value=a",
        "cluster.extraEnv[0].name=B",
        "cluster.extraEnv[0].value=b",
    )
    for role, extra in (("node", {"A": "a"}), ("cluster", {"B": "b"})):
        env = _env(pods[role])
        assert env["KUBERNETES_SERVICE_HOST"] == "10.1.2.3", role
        assert env["KUBERNETES_SERVICE_PORT"] == "6443", role
        assert extra.items() <= env.items(), role


@pytest.mark.parametrize(
    "bad", ["apiServer.port=0", "apiServer.other=1", "node.extraEnv[0].value=x"]
)
def test_schema_refuses_bad_access_values(helm_bin: Path, tmp_path: Path, bad: str) -> None:
    done = run_helm(helm_bin, tmp_path, "template", "x", str(CHART), "--set", bad)
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr, done.stderr
