"""Vendor-driver mode (CoHDI's way of preparing GPUs), as pure decisions.

In this mode the pool is published under the *vendor's* DRA driver name (`--vendor-driver`, e.g.
`gpu.nvidia.com`), so the vendor's own DeviceClass matches both our free pool devices and the
vendor's node-local devices, and the vendor's kubelet plugin prepares the GPU (MIG, sharing, its
CDI specs). The flow, per claim:

1. the scheduler allocates one of our free pool devices (binding conditions: `FabricDeviceReady`;
   failure conditions: `FabricDeviceReschedule`, `FabricDeviceFailed` — CoHDI's set) and waits;
2. we attach the GPU to the claim's node (the scaler and the composer, as in our own mode);
3. the vendor's plugin on that node publishes the GPU in its node-local ResourceSlice, with the
   GPU's UUID in its `uuid` attribute (CoHDI matches on that attribute too);
4. we set `FabricDeviceReschedule=True` on the claim's entry, once: the scheduler drops the
   allocation and allocates again, and within a node it tries devices without binding conditions
   first, so it takes the vendor's device on that node (the GPU we attached).

What we publish differs from our own mode only in the entries (`vendor_slices`): free devices
only (an attached GPU is the vendor's to offer; our kubelet plugin does not run), the extra
failure condition, and CoHDI's attributes `type: gpu` (NVIDIA's DeviceClass selects on it) and
`uuid: ""` (a pool device has no GPU yet; users' CEL tells pool devices from attached ones by it).

Facts: CoHDI composable-dra-driver `pkg/manager` (slice shape), dynamic-device-scaler
`internal/utils` (the uuid attribute, the condition write), KEP-5007 and the scheduler's
allocator (devices without binding conditions first within a node).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Final

from agent.model import claims as claimmodel
from agent.model import names
from agent.model.objects import Obj, fabric_device, state, target_node
from agent.model.pool import FAILED, READY, SliceSpec
from agent.model.scaling import BindDecision, BindStep

#: The failure condition that tells the scheduler to allocate again (CoHDI's "success").
RESCHEDULE: Final = "FabricDeviceReschedule"
#: The vendor's attribute holding the GPU's UUID (NVIDIA's `uuid`; CoHDI reads the same).
UUID_ATTRIBUTE: Final = "uuid"
#: The attributes CoHDI's chart gives pool devices besides `productName`.
POOL_ATTRIBUTES: Final = {"type": {"string": "gpu"}, UUID_ATTRIBUTE: {"string": ""}}
#: Attributes and capacities a device may have (the API server's
#: `ResourceSliceMaxAttributesAndCapacitiesPerDevice`).
MAX_ATTRIBUTES: Final = 32
#: Our slices carry this label (`agent.controllers.publishing`): never read as the vendor's.
MANAGED_BY: Final = ("app.kubernetes.io/managed-by", "cohdi-agent")


#: model (as our entries' `productName` carries it) -> CoHDI's `dra-attributes` for it
ModelAttributes = Mapping[str, Mapping[str, str]]


def vendor_entry(
    entry: Mapping[str, Any], cohdi: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A free pool entry as CoHDI publishes it: failure conditions `[FabricDeviceReschedule,
    FabricDeviceFailed]`, attributes `type: gpu` and `uuid: ""` added (ours kept), then `cohdi`
    — the model's `dra-attributes` from CoHDI's ConfigMap, as string attributes (the vendor's
    `productName` instead of the fabric's model string) — except `uuid`, which stays "" (a pool
    device has no GPU yet). At most `MAX_ATTRIBUTES` (CoHDI's first, then `uuid` and `type`, ours
    as room allows). A new dict: the publisher's cached entries are never changed."""
    attributes = {**(entry.get("attributes") or {}), **POOL_ATTRIBUTES}
    for key, value in (cohdi or {}).items():
        if key != UUID_ATTRIBUTE:
            attributes[key] = {"string": names.attribute_string(value)}
    if len(attributes) > MAX_ATTRIBUTES:
        # CoHDI's first, then uuid and type, then ours as room allows
        order = [*(cohdi or {}), UUID_ATTRIBUTE, "type", *attributes]
        attributes = {k: attributes[k] for k in dict.fromkeys(order)}
        attributes = dict(list(attributes.items())[:MAX_ATTRIBUTES])
    return {
        **entry,
        "attributes": attributes,
        "bindingConditions": [READY],
        "bindingFailureConditions": [RESCHEDULE, FAILED],
    }


