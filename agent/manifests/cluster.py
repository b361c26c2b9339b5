"""The DeviceClass for our GPUs and the RBAC the agent needs, for a driver name."""

from __future__ import annotations

from typing import Any

from agent.manifests import crds


def device_class_name(driver: str) -> str:
    """The DeviceClass that selects the driver's GPUs: `gpu.<driver>` (`gpu.composable.cohdi.io`
    for the default driver), or the driver name itself when its first label already says gpu
    (driver `gpu.example.com` -> class `gpu.example.com`, never `gpu.gpu.example.com`)."""
    return driver if driver.split(".", 1)[0] == "gpu" else f"gpu.{driver}"


def device_class(driver: str) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": device_class_name(driver)},
        "spec": {"selectors": [{"cel": {"expression": f'device.driver == "{driver}"'}}]},
    }


def rbac(driver: str, namespace: str = "kube-system") -> list[dict[str, Any]]:
    rules = [
        {
            "apiGroups": ["resource.k8s.io"],
            "resources": ["resourceslices"],
            "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
        },
        {
            "apiGroups": ["resource.k8s.io"],
            "resources": ["resourceclaims", "deviceclasses"],
            "verbs": ["get", "list", "watch"],
        },
        {
            "apiGroups": ["resource.k8s.io"],
            "resources": ["resourceclaims/status"],
            "verbs": ["get", "update", "patch"],
        },
        # 1.36: writing status.devices of another node's claim needs the node-aware verb.
        {
            "apiGroups": ["resource.k8s.io"],
            "resources": ["resourceclaims/driver"],
            "resourceNames": [driver],
            "verbs": [
                "arbitrary-node:update",
                "arbitrary-node:patch",
                "associated-node:update",
                "associated-node:patch",
            ],
        },
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "patch"]},
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        {
            "apiGroups": [crds.GROUP],
            "resources": [
                "composableresources",
                "composabilityrequests",
                "composableresources/status",
                "composabilityrequests/status",
            ],
            "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
        },
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "list", "watch", "create", "update"],
        },
    ]
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "cohdi-agent", "namespace": namespace},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "cohdi-agent"},
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "cohdi-agent"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "cohdi-agent",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "cohdi-agent", "namespace": namespace}],
        },
    ]
