"""From the fabric's inventory to the pool ResourceSlices we publish: pure decisions.

One pool per fabric. A device's slice entry is named from its fabric id and never changes name,
so one physical GPU is one device for the scheduler whether free or attached:
- free: node selector on the fabric label (and not on nodes that are full), `bindsToNode`,
  binding and failure conditions — the scheduler pins it to a node and waits for us;
- attached to a node and healthy: `nodeName`, no conditions — usable at once;
- attaching for a claim: kept exactly as it was offered (the claim's allocation refers to it);
- anything else in transition, failed, or withheld for scale-down: not offered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from agent.model import names
from agent.model.fabric import DeviceState, Inventory, PoolDevice

READY: Final = "FabricDeviceReady"
FAILED: Final = "FabricDeviceFailed"
FABRIC_LABEL: Final = "cohdi.io/fabric"
FULL_LABEL: Final = "cohdi.io/gpu-full"  # the node is at its device maximum
MAX_DEVICES_PER_SLICE: Final = 128
#: The API server's limit when any device of a slice has taints (v1
#: `ResourceSliceMaxDevicesWithTaintsOrConsumesCounters`).
MAX_TAINTED_DEVICES_PER_SLICE: Final = 64
DEVICE_ID_ATTRIBUTE: Final = "fabricDeviceId"
#: A bool attribute: true on a GPU offered from a node (attached), false on a free pool GPU.
ATTACHED_ATTRIBUTE: Final = "attached"


def device_name(device_id: str) -> str:
    """The DRA device name of a fabric device: a DNS-1123 label (`names.dns_label`)."""
    return names.dns_label(device_id)


def pool_name(fabric: str) -> str:
    """The DRA pool of a fabric: one segment, the fabric id when that is a DNS subdomain, else
    `<stem>-<hash>` (`names.dns_subdomain`). Never a '/': two-segment pool names are the node
    pools' (`node_pool_name`), so the two kinds can never share a name."""
    return names.dns_subdomain(fabric)


def fabric_label(fabric: str) -> str:
    """The value of the `cohdi.io/fabric` label for a fabric id (`names.label_value`)."""
    return names.label_value(fabric)


def model_label(model: str) -> str:
    """`cohdi.io/<model>-full`: per-model maximum reached on a node. The name part is
    `names.qualified_name_part(model, limit=58)` + `-full` (<= 63)."""
    return f"cohdi.io/{names.qualified_name_part(model, limit=58)}-full"


@dataclass(frozen=True, slots=True)
class SliceSpec:
    """One slice we want: name, pool, and the exact spec (devices in a stable order)."""

    name: str
    pool: str
    spec: dict[str, Any]


def node_pool_name(fabric: str, node: str) -> str:
    """The node-local pool of `node`'s attached GPUs from `fabric`: `<fabric pool>/<node>` (a DRA
    pool name is DNS subdomains joined by '/', 253 bytes in all; node names are DNS subdomains).
    When the whole would be longer, each part is cut to `<stem>-<hash>` to fit, so distinct
    (fabric, node) pairs still never share a pool."""
    fabric_pool = pool_name(fabric)
    if len(fabric_pool) + 1 + len(node) <= names.DNS_SUBDOMAIN_MAX:
        return f"{fabric_pool}/{node}"
    first = names.dns_subdomain(fabric_pool, limit=min(len(fabric_pool), 120))
    second = names.dns_subdomain(node, limit=names.DNS_SUBDOMAIN_MAX - 1 - len(first))
    return f"{first}/{second}"


