"""Least-privilege access for the agent's two roles, one source for packaging/rbac.yaml and the
Helm chart (a test renders the chart and compares).

Two ServiceAccounts, so a GPU node's token is not the cluster role's:

- `<name>-cluster` (the cluster role's Deployment): ClusterRole `<name>-cluster` with exactly
  the (resource, verb) pairs its code calls (`cluster_grants`, each with the call that needs it),
  and a Role `<name>-leader` in the agent's namespace for its Lease (`leader_grants`): get/update
  only on the Lease's name. The claims' `status.devices` are written under the synthetic
  `resourceclaims/driver` subresource, which kube-apiserver authorizes with the driver's name as
  the resource name and the verb `arbitrary-node:<verb>` (k8s.io/kubernetes v1.36
  pkg/registry/resource/utils.go, AuthorizedForDeviceStatus): the grant names our driver only.
- `<name>-node` (the node role's DaemonSet): ClusterRole `<name>-node` (`node_grants`): watch the
  ComposableResources, patch their status (NodeReady, NodeReleased, DeviceHealthy), read a claim
  at NodePrepareResources. RBAC cannot say "only this node's"; a ValidatingAdmissionPolicy does
  (`node_policy`): a token of that ServiceAccount bound to a pod carries the pod's node in the
  extra `authentication.kubernetes.io/node-name`, and a status write on a ComposableResource
  whose `spec.target_node` is another node, or by a token with no node, is refused. The same
  pattern guards ResourceSlices in Kubernetes' example DRA driver and NVIDIA's GPU driver.
- With `--cohdi-config-namespace`: a Role there reading only CoHDI's ConfigMap and Secret by name
  (`cohdi_config_grants`; the agent watches them with a `metadata.name` field selector, which the
  API server authorizes against the resource name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from agent.manifests import crds
from agent.model import cohdi

RBAC_API: Final = "rbac.authorization.k8s.io/v1"
RBAC_GROUP: Final = "rbac.authorization.k8s.io"
ADMISSION_API: Final = "admissionregistration.k8s.io/v1"
DRA: Final = "resource.k8s.io"
LEASES: Final = "coordination.k8s.io"
#: The extra a pod-bound ServiceAccount token carries (ServiceAccountTokenPodNodeInfo, GA 1.32).
NODE_NAME_EXTRA: Final = "authentication.kubernetes.io/node-name"


@dataclass(frozen=True, slots=True)
class Grant:
    """One RBAC rule and the reason it exists (the agent's call that needs it)."""

    group: str
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    why: str
    names: tuple[str, ...] = ()

    def rule(self) -> dict[str, Any]:
        """The rule as RBAC writes it (apiGroups, resources, [resourceNames], verbs)."""
        out: dict[str, Any] = {"apiGroups": [self.group], "resources": list(self.resources)}
        if self.names:
            out["resourceNames"] = list(self.names)
        out["verbs"] = list(self.verbs)
        return out


def cluster_grants(driver: str, vendor_driver: str = "") -> list[Grant]:
    """What the cluster role calls, cluster-wide. `vendor_driver`: with --vendor-driver the
    agent also writes a condition into the vendor driver's entries of status.devices."""
    drivers = (driver, vendor_driver) if vendor_driver else (driver,)
    return [
        Grant(
            DRA,
            ("resourceslices",),
            ("list", "watch", "create", "update", "delete"),
            "the publisher's informer, and writing the driver's slices (create, replace, and "
            "delete of a pool that is gone)",
        ),
        Grant(
            DRA,
            ("resourceclaims",),
            ("get", "list", "watch"),
            "the claims informer; the freshness check lists; the scaler reads a claim again "
            "after a conflict",
        ),
        Grant(
            DRA,
            ("resourceclaims/status",),
            ("update",),
            "the scaler writes binding conditions into status.devices (replace on the "
            "resourceVersion)",
        ),
        Grant(
            DRA,
            ("resourceclaims/driver",),
            ("arbitrary-node:update",),
            "kube-apiserver's check for changing status.devices entries of a driver on any "
            "node (resource name: the driver)",
            names=drivers,
        ),
        Grant(
            "",
            ("nodes",),
            ("list", "watch", "patch"),
            "the nodes informer; the fabric, full and cluster-manager-limit labels",
        ),
        Grant(
            "",
            ("events",),
            ("create", "patch"),
            "Events about claims and resources; a repeated Event is patched (count)",
        ),
        Grant(
            crds.GROUP,
            ("composableresources",),
            ("get", "list", "watch", "create", "patch", "delete"),
            "the composer's informer; the scaler and the request controller create, patch "
            "(finalizer, force_detach) and delete them; get after AlreadyExists",
        ),
        Grant(
            crds.GROUP,
            ("composableresources/status",),
            ("patch",),
            "the composer's state machine (Attaching, Online, Failed...)",
        ),
        Grant(
            crds.GROUP,
            ("composabilityrequests",),
            ("list", "watch", "patch"),
            "the request controller's informer and its finalizer",
        ),
        Grant(
            crds.GROUP,
            ("composabilityrequests/status",),
            ("patch",),
            "the request's state and conditions",
        ),
    ]


def leader_grants(lease: str) -> list[Grant]:
    """The cluster role's Lease, in the agent's namespace. A create cannot be limited to a name
    (RBAC authorizes it before the object exists: the request names none), so it is its own
    rule, limited to the namespace."""
    return [
        Grant(
            LEASES,
            ("leases",),
            ("get", "update"),
            "leader election: read, renew and release the Lease",
            names=(lease,),
        ),
        Grant(LEASES, ("leases",), ("create",), "leader election: the first replica creates it"),
    ]


def node_grants() -> list[Grant]:
    """What the node role calls, cluster-wide (admission narrows the writes to its node)."""
    return [
        Grant(
            crds.GROUP,
            ("composableresources",),
            ("list", "watch"),
            "the reporter's informer on spec.target_node=<its node>",
        ),
        Grant(
            crds.GROUP,
            ("composableresources/status",),
            ("patch",),
            "NodeReady, NodeReleased and DeviceHealthy on its node's resources",
        ),
        Grant(
            DRA,
            ("resourceclaims",),
            ("get",),
            "NodePrepareResources reads the claim's allocation",
        ),
    ]


def cohdi_config_grants() -> list[Grant]:
    """--cohdi-config-namespace: CoHDI's ConfigMap and Secret, by name, nothing else there."""
    return [
        Grant(
            "",
            ("configmaps",),
            ("get", "list", "watch"),
            "CoHDI's device-info ConfigMap (watched by metadata.name)",
            names=(cohdi.CONFIGMAP,),
        ),
        Grant(
            "",
            ("secrets",),
            ("get", "list", "watch"),
            "CoHDI's fabric credentials Secret (watched by metadata.name)",
            names=(cohdi.SECRET,),
        ),
    ]


def service_account_name(name: str, role: str) -> str:
    """`<name>-cluster` or `<name>-node`."""
    return f"{name}-{role}"


def _service_account(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace},
    }


