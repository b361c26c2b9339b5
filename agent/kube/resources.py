"""ComposableResource helpers shared by the scaler and the composer (names, paths, conditions)."""

from __future__ import annotations

from typing import Final

from agent.kube.client import path_of
from agent.model import names
from agent.model.objects import (
    CLAIM_ANNOTATION,
    NODE_READY,
    NODE_RELEASED,
    condition,
    deleting,
    spec,
    state,
)

#: CoHDI's API group and version for ComposableResource / ComposabilityRequest (kept unchanged on
#: the wire so CoHDI's manifests apply); `agent.manifests.crds` builds the CRDs from these.
GROUP: Final = "cro.hpsys.ibm.ie.com"
VERSION: Final = "v1alpha1"
FINALIZER: Final = "com.ie.ibm.hpsys/finalizer"
MANAGED_BY: Final = "app.kubernetes.io/managed-by"

RESOURCES: Final = path_of(group=GROUP, version=VERSION, plural="composableresources")
REQUESTS: Final = path_of(group=GROUP, version=VERSION, plural="composabilityrequests")


def resource_name(device_id: str) -> str:
    """One ComposableResource per pool device, named from it: two scaler passes (or two leaders
    one after the other) can never create two attachments for one device. A DNS subdomain:
    `gpu-<id>` when that is one, else `<stem>-<hash>` (`names.dns_subdomain`)."""
    return names.dns_subdomain(f"gpu-{device_id}")


__all__ = [
    "CLAIM_ANNOTATION",
    "FINALIZER",
    "GROUP",
    "MANAGED_BY",
    "NODE_READY",
    "NODE_RELEASED",
    "REQUESTS",
    "RESOURCES",
    "VERSION",
    "condition",
    "deleting",
    "resource_name",
    "spec",
    "state",
]