def device_entry(
    dev: PoolDevice, *, node: str | None, offered_free: bool, node_local: bool = False
) -> dict[str, Any]:
    """The slice entry of a device: free (`bindsToNode`, binding conditions, a node selector on
    the fabric label), attached in the fabric pool (`nodeName`), or attached in its node's pool
    (`node_local`: the slice carries the nodeName)."""
    attrs: dict[str, Any] = {
        "productName": {"string": names.attribute_string(dev.model)},
        "fabric": {"string": names.attribute_string(dev.fabric)},
        DEVICE_ID_ATTRIBUTE: {"string": names.attribute_string(dev.id)},
        # Whether the GPU is on a node already: a claim that lists an `attached == true`
        # subrequest first (`firstAvailable`) gets the scheduler's prioritized-list score for
        # nodes that have one, so a burst lands on warm GPUs rather than on any node.
        ATTACHED_ATTRIBUTE: {"bool": not offered_free},
    }
    if dev.vendor:
        attrs["vendor"] = {"string": names.attribute_string(dev.vendor)}
    if dev.gpu_uuid:
        attrs["uuid"] = {"string": names.attribute_string(dev.gpu_uuid)}
    entry: dict[str, Any] = {"name": device_name(dev.id), "attributes": attrs}
    if dev.memory:
        entry["capacity"] = {"memory": {"value": str(dev.memory)}}
    if offered_free:
        entry["bindsToNode"] = True
        entry["bindingConditions"] = [READY]
        entry["bindingFailureConditions"] = [FAILED]
        entry["nodeSelector"] = {
            "nodeSelectorTerms": [
                {
                    "matchExpressions": [
                        {
                            "key": FABRIC_LABEL,
                            "operator": "In",
                            "values": [fabric_label(dev.fabric)],
                        },
                        {"key": FULL_LABEL, "operator": "DoesNotExist"},
                        {"key": model_label(dev.model), "operator": "DoesNotExist"},
                    ]
                }
            ]
        }
    elif not node_local:
        assert node is not None
        entry["nodeName"] = node
    return entry


EntryCache = dict[tuple[PoolDevice, str | None, bool], dict[str, Any]]


def node_pool_slices(
    *,
    driver: str,
    inventory: Inventory,
    node_of_machine: Mapping[str, str],
    placed: Mapping[str, str],
    withheld: frozenset[str] = frozenset(),
    taints: Mapping[str, list[dict[str, Any]]] | None = None,
) -> dict[str, list[SliceSpec]]:
    """Node-local pools: every attached, healthy device `placed` on the node it is attached to,
    in the pool `<fabric pool>/<node>` whose slices carry `nodeName` and no binding conditions.
    The scheduler's allocator tries pools without binding conditions first (first fit, pools by
    name, then slices by name, then devices in order: k8s.io/dynamic-resource-allocation
    structured/internal/*/pools_*.go), so a GPU already on the node is taken before a pool GPU
    that needs an attach. Nodes with nothing placed have no pool (slices of a pool that empties
    are deleted)."""
    by_pool: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for dev in sorted(inventory.devices, key=lambda d: d.id):
        node = node_of_machine.get(dev.machine or "")
        if (
            dev.id in withheld
            or dev.state != DeviceState.ATTACHED
            or not node
            or placed.get(dev.id) != node
        ):
            continue
        entry = with_taints(
            device_entry(dev, node=None, offered_free=False, node_local=True), dev.id, taints
        )
        by_pool.setdefault((node_pool_name(dev.fabric, node), node), []).append(entry)
    out: dict[str, list[SliceSpec]] = {}
    for (pool, node), entries in sorted(by_pool.items()):
        size = slice_size(any("taints" in e for e in entries))
        chunks = [entries[i : i + size] for i in range(0, len(entries), size)]
        out[pool] = pool_slices(driver, pool, chunks, nodeName=node)
    return out


