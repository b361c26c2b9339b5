"""Helpers for the access-control tests on the real control plane: apply generated objects, mint
ServiceAccount tokens with the TokenRequest API, make token kubeconfigs, and read what each
ServiceAccount did from kube-apiserver's audit log (`ControlPlane.audit_log`)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent import errors
from agent.devcluster.controlplane import ControlPlane
from agent.kube.client import Kube

_RBAC = "/apis/rbac.authorization.k8s.io/v1"
_ADMISSION = "/apis/admissionregistration.k8s.io/v1"


def collection(doc: dict[str, Any]) -> str:
    """The API collection a generated object is created in."""
    kind, ns = doc["kind"], doc["metadata"].get("namespace", "")
    return {
        "Namespace": "/api/v1/namespaces",
        "ServiceAccount": f"/api/v1/namespaces/{ns}/serviceaccounts",
        "Secret": f"/api/v1/namespaces/{ns}/secrets",
        "Service": f"/api/v1/namespaces/{ns}/services",
        "ClusterRole": f"{_RBAC}/clusterroles",
        "ClusterRoleBinding": f"{_RBAC}/clusterrolebindings",
        "Role": f"{_RBAC}/namespaces/{ns}/roles",
        "RoleBinding": f"{_RBAC}/namespaces/{ns}/rolebindings",
        "ValidatingAdmissionPolicy": f"{_ADMISSION}/validatingadmissionpolicies",
        "ValidatingAdmissionPolicyBinding": f"{_ADMISSION}/validatingadmissionpolicybindings",
    }[kind]


def path_of(doc: dict[str, Any]) -> str:
    return f"{collection(doc)}/{doc['metadata']['name']}"


async def apply_all(kube: Kube, docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        await kube.create(collection(doc), doc)


async def delete_all(kube: Kube, docs: list[dict[str, Any]]) -> None:
    """Delete in reverse order; clean-up only, so a failure is printed, not raised."""
    for doc in reversed(docs):
        try:
            await kube.delete(path_of(doc))
        except errors.KubeNotFound:
            pass
        except errors.AgentError as exc:
            print(f"clean-up of {path_of(doc)}: {exc}")


async def ensure_namespace(kube: Kube, name: str) -> None:
    with contextlib.suppress(errors.KubeAlreadyExists):
        await kube.create(
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
        )


async def token(
    kube: Kube, namespace: str, account: str, *, pod: dict[str, Any] | None = None
) -> str:
    """A ServiceAccount token from the TokenRequest API (1 h). Bound to `pod` (a Pod or a Node
    object as the API returned it) when given: such a token carries the node in the extra
    `authentication.kubernetes.io/node-name` — the pod's, as the token kubelet mounts into a
    DaemonSet pod; or the Node itself, as `kubectl create token --bound-object-kind Node` makes
    for an agent outside a pod."""
    spec: dict[str, Any] = {"expirationSeconds": 3600}
    if pod is not None:
        spec["boundObjectRef"] = {
            "apiVersion": "v1",
            "kind": pod.get("kind", "Pod"),
            "name": pod["metadata"]["name"],
            "uid": pod["metadata"]["uid"],
        }
    answer = await kube.create(
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
    )
    return str(answer["status"]["token"])


def token_kubeconfig(cp: ControlPlane, bearer: str, path: Path) -> Path:
    """The admin kubeconfig with its client certificate replaced by `bearer`."""
    doc = yaml.safe_load(cp.kubeconfig.read_text())
    doc["users"][0]["user"] = {"token": bearer}
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)
    return path


async def pod_on(kube: Kube, namespace: str, name: str, account: str, node: str) -> dict[str, Any]:
    """A pod of `account` already bound to `node` (it never runs: the test bed has no kubelet);
    it exists so a token can be bound to it."""
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "serviceAccountName": account,
            "automountServiceAccountToken": False,
            "nodeName": node,
            "containers": [{"name": "agent", "image": "cohdi-agent:test"}],
        },
    }
    return await kube.create(f"/api/v1/namespaces/{namespace}/pods", body)


@dataclass(frozen=True, slots=True)
class Call:
    """One request as the audit log recorded it (what RBAC authorizes)."""

    user: str
    verb: str
    group: str
    resource: str
    subresource: str
    namespace: str
    name: str
    code: int

    @property
    def what(self) -> str:
        res = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        where = f" in {self.namespace}" if self.namespace else ""
        return f"{self.verb} {self.group or 'core'}/{res}{where}" + (
            f" name={self.name}" if self.name else ""
        )


def audited(cp: ControlPlane, users: set[str]) -> list[Call]:
    """Every completed request of `users` in the audit log, in order."""
    calls = []
    for line in cp.audit_log.read_text().splitlines():
        ev = json.loads(line)
        user = ev.get("user", {}).get("username", "")
        ref = ev.get("objectRef")
        if user not in users or ref is None or ev.get("stage") != "ResponseComplete":
            continue
        calls.append(
            Call(
                user=user,
                verb=ev["verb"],
                group=ref.get("apiGroup", ""),
                resource=ref.get("resource", ""),
                subresource=ref.get("subresource", ""),
                namespace=ref.get("namespace", ""),
                name=ref.get("name", "") if ev["verb"] not in ("create", "list", "watch") else "",
                code=int(ev.get("responseStatus", {}).get("code", 0)),
            )
        )
    return calls


async def allowed(kube: Kube, user: str, call: Call) -> bool:
    """kube-apiserver's own authorizer (a SubjectAccessReview) on `call` made by `user`."""
    attrs = {
        "verb": call.verb,
        "group": call.group,
        "resource": call.resource,
        "subresource": call.subresource,
        "namespace": call.namespace,
        "name": call.name,
    }
    review = await kube.create(
        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {"user": user, "resourceAttributes": attrs},
        },
    )
    return bool(review["status"].get("allowed"))
