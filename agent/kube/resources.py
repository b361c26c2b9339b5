"""ComposableResource helpers shared by the scaler and the composer (names, paths, conditions)."""

from __future__ import annotations

from typing import Any, Final

from agent.kube.client import Obj, path_of
from agent.model.fabric import dns_label

#: CoHDI's API group and version for ComposableResource / ComposabilityRequest (kept unchanged on
#: the wire so CoHDI's manifests apply); `agent.manifests.crds` builds the CRDs from these.
GROUP: Final = "cro.hpsys.ibm.ie.com"
VERSION: Final = "v1alpha1"
FINALIZER: Final = "com.ie.ibm.hpsys/finalizer"
MANAGED_BY: Final = "app.kubernetes.io/managed-by"

RESOURCES: Final = path_of(group=GROUP, version=VERSION, plural="composableresources")
REQUESTS: Final = path_of(group=GROUP, version=VERSION, plural="composabilityrequests")
CLAIM_ANNOTATION: Final = "cohdi.io/claim"  # <namespace>/<name> of the claim the attach is for
NODE_READY: Final = "NodeReady"  # written by the node role: the device is seen and usable
NODE_RELEASED: Final = "NodeReleased"  # written by the node role: safe to detach


def resource_name(device_id: str) -> str:
    """One ComposableResource per pool device, named from it: two scaler passes (or two leaders
    one after the other) can never create two attachments for one device."""
    return dns_label(f"gpu-{device_id}", limit=253)


def condition(obj: Obj, ctype: str) -> bool:
    return any(
        c.get("type") == ctype and c.get("status") == "True"
        for c in (obj.get("status") or {}).get("conditions") or []
    )


def state(obj: Obj) -> str:
    return str((obj.get("status") or {}).get("state") or "")


def spec(obj: Obj) -> dict[str, Any]:
    return dict(obj.get("spec") or {})


def deleting(obj: Obj) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))