def vendor_slices(
    desired: Mapping[str, list[SliceSpec]], attributes: ModelAttributes | None = None
) -> dict[str, list[SliceSpec]]:
    """Our desired slices (`agent.model.pool`) reshaped for vendor mode: node-local pools
    dropped, and in the fabric pools only the devices offered free (`bindsToNode`) kept, each
    as `vendor_entry` with its model's CoHDI attributes (`attributes`, by model; a model it does
    not name keeps ours). Slices keep their names and their count, so a device never moves."""
    by_name = {names.attribute_string(m): a for m, a in (attributes or {}).items()}
    out: dict[str, list[SliceSpec]] = {}
    for pool, slices in desired.items():
        if any(s.spec.get("nodeName") for s in slices):
            continue  # a node's pool of attached GPUs: the vendor's plugin offers those
        out[pool] = [
            replace(
                s,
                spec={
                    **s.spec,
                    "devices": [
                        vendor_entry(d, by_name.get(_product_name(d)))
                        for d in s.spec.get("devices") or []
                        if d.get("bindsToNode")
                    ],
                },
            )
            for s in slices
        ]
    return out


def _product_name(entry: Mapping[str, Any]) -> str:
    raw = (entry.get("attributes") or {}).get("productName") or {}
    return str(raw.get("string") or "") if isinstance(raw, Mapping) else ""


# --- the vendor's node-local devices ------------------------------------------------------------

#: (node, GPU UUID in lower case) -> (pool, device name) of the vendor's node-local device
VendorIndex = dict[tuple[str, str], tuple[str, str]]


def uuid_key(uuid: str) -> str:
    """A GPU UUID as the index keys it: the fabric's serial number and the vendor's attribute may
    differ in case (`GPU-5E3E...` against `GPU-5e3e...`), and a UUID is one UUID in any case
    (RFC 9562 §4)."""
    return uuid.strip().lower()


def _attribute(attributes: Mapping[str, Any], name: str, driver: str) -> str:
    """A string attribute by its short or its driver-qualified name ("" when absent)."""
    raw = attributes.get(name) or attributes.get(f"{driver}/{name}") or {}
    return str(raw.get("string") or "") if isinstance(raw, Mapping) else ""


def vendor_index(slices: Iterable[Obj], vendor: str) -> VendorIndex:
    """Where the vendor's plugin offers each GPU: from its node-local slices (`spec.nodeName`
    set, `spec.driver` the vendor's, not labelled as ours), every device with a non-empty `uuid`
    attribute. A GPU listed twice on one node (two slices during a pool update) keeps the first
    by (slice name, pool)."""
    out: VendorIndex = {}
    for obj in sorted(slices, key=lambda o: str(o["metadata"].get("name", ""))):
        spec = obj.get("spec") or {}
        labels = obj["metadata"].get("labels") or {}
        node = spec.get("nodeName")
        if spec.get("driver") != vendor or not node or labels.get(MANAGED_BY[0]) == MANAGED_BY[1]:
            continue
        pool = str((spec.get("pool") or {}).get("name") or "")
        for device in spec.get("devices") or []:
            uuid = _attribute(device.get("attributes") or {}, UUID_ATTRIBUTE, vendor)
            if uuid:
                out.setdefault((str(node), uuid_key(uuid)), (pool, str(device.get("name") or "")))
    return out


def gpu_uuid(resource: Obj) -> str:
    """The GPU UUID of a ComposableResource (`status.device_id`: the fabric's answer or what the
    node saw; CoHDI's operator writes the same field)."""
    return str((resource.get("status") or {}).get("device_id") or "")


def aliases(
    index: VendorIndex,
    resources: Iterable[Obj],
    previous: Mapping[tuple[str, str], str] | None = None,
) -> dict[tuple[str, str], str]:
    """(vendor pool, vendor device name) -> our fabric device, for every Online resource whose
    GPU the vendor offers on the resource's node: a claim holding the vendor's device holds our
    GPU (scale-down must not take it). The device is the resource's identity (`fabric_device`:
    for a resource made for an anonymous slot, the slot, as the scaler knows it).

    `previous` (the aliases in force): an alias whose GPU is still Online with us is kept while
    the vendor's slice does not list it — its plugin restarting, kubelet removing a plugin's
    slices when it unregisters — unless our GPU has a new alias or the vendor lists that device
    as another GPU: a claim
    holds the vendor's device all that time, and forgetting the alias would make our GPU look
    idle and scale it down under the claim."""
    out: dict[tuple[str, str], str] = {}
    online: set[str] = set()
    for r in resources:
        uuid, node, device = uuid_key(gpu_uuid(r)), target_node(r), fabric_device(r)
        if state(r) != "Online" or not device:
            continue
        online.add(device)
        if uuid and node and (node, uuid) in index:
            out[index[(node, uuid)]] = device
    aliased, listed = set(out.values()), set(index.values())
    for key, device in (previous or {}).items():
        # kept unless the vendor now lists that device as another GPU
        if device in online and device not in aliased and key not in listed:
            out[key] = device
    return out