def _role(kind: str, name: str, grants: list[Grant], namespace: str = "") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": RBAC_API,
        "kind": kind,
        "metadata": meta,
        "rules": [g.rule() for g in grants],
    }


def _binding(
    kind: str, name: str, account: str, account_ns: str, namespace: str = ""
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": RBAC_API,
        "kind": f"{kind}Binding",
        "metadata": meta,
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": kind, "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": account_ns}],
    }


def node_policy(name: str, namespace: str) -> list[dict[str, Any]]:
    """The ValidatingAdmissionPolicy and its binding: the node role's ServiceAccount may write
    only the status of ComposableResources whose spec.target_node is the node its token was
    issued on. A status PATCH is an UPDATE to admission. A refusal is 403 Forbidden (the
    policy's default would be 422 Invalid, as if the body were wrong)."""
    policy = f"{name}-node-own-resources"
    user = f"system:serviceaccount:{namespace}:{service_account_name(name, 'node')}"
    return [
        {
            "apiVersion": ADMISSION_API,
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": policy},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [crds.GROUP],
                            "apiVersions": [crds.VERSION],
                            "operations": ["CREATE", "UPDATE", "DELETE"],
                            "resources": ["composableresources", "composableresources/status"],
                        }
                    ]
                },
                "matchConditions": [
                    {"name": "isNodeRole", "expression": f'request.userInfo.username == "{user}"'}
                ],
                "variables": [
                    {
                        "name": "userNodeName",
                        "expression": f"request.userInfo.extra[?'{NODE_NAME_EXTRA}'][0]"
                        ".orValue('')",
                    },
                    {
                        "name": "objectNodeName",
                        "expression": '(request.operation == "DELETE" ? oldObject : object)'
                        '.spec.?target_node.orValue("")',
                    },
                ],
                "validations": [
                    {
                        "expression": 'variables.userNodeName != ""',
                        "reason": "Forbidden",
                        "message": "no node in this token: the node role must run in a pod on "
                        "its node (a pod-bound ServiceAccount token)",
                    },
                    {
                        "expression": "variables.userNodeName == variables.objectNodeName",
                        "reason": "Forbidden",
                        "messageExpression": '"the node role on node \'" + '
                        "variables.userNodeName + \"' may not write ComposableResources of "
                        'node \'" + variables.objectNodeName + "\'"',
                    },
                ],
            },
        },
        {
            "apiVersion": ADMISSION_API,
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": policy},
            "spec": {"policyName": policy, "validationActions": ["Deny"]},
        },
    ]


def rbac(
    driver: str,
    namespace: str = "kube-system",
    *,
    name: str = "cohdi-agent",
    lease: str = "cohdi-agent",
    vendor_driver: str = "",
    cohdi_config_namespace: str = "",
) -> list[dict[str, Any]]:
    """Every access-control object, in apply order. `namespace`: where the agent's pods, its
    ServiceAccounts and its Lease live (--lease-namespace); `name`: the prefix of every object
    (the Helm release's full name); `lease`: --lease-name."""
    cluster_sa = service_account_name(name, "cluster")
    node_sa = service_account_name(name, "node")
    leader = f"{name}-leader"
    docs = [
        _service_account(cluster_sa, namespace),
        _service_account(node_sa, namespace),
        _role("ClusterRole", cluster_sa, cluster_grants(driver, vendor_driver)),
        _binding("ClusterRole", cluster_sa, cluster_sa, namespace),
        _role("Role", leader, leader_grants(lease), namespace),
        _binding("Role", leader, cluster_sa, namespace, namespace),
        _role("ClusterRole", node_sa, node_grants()),
        _binding("ClusterRole", node_sa, node_sa, namespace),
    ]
    if cohdi_config_namespace:
        config = f"{name}-cohdi-config"
        docs += [
            _role("Role", config, cohdi_config_grants(), cohdi_config_namespace),
            _binding("Role", config, cluster_sa, namespace, cohdi_config_namespace),
        ]
    return docs + node_policy(name, namespace)