def desired_slices(
    *,
    driver: str,
    inventory: Inventory,
    node_of_machine: Mapping[str, str],
    withheld: frozenset[str] = frozenset(),
    pinned: frozenset[str] = frozenset(),
    cache: EntryCache | None = None,
    placed: Mapping[str, str] | None = None,
    taints: Mapping[str, list[dict[str, Any]]] | None = None,
) -> dict[str, list[SliceSpec]]:
    """pool -> slices. `pinned`: devices allocated to a claim while they attach (kept as free
    entries); `withheld`: devices not to offer
    (scale-down or a move in progress, failed claims); `placed`: attached devices offered from
    their node's pool instead (`node_pool_slices`). `cache` (kept by the caller between calls)
    reuses the entry of a device that did not change, so a sync of thousands of unchanged
    devices costs dictionary lookups, not rebuilds. `taints`: device id -> its DRA device
    taints (`agent.model.health.taints`); a pool with any tainted device has at most 64 devices
    a slice (the API server's limit), so tainting its first device rewrites such a pool whole."""
    fresh: EntryCache = {}
    tainted_pools = {pool_name(d.fabric) for d in inventory.devices if taints and taints.get(d.id)}
    # A device's slice is fixed by its position among *all* the pool's devices, offered or not,
    # so withholding or failing one device rewrites one slice and never moves the others.
    by_pool: dict[str, list[list[dict[str, Any]]]] = {}
    position: dict[str, int] = {}
    for dev in sorted(inventory.devices, key=lambda d: d.id):
        pool = pool_name(dev.fabric)
        size = slice_size(pool in tainted_pools)
        slot = position.get(pool, 0)
        position[pool] = slot + 1
        chunks = by_pool.setdefault(pool, [])
        while len(chunks) <= slot // size:
            chunks.append([])
        if dev.id in withheld or (dev.anonymous and dev.state != DeviceState.FREE):
            continue
        node = node_of_machine.get(dev.machine or "")
        # attaching for a claim (pinned by the scaler until FabricDeviceReady): kept exactly as it
        # was offered. Once attached it is offered with nodeName: were the free entry kept until
        # the claim lets go, the scheduler could give that stale entry, pinned to any node of the
        # fabric, to the next claim in the instant between the release and our rewrite (found by
        # the churn test: claims allocated a GPU attached to another node)
        attaching_for_claim = dev.id in pinned and dev.state == DeviceState.ATTACHING
        if dev.state == DeviceState.FREE or attaching_for_claim:
            key: tuple[PoolDevice, str | None, bool] | None = (dev, None, True)
        elif dev.state == DeviceState.ATTACHED and node and (placed or {}).get(dev.id) == node:
            key = None  # offered in its node's pool instead (node_pool_slices)
        elif dev.state == DeviceState.ATTACHED and node:
            key = (dev, node, False)
        else:
            key = None
        entry: dict[str, Any] | None = None
        if key is not None:
            entry = (cache or {}).get(key) or device_entry(dev, node=key[1], offered_free=key[2])
            fresh[key] = entry
        if entry is not None:
            chunks[slot // size].append(with_taints(entry, dev.id, taints))
    for machine_fabric in {m.fabric for m in inventory.machines}:
        by_pool.setdefault(pool_name(machine_fabric), [[]])  # an empty pool is still a pool
    if cache is not None:
        cache.clear()
        cache.update(fresh)
    out: dict[str, list[SliceSpec]] = {}
    for pool, chunks in sorted(by_pool.items()):
        out[pool] = pool_slices(driver, pool, chunks, perDeviceNodeSelection=True)
    return out


def slice_size(tainted: bool) -> int:
    """Devices a slice may hold: 64 when any of them has taints, else 128."""
    return MAX_TAINTED_DEVICES_PER_SLICE if tainted else MAX_DEVICES_PER_SLICE


def with_taints(
    entry: dict[str, Any], device_id: str, taints: Mapping[str, list[dict[str, Any]]] | None
) -> dict[str, Any]:
    """`entry` with the device's taints (a copy; the cached entry is left as it was)."""
    found = taints.get(device_id) if taints else None
    return {**entry, "taints": found} if found else entry


def pool_slices(
    driver: str, pool: str, chunks: list[list[dict[str, Any]]], **node_selection: Any
) -> list[SliceSpec]:
    """The slices of one pool, one per chunk of device entries, generation 0 (the publisher sets
    it when writing); `node_selection`: `nodeName=<node>` (a node's pool) or
    `perDeviceNodeSelection=True` (the fabric pool)."""
    return [
        SliceSpec(
            name=slice_name(driver, pool, i),
            pool=pool,
            spec={
                "driver": driver,
                "pool": {"name": pool, "generation": 0, "resourceSliceCount": len(chunks)},
                **node_selection,
                "devices": chunk,
            },
        )
        for i, chunk in enumerate(chunks)
    ]


def slice_name(driver: str, pool: str, index: int) -> str:
    """`<driver>-<pool>-<hash of driver/pool>-<index>`, a DNS subdomain: always hashed, so two
    (driver, pool) pairs that read alike never share a slice (`names.hashed_subdomain`)."""
    suffix = f"-{index}"
    return (
        names.hashed_subdomain(
            f"{driver}/{pool}",
            readable=f"{driver}-{pool}",
            limit=names.DNS_SUBDOMAIN_MAX - len(suffix),
        )
        + suffix
    )


def same_content(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Slice specs equal apart from the pool generation (which we set when writing)."""

    def strip(s: Mapping[str, Any]) -> dict[str, Any]:
        return {**s, "pool": {**s.get("pool", {}), "generation": 0}}

    return strip(a) == strip(b)
