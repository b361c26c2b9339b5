"""CoHDI-compatible CRDs, group `cro.hpsys.ibm.ie.com/v1alpha1`, both cluster-scoped.

Field names and states follow CoHDI's Composable Resource Operator, so existing manifests apply
unchanged. Our additions, all optional: ComposableResource `spec.fabric_device` (the exact pool
device; CoHDI lets the fabric pick by model), `status.state: Failed` with `reason`, `message`,
`machine`, `pci_address`, `conditions` (NodeReady / NodeReleased written by the node role);
ComposabilityRequest `status.state: Failed` and `status.conditions` (Ready / Refused / Degraded,
see `agent.model.requests`).

One tightening: ComposabilityRequest `spec.resource.size` has a `maximum` of 1024
(`agent.model.requests.SIZE_LIMIT`); CoHDI's CRD has none, and `size: 1000000` made its operator
create ComposableResources without end. The agent's own, lower limit is `--request-max-size`.
"""

from __future__ import annotations

from typing import Any, Final

from agent.kube.resources import FINALIZER, GROUP, MANAGED_BY, VERSION
from agent.model.requests import SIZE_LIMIT

__all__ = ["FINALIZER", "GROUP", "MANAGED_BY", "VERSION"]

RESOURCE_STATES: Final = ("", "Attaching", "Online", "Detaching", "Deleting", "Failed")
REQUEST_STATES: Final = (
    "",
    "NodeAllocating",
    "Updating",
    "Running",
    "Cleaning",
    "Deleting",
    "Failed",
)

_INT0 = {"type": "integer", "format": "int64", "minimum": 0}
_TYPE = {"type": "string", "enum": ["gpu", "cxlmemory"], "description": "Kind of device."}


def _conditions() -> dict[str, Any]:
    return {
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["type", "status"],
            "properties": {
                "type": {"type": "string", "maxLength": 316},
                "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                "reason": {"type": "string", "maxLength": 1024},
                "message": {"type": "string", "maxLength": 32768},
                "lastTransitionTime": {"type": "string", "format": "date-time"},
                "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
            },
        },
    }


def _crd(
    kind: str,
    plural: str,
    schema: dict[str, Any],
    columns: list[dict[str, Any]],
    selectable: tuple[str, ...] = (),
) -> dict[str, Any]:
    version: dict[str, Any] = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "subresources": {"status": {}},
        "additionalPrinterColumns": columns,
        "schema": {"openAPIV3Schema": schema},
    }
    if selectable:  # a node agent watches only its own resources: fieldSelector on these
        version["selectableFields"] = [{"jsonPath": j} for j in selectable]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Cluster",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "categories": ["cohdi"],
            },
            "versions": [version],
        },
    }


def composable_resource() -> dict[str, Any]:
    spec = {
        "type": "object",
        "required": ["type", "model", "target_node"],
        "properties": {
            "type": _TYPE,
            "model": {"type": "string", "minLength": 1, "description": "Fabric model name."},
            "target_node": {"type": "string", "minLength": 1, "description": "Node to attach to."},
            "force_detach": {"type": "boolean", "description": "Detach even if the node is busy."},
            "fabric_device": {
                "type": "string",
                "description": "cohdi-agent: the exact fabric device; empty: any of the model.",
            },
        },
    }
    status = {
        "type": "object",
        "properties": {
            "state": {"type": "string", "enum": list(RESOURCE_STATES)},
            "error": {"type": "string"},
            "device_id": {"type": "string", "description": "GPU UUID (FM res_serial_num)."},
            "cdi_device_id": {"type": "string", "description": "Fabric resource id (FM res_uuid)."},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "machine": {"type": "string"},
            "pci_address": {"type": "string"},
            "conditions": _conditions(),
        },
    }
    columns = [
        {"name": "Device", "type": "string", "jsonPath": ".status.cdi_device_id"},
        {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
        {"name": "Node", "type": "string", "jsonPath": ".spec.target_node"},
        {"name": "State", "type": "string", "jsonPath": ".status.state"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    schema = {
        "type": "object",
        "required": ["spec"],
        "properties": {"spec": spec, "status": status},
    }
    return _crd(
        "ComposableResource", "composableresources", schema, columns, (".spec.target_node",)
    )


def composability_request() -> dict[str, Any]:
    resource = {
        "type": "object",
        "required": ["type", "model", "size"],
        "properties": {
            "type": _TYPE,
            "model": {"type": "string", "minLength": 1},
            "size": {
                **_INT0,
                "maximum": SIZE_LIMIT,
                "description": "How many devices of the model to keep attached (at most "
                f"{SIZE_LIMIT}; the agent refuses more than its --request-max-size).",
            },
            "force_detach": {"type": "boolean"},
            "allocation_policy": {
                "type": "string",
                "enum": ["samenode", "differentnode"],
                "default": "samenode",
            },
            "target_node": {"type": "string"},
            "other_spec": {
                "type": "object",
                "properties": {
                    "milli_cpu": _INT0,
                    "memory": _INT0,
                    "ephemeral_storage": _INT0,
                    "allowed_pod_number": _INT0,
                },
            },
        },
    }
    member = {
        "type": "object",
        "required": ["state"],
        "properties": {
            "state": {"type": "string"},
            "device_id": {"type": "string"},
            "cdi_device_id": {"type": "string"},
            "node_name": {"type": "string"},
            "error": {"type": "string"},
        },
    }
    status = {
        "type": "object",
        "properties": {
            "state": {"type": "string", "enum": list(REQUEST_STATES)},
            "error": {"type": "string"},
            "resources": {"type": "object", "additionalProperties": member},
            "scalarResource": resource,
            "conditions": _conditions(),
        },
    }
    columns = [
        {"name": "Model", "type": "string", "jsonPath": ".spec.resource.model"},
        {"name": "Size", "type": "integer", "jsonPath": ".spec.resource.size"},
        {"name": "Node", "type": "string", "jsonPath": ".spec.resource.target_node"},
        {"name": "State", "type": "string", "jsonPath": ".status.state"},
        {
            "name": "Ready",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    schema = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["resource"],
                "properties": {"resource": resource},
            },
            "status": status,
        },
    }
    return _crd("ComposabilityRequest", "composabilityrequests", schema, columns)


def all_crds() -> list[dict[str, Any]]:
    return [composability_request(), composable_resource()]