# --- the reschedule -----------------------------------------------------------------------------


class Step(StrEnum):
    WAIT = "wait"  # the GPU is not on the vendor's node-local slice yet (or not attached)
    RESCHEDULE = "reschedule"  # set FabricDeviceReschedule now
    DONE = "done"  # set already (by us, an earlier leader, or CoHDI): never twice


@dataclass(frozen=True, slots=True)
class Decision:
    step: Step
    why: str = ""
    vendor_device: tuple[str, str] | None = None  # (pool, device) the vendor offers it as
    #: nodes whose vendor slices list the GPU while the claim's node does not (a node mapped to
    #: the wrong machine: providerIDs swapped, a label naming another machine)
    elsewhere: tuple[str, ...] = ()


def rescheduled(claim: Obj, driver: str, pool: str, device: str) -> bool:
    """The claim's `status.devices` entry for (driver, pool, device) has
    `FabricDeviceReschedule=True`."""
    for entry in (claim.get("status") or {}).get("devices") or []:
        if (entry.get("driver"), entry.get("pool"), entry.get("device")) == (driver, pool, device):
            return any(
                c.get("type") == RESCHEDULE and c.get("status") == "True"
                for c in entry.get("conditions") or []
            )
    return False


def decide(
    claim: Obj, b: claimmodel.Binding, *, vendor: str, resource: Obj | None, index: VendorIndex
) -> Decision:
    """What to do for one allocation of our pool device (`b`, from `claims.bindings(claim,
    vendor)`) in vendor mode. `resource`: our live ComposableResource for its device (None when
    there is none yet); `index`: `vendor_index` of the vendor's slices."""
    if rescheduled(claim, vendor, b.pool, b.device):
        return Decision(Step.DONE, "FabricDeviceReschedule is set already")
    if resource is None:
        return Decision(Step.WAIT, "no ComposableResource yet")
    if target_node(resource) != b.node:
        return Decision(Step.WAIT, f"composed to {target_node(resource)}, not {b.node}")
    if state(resource) != "Online":
        return Decision(Step.WAIT, f"not attached yet ({state(resource) or 'new'})")
    uuid = gpu_uuid(resource)
    if not uuid:
        return Decision(Step.WAIT, "its GPU UUID is not known yet")
    key = uuid_key(uuid)
    found = index.get((b.node, key))
    if found is None:
        elsewhere = tuple(sorted(n for n, u in index if u == key))
        return Decision(
            Step.WAIT, f"{uuid} is not in {vendor}'s slices of {b.node} yet", elsewhere=elsewhere
        )
    return Decision(Step.RESCHEDULE, f"{uuid} is {vendor}'s {found[0]}/{found[1]}", found)


def handed_over_or_late(
    claim: Obj,
    b: claimmodel.Binding,
    *,
    vendor: str,
    device: str,
    made_for_claim: bool,
    now: float,
    deadline: float,
) -> BindDecision:
    """The scaler's step, in vendor mode, for an allocation whose GPU is attached and ready on
    the node (where our own mode sets `FabricDeviceReady`): nothing once `FabricDeviceReschedule`
    is set (the scheduler reallocates it); else wait for the vendor's slice until the claim's
    deadline (`--claim-deadline`, seconds from its allocationTimestamp; `now`: epoch seconds),
    then fail it (`AttachDeadline`: the vendor's plugin never offered the GPU), deleting the
    resource when it was made for this claim."""
    if rescheduled(claim, vendor, b.pool, b.device):
        return BindDecision(BindStep.WAIT, after=0.0)
    remaining = b.allocated_at + deadline - now if b.allocated_at else deadline
    if remaining > 0:
        return BindDecision(BindStep.WAIT, after=remaining)
    return BindDecision(
        BindStep.FAIL,
        reason="AttachDeadline",
        message=f"{device} is attached to {b.node}, but {vendor} did not offer it there within "
        f"{deadline:.0f} s of allocation",
        delete_resource=made_for_claim,
    )
