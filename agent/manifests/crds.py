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

Every field has a `description`: the API server publishes them in its OpenAPI, and
`kubectl explain composableresource.status.state` shows them (a test walks every field of the
schema the server publishes and finds one).
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


def _int0(description: str) -> dict[str, Any]:
    return {"type": "integer", "format": "int64", "minimum": 0, "description": description}


def _string(description: str, **more: Any) -> dict[str, Any]:
    return {"type": "string", **more, "description": description}


_TYPE = _string(
    "Kind of device: gpu (the only kind cohdi-agent attaches) or cxlmemory (accepted for CoHDI "
    "compatibility).",
    enum=["gpu", "cxlmemory"],
)


def _conditions(description: str) -> dict[str, Any]:
    return {
        "type": "array",
        "description": description,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "description": "One condition, in the style of metav1.Condition.",
            "required": ["type", "status"],
            "properties": {
                "type": _string("What the condition is about (CamelCase).", maxLength=316),
                "status": _string(
                    "Whether it holds: True, False or Unknown.", enum=["True", "False", "Unknown"]
                ),
                "reason": _string(
                    "Why, in one CamelCase word a program can match on.", maxLength=1024
                ),
                "message": _string("Why, in words for people.", maxLength=32768),
                "lastTransitionTime": _string(
                    "When status last changed (RFC 3339).", format="date-time"
                ),
                "observedGeneration": _int0(
                    "The metadata.generation of the spec this condition was computed from."
                ),
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
        "description": "The device wanted and where: written by its creator (the agent's scaler "
        "for a claim, a ComposabilityRequest for its members, or a person).",
        "required": ["type", "model", "target_node"],
        "properties": {
            "type": _TYPE,
            "model": _string(
                "Device model as the fabric manager names it, e.g. NVIDIA-A100-PCIE-40GB.",
                minLength=1,
            ),
            "target_node": _string(
                "Name of the Kubernetes Node whose machine the device is attached to.",
                minLength=1,
            ),
            "force_detach": {
                "type": "boolean",
                "description": "Detach without waiting for the node's safe removal (no process, "
                "no open handle): for a node that is gone or wedged. Default false.",
            },
            "fabric_device": _string(
                "cohdi-agent: the exact fabric device to attach (its id in the pool, as "
                "published in the ResourceSlices). Empty: the agent picks a free device of the "
                "model on the node's fabric and records it in status.cdi_device_id."
            ),
        },
    }
    status = {
        "type": "object",
        "description": "What the agent and the node observed; written by them only.",
        "properties": {
            "state": _string(
                "Lifecycle: empty (new), Attaching (the fabric is attaching the device), Online "
                "(attached; the node reports NodeReady in conditions), Detaching (deleted: "
                "waiting for the node's NodeReleased, then the fabric detach), Deleting, or "
                "Failed (see reason and message).",
                enum=list(RESOURCE_STATES),
            ),
            "error": _string("CoHDI's error text: the last failure, empty when none."),
            "device_id": _string(
                "The GPU's UUID (the fabric manager's res_serial_num, or NVML's on the node)."
            ),
            "cdi_device_id": _string(
                "The device's id on the fabric (the fabric manager's res_uuid): the one attached "
                "or being attached."
            ),
            "reason": _string(
                "cohdi-agent: why the state is Failed, one CamelCase word (DeviceOwned, "
                "NoFreeDevice, NodeNotOnFabric, DeviceBusy, DeviceFailed, DeviceNotFound, "
                "FabricRejected)."
            ),
            "message": _string("cohdi-agent: why the state is Failed, in words for people."),
            "machine": _string(
                "cohdi-agent: the fabric's id of the machine (server) the device is attached to."
            ),
            "pci_address": _string(
                "cohdi-agent: the device's PCI address on the node (domain:bus:device.function), "
                "as the fabric reported it and the node found it."
            ),
            "conditions": _conditions(
                "cohdi-agent: the node's reports: NodeReady (the device is in the node's PCI "
                "tree, UUID read) and NodeReleased (removed safely before a detach; False with "
                "reason Busy while a process or an open handle holds it)."
            ),
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
        "description": "One device of the fabric attached, or to be attached, to one node. The "
        "cohdi-agent composer drives it: attach through the fabric manager, wait for the node's "
        "report, and on deletion (finalizer) the node's safe removal, then the detach.",
        "required": ["spec"],
        "properties": {"spec": spec, "status": status},
    }
    return _crd(
        "ComposableResource", "composableresources", schema, columns, (".spec.target_node",)
    )


def _request_resource(description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "required": ["type", "model", "size"],
        "properties": {
            "type": _TYPE,
            "model": _string(
                "Device model as the fabric manager names it, e.g. NVIDIA-A100-PCIE-40GB.",
                minLength=1,
            ),
            "size": {
                **_int0(
                    "How many devices of the model to keep attached (at most "
                    f"{SIZE_LIMIT}; the agent refuses more than its --request-max-size)."
                ),
                "maximum": SIZE_LIMIT,
            },
            "force_detach": {
                "type": "boolean",
                "description": "Copied to every member: detach without waiting for the node's "
                "safe removal. Default false.",
            },
            "allocation_policy": _string(
                "samenode: every member on one node (target_node, else the node most members "
                "are on, else the wired node with the most free devices of the model); "
                "differentnode: at most one member a node (target_node must be empty).",
                enum=["samenode", "differentnode"],
                default="samenode",
            ),
            "target_node": _string(
                "The Node every member is attached to. Empty: the agent places them "
                "(allocation_policy)."
            ),
            "other_spec": {
                "type": "object",
                "description": "CoHDI's node capacity hints, accepted for compatibility; "
                "cohdi-agent does not use them.",
                "properties": {
                    "milli_cpu": _int0("CPU a node should have, in millicores (not used)."),
                    "memory": _int0("Memory a node should have, in bytes (not used)."),
                    "ephemeral_storage": _int0(
                        "Ephemeral storage a node should have, in bytes (not used)."
                    ),
                    "allowed_pod_number": _int0("Pods a node should allow (not used)."),
                },
            },
        },
    }


def composability_request() -> dict[str, Any]:
    resource = _request_resource(
        "What to keep attached: size devices of one model, on one node or spread over nodes."
    )
    member = {
        "type": "object",
        "description": "One member ComposableResource as the request last saw it.",
        "required": ["state"],
        "properties": {
            "state": _string("The member's status.state (Attaching, Online, Failed...)."),
            "device_id": _string("The member's GPU UUID (its status.device_id)."),
            "cdi_device_id": _string(
                "The member's device id on the fabric (its status.cdi_device_id)."
            ),
            "node_name": _string("The Node the member is attached to (its spec.target_node)."),
            "error": _string("Why the member failed, when its state is Failed."),
        },
    }
    status = {
        "type": "object",
        "description": "What the agent made of the request; written by the agent only.",
        "properties": {
            "state": _string(
                "CoHDI's lifecycle: empty (new), NodeAllocating (placing members), Updating "
                "(members attaching or being replaced), Running (size members Online), Cleaning "
                "and Deleting (deleted: members being removed), Failed (refused: see error and "
                "the Refused condition).",
                enum=list(REQUEST_STATES),
            ),
            "error": _string(
                "Why the request is Failed or runs below its size; empty when it runs as asked."
            ),
            "resources": {
                "type": "object",
                "description": "Member ComposableResources by name.",
                "additionalProperties": member,
            },
            "scalarResource": _request_resource(
                "The spec.resource the status was computed from (CoHDI's copy)."
            ),
            "conditions": _conditions(
                "cohdi-agent: Ready (size members Online), Refused (nothing is created for this "
                "spec: TooLarge, PolicyConflict, NoNode, UnknownModel) and Degraded (running "
                "below size: ExceedsFabric, NotEnoughNodes, MemberFailed, WaitingForDevice, "
                "CreateFailed)."
            ),
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
        "description": "Keep a number of devices of one model attached to nodes (CoHDI's "
        "ComposabilityRequest): cohdi-agent creates, replaces and deletes member "
        "ComposableResources (owned by the request) to match.",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "description": "What the request asks for.",
                "required": ["resource"],
                "properties": {"resource": resource},
            },
            "status": status,
        },
    }
    return _crd("ComposabilityRequest", "composabilityrequests", schema, columns)


def all_crds() -> list[dict[str, Any]]:
    return [composability_request(), composable_resource()]
