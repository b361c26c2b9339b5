"""Reading ComposableResources (raw JSON, CoHDI's wire field names) without I/O: the accessors
and condition names the decisions, the controllers and the node role share.

Wire facts (CoHDI's Composable Resource Operator CRD, `cro.hpsys.ibm.ie.com/v1alpha1`):
`spec.type`, `spec.model`, `spec.target_node`, `spec.force_detach`; `status.state`,
`status.cdi_device_id` (the *fabric's* id of the device — "CDI" there is CoHDI's composable
device id, not the Container Device Interface), `status.device_id` (the GPU's own UUID),
`status.error`. Our optional additions: `spec.fabric_device`, `status.reason`, `status.message`,
`status.machine`, `status.pci_address`, `status.conditions`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Final

Obj = dict[str, Any]

CLAIM_ANNOTATION: Final = "cohdi.io/claim"  # <namespace>/<name> of the claim the attach is for
NODE_READY: Final = "NodeReady"  # written by the node role: the device is seen and usable
NODE_RELEASED: Final = "NodeReleased"  # written by the node role: safe to detach
#: Written by the node role: the GPU's health as the node sees it (NVML Xid/ECC events, the PCI
#: function gone while attached). status "True" healthy, "False" unhealthy (reason: a CamelCase
#: word such as `Xid79`, `DoubleBitEcc`, `FellOffBus`; message: in words), "Unknown" when the node
#: cannot tell. Absent means never reported (treated as healthy).
DEVICE_HEALTHY: Final = "DeviceHealthy"
#: The DRA driver of the deployment that made a resource: two deployments in one cluster (another
#: --driver and fabric) leave each other's resources alone.
DRIVER_LABEL: Final = "cohdi.io/driver"


def condition(obj: Obj, ctype: str) -> bool:
    """True when `status.conditions[type=ctype].status == "True"`."""
    return any(
        c.get("type") == ctype and c.get("status") == "True"
        for c in (obj.get("status") or {}).get("conditions") or []
    )


def state(obj: Obj) -> str:
    """`status.state` ("" when the composer has not written one yet)."""
    return str((obj.get("status") or {}).get("state") or "")


def spec(obj: Obj) -> dict[str, Any]:
    return dict(obj.get("spec") or {})


def deleting(obj: Obj) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))


def name_of(obj: Obj) -> str:
    return str(obj["metadata"]["name"])


def fabric_device(obj: Obj) -> str:
    """The fabric device a resource names: the one it was created for (`spec.fabric_device`) or,
    for a resource that named only a model, the one the composer chose (`status.cdi_device_id`).
    "" while none is chosen."""
    chosen = (obj.get("status") or {}).get("cdi_device_id")
    return str(spec(obj).get("fabric_device") or chosen or "")


def attached_device(obj: Obj) -> str:
    """The fabric device the resource has (or had) attached: the one the fabric answered with
    (`status.cdi_device_id`), else the one it was made for. They differ for a resource made for an
    anonymous slot (`agent.model.slots`): the slot is its identity, this is the GPU."""
    chosen = (obj.get("status") or {}).get("cdi_device_id")
    return str(chosen or spec(obj).get("fabric_device") or "")


def devices_of(obj: Obj) -> set[str]:
    """Every fabric device id the resource names: its identity and what it attached."""
    return {d for d in (fabric_device(obj), attached_device(obj)) if d}


def mine(obj: Obj, driver_label: str) -> bool:
    """The resource is this deployment's to act on: made by it (`cohdi.io/driver` = ours), or by
    no deployment (hand-written, or CoHDI's operator: no such label)."""
    made_by = ((obj.get("metadata") or {}).get("labels") or {}).get(DRIVER_LABEL)
    return made_by is None or made_by == driver_label


def target_node(obj: Obj) -> str:
    return str(spec(obj).get("target_node") or "")


def created_at(obj: Obj) -> float:
    """`metadata.creationTimestamp` as epoch seconds (0 when absent)."""
    ts = obj["metadata"].get("creationTimestamp")
    if not ts:
        return 0.0
    return dt.datetime.fromisoformat(str(ts).replace("Z", "+00:00")).timestamp()


def age_key(obj: Obj) -> tuple[float, str]:
    """Order of precedence between resources naming one device: the older one (then the name)."""
    return (created_at(obj), name_of(obj))


def deleted_at(obj: Obj) -> float:
    """`metadata.deletionTimestamp` as epoch seconds (0 when absent)."""
    ts = obj["metadata"].get("deletionTimestamp")
    if not ts:
        return 0.0
    return dt.datetime.fromisoformat(str(ts).replace("Z", "+00:00")).timestamp()
