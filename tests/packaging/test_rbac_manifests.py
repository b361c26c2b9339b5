"""The generated access control, read without a cluster: two ServiceAccounts with disjoint
least-privilege roles, nothing tied to kube-system, the Lease and the driver named."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import yaml

from agent.manifests import rbac

DRIVER = "composable.cohdi.io"


def _by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _pairs(role: dict[str, Any]) -> set[tuple[str, str]]:
    return {(res, verb) for r in role["rules"] for res in r["resources"] for verb in r["verbs"]}


def test_namespace_is_a_parameter_everywhere() -> None:
    docs = rbac.rbac(DRIVER, "gpu-system", name="rel", lease="rel-lease")
    text = repr(docs)
    assert "kube-system" not in text
    namespaced = [d for d in docs if "namespace" in d["metadata"]]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"gpu-system"}
    subjects = [s for d in docs for s in d.get("subjects", [])]
    assert {s["namespace"] for s in subjects} == {"gpu-system"}
    policy = _by_kind(docs)[("ValidatingAdmissionPolicy", "rel-node-own-resources")]
    (cond,) = policy["spec"]["matchConditions"]
    assert "system:serviceaccount:gpu-system:rel-node" in cond["expression"]


def test_the_two_roles_get_exactly_their_grants() -> None:
    by = _by_kind(rbac.rbac(DRIVER))
    cluster = _pairs(by[("ClusterRole", "cohdi-agent-cluster")])
    node = _pairs(by[("ClusterRole", "cohdi-agent-node")])
    assert node == {
        ("composableresources", "list"),
        ("composableresources", "watch"),
        ("composableresources/status", "patch"),
        ("resourceclaims", "get"),
    }
    # no Lease, no Node, no slice, no Secret for either ClusterRole
    for forbidden in ("leases", "secrets", "configmaps", "deviceclasses"):
        assert not {p for p in cluster | node if p[0] == forbidden}
    assert not {p for p in node if p[0] in ("nodes", "resourceslices", "events")}
    assert ("resourceclaims/driver", "arbitrary-node:update") in cluster
    assert not {p for p in cluster if p[1].startswith("associated-node:")}
    assert not {p for p in cluster if p[0] == "resourceclaims/status" and p[1] != "update"}


def test_names_limit_the_lease_and_the_driver() -> None:
    by = _by_kind(rbac.rbac(DRIVER, "ns", lease="my-lease", vendor_driver="gpu.nvidia.com"))
    leader = by[("Role", "cohdi-agent-leader")]
    assert leader["metadata"]["namespace"] == "ns"
    named, create = leader["rules"]
    assert named["resourceNames"] == ["my-lease"]
    assert set(named["verbs"]) == {"get", "update"}
    assert create["verbs"] == ["create"]  # RBAC cannot limit a create by name
    driver_rule = next(
        r
        for r in by[("ClusterRole", "cohdi-agent-cluster")]["rules"]
        if r["resources"] == ["resourceclaims/driver"]
    )
    assert driver_rule["resourceNames"] == [DRIVER, "gpu.nvidia.com"]


def test_cohdi_config_role_only_when_asked() -> None:
    assert not [d for d in rbac.rbac(DRIVER) if "cohdi-config" in d["metadata"]["name"]]
    by = _by_kind(rbac.rbac(DRIVER, "ns", cohdi_config_namespace="composable-dra"))
    role = by[("Role", "cohdi-agent-cohdi-config")]
    assert role["metadata"]["namespace"] == "composable-dra"
    assert {tuple(r["resourceNames"]) for r in role["rules"]} == {
        ("composable-dra-dds",),
        ("composable-dra-secret",),
    }
    binding = by[("RoleBinding", "cohdi-agent-cohdi-config")]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "cohdi-agent-cluster", "namespace": "ns"}
    ]


def test_every_grant_says_why() -> None:
    grants = [
        *rbac.cluster_grants(DRIVER),
        *rbac.leader_grants("l"),
        *rbac.node_grants(),
        *rbac.cohdi_config_grants(),
    ]
    assert all(len(g.why) > 20 for g in grants)


def test_manifests_command_takes_the_namespace() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agent", "manifests", "--out", "-", "--namespace", "gpu-system"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert [d for d in docs if d["kind"] == "ServiceAccount"] == [
        d for d in rbac.rbac(DRIVER, "gpu-system") if d["kind"] == "ServiceAccount"
    ]
    assert "kube-system" not in done.stdout
