"""Whether the API server keeps DRA device taints, asked before the first slice that carries one.

kube-apiserver drops `spec.devices[].taints` of a ResourceSlice when the `DRADeviceTaints`
feature gate is off (it strips disabled fields before validation), and says nothing. The
publisher learns it from what a write stored — but that write already offered the device
untainted, and a new leader would do so with every GPU its predecessor withheld as unhealthy.
So the publisher asks first, with a throwaway slice that no claim can ever get:

- driver `taint-probe.cohdi.io` (no DeviceClass of ours selects it), its own pool;
- a slice-level `nodeSelector` that matches no node (`cohdi.io/taint-probe In [never]`), so
  the scheduler has no node to allocate its device on even if some DeviceClass selected it;
- one device carrying a `NoSchedule` taint.

The stored object answers (taints kept or not); the slice is deleted at once. Needs nothing
beyond the cluster role's existing ResourceSlice create/delete grant.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Any, Final

from agent import errors
from agent.kube.client import Kube

logger = logging.getLogger(__name__)

SLICES: Final = "/apis/resource.k8s.io/v1/resourceslices"
#: The probe's driver: a valid driver name no DeviceClass of ours selects.
PROBE_DRIVER: Final = "taint-probe.cohdi.io"
#: A node label no node carries (the probe's node selector requires it to be "never").
PROBE_LABEL: Final = "cohdi.io/taint-probe"


def probe_slice(name: str) -> dict[str, Any]:
    """The throwaway ResourceSlice `name`: one tainted device no node can take."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "cohdi-agent"}},
        "spec": {
            "driver": PROBE_DRIVER,
            "pool": {"name": name, "generation": 0, "resourceSliceCount": 1},
            "nodeSelector": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": PROBE_LABEL, "operator": "In", "values": ["never"]}
                        ]
                    }
                ]
            },
            "devices": [
                {
                    "name": "probe",
                    "taints": [
                        {"key": "cohdi.io/unhealthy", "value": "Probe", "effect": "NoSchedule"}
                    ],
                }
            ],
        },
    }


async def taints_stored(kube: Kube) -> tuple[bool | None, str]:
    """(whether the API server stored the probe's taint, the probe slice's name). None when the
    probe could not be written (an API error: logged at DEBUG; the publisher then learns it from
    its own writes, as before). The probe is deleted whatever happened (best effort)."""
    name = f"cohdi-taint-probe-{uuid.uuid4().hex[:12]}"
    try:
        stored = await kube.create(SLICES, probe_slice(name))
    except errors.AgentError as exc:
        logger.debug("device taint probe %s not written: %s", name, exc)
        return None, name
    try:
        devices = (stored.get("spec") or {}).get("devices") or [{}]
        return bool(devices[0].get("taints")), name
    finally:
        with contextlib.suppress(errors.AgentError):
            await kube.delete(f"{SLICES}/{name}")
