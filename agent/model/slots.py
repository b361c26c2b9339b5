"""Anonymous slots (fabric managers that name no free device) with stable identities.

The FTI/Fsas fabric-manager API gives, per model, only a *count* of free GPUs; the device that
arrives is named by the attach's answer. The backend reports the count as placeholders
`<fabric>.<model>.free-<n>` (`slot_id`). Published as they are, one physical GPU would have two
allocatable identities once attached — the slot a claim holds and the GPU's own id, offered with
`nodeName` — and the scheduler could hand it to a second claim. So:

- a slot held by a ComposableResource (`spec.fabric_device` is a slot) keeps its name for as long
  as that resource lives: while attaching it is the slot (as the claim was allocated it), once the
  GPU arrived it is the slot with that GPU's state, machine, model and UUID;
- the GPU that arrived through a held slot is not offered under its own id, nor is a GPU no
  resource names that a read lists on a machine where a slot of its model is still waiting (it
  may be that slot's, read before the attach's answer came back);
- the free count, less the held slots whose GPU has not arrived yet (the count still includes
  those), is offered as the lowest slot numbers no resource holds: a held slot's name is never
  reused while it is held, and the numbers offered stay put while attaches complete.

`view(inventory, held, arriving, named)` turns the backend's inventory into the one the
publisher, the scaler and the node see; `with_arrival` adds an attach's answer to the inventory
ahead of the next read, taking the GPU out of the free count. Backends that name their free
devices (Redfish) have no slots: the view is the inventory unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Final

from agent.model.fabric import DeviceId, DeviceState, FabricId, Inventory, PoolDevice

_SLOT: Final = re.compile(r"^(?P<fabric>.*)\.(?P<model>[^.]*)\.free-(?P<n>\d+)$")


def slot_id(fabric: str, model: str, n: int) -> DeviceId:
    """The id of free slot `n` of `model` on `fabric` (models contain no '.')."""
    return DeviceId(f"{fabric}.{model}.free-{n}")


def placeholders(fabric: str, model: str, count: int) -> list[PoolDevice]:
    """A fabric's free `count` of `model` as the inventory lists it: free anonymous devices
    `slot_id(fabric, model, 0)` .. `count - 1` (what `view` renames and offers)."""
    return [
        PoolDevice(
            slot_id(fabric, model, n), FabricId(fabric), model, DeviceState.FREE, anonymous=True
        )
        for n in range(count)
    ]


def parse_slot(device: str) -> tuple[str, str, int] | None:
    """(fabric, model, n) of a slot id; None for any other device id."""
    m = _SLOT.match(device)
    if m is None:
        return None
    return m["fabric"], m["model"], int(m["n"])


def is_slot(device: str) -> bool:
    return parse_slot(device) is not None


def view(
    inventory: Inventory,
    held: Mapping[str, str | None],
    arriving: Collection[tuple[str, str]] = (),
    named: Collection[str] = (),
) -> Inventory:
    """The inventory with slot identities kept stable (see the module docstring).

    `held`: slot id → the real device a live resource attached through it (None while it has not
    arrived). Slots not in `inventory` may be held (their placeholder moved when the count
    dropped); real devices that no longer exist are ignored. `arriving`: (machine, model) of
    each held slot whose attach may already have brought a GPU the composer has not recorded
    (a fabric read can list it before the attach's answer comes back); a GPU of that model
    attached (or attaching) there that no resource names (`named`: device ids) is that slot's,
    and is not offered under its own id meanwhile (offered with its node, the scheduler could
    give it to a second claim)."""
    if not held and not any(d.anonymous for d in inventory.devices):
        return inventory
    # (a backend's echo of a slot id as a device of its own is not a device)
    real = {d.id: d for d in inventory.devices if not d.anonymous and not is_slot(d.id)}
    behind = {dev for dev in held.values() if dev}

    def maybe_arrived(d: PoolDevice) -> bool:
        return (
            d.state in (DeviceState.ATTACHED, DeviceState.ATTACHING)
            and (str(d.machine), d.model) in arriving
            and d.id not in named
        )

    out: list[PoolDevice] = [
        d for d in real.values() if d.id not in behind and not (arriving and maybe_arrived(d))
    ]
    # held slots, under their own names
    taken: dict[tuple[str, str], set[int]] = {}
    waiting: dict[tuple[str, str], int] = {}  # held, nothing arrived yet: still in the free count
    for slot, device in held.items():
        parsed = parse_slot(slot)
        if parsed is None:
            continue
        fabric, model, n = parsed
        taken.setdefault((fabric, model), set()).add(n)
        arrived = real.get(DeviceId(device)) if device else None
        if arrived is None:
            waiting[(fabric, model)] = waiting.get((fabric, model), 0) + 1
        if arrived is not None:
            out.append(replace(arrived, id=DeviceId(slot), anonymous=False))
        else:
            out.append(PoolDevice(DeviceId(slot), FabricId(fabric), model, DeviceState.ATTACHING))
    # the free count, as the lowest numbers no resource holds
    free: dict[tuple[str, str], list[PoolDevice]] = {}
    for d in inventory.devices:
        if d.anonymous and d.state == DeviceState.FREE:
            free.setdefault((str(d.fabric), d.model), []).append(d)
    for (fabric, model), placeholders in sorted(free.items()):
        used = taken.get((fabric, model), set())
        # a held slot whose GPU has not arrived is still in the fabric's free count: offering
        # that count whole would offer its GPU twice (and, once it arrives and the count drops,
        # a number a claim was just given would vanish under it)
        placeholders = placeholders[: max(0, len(placeholders) - waiting.get((fabric, model), 0))]
        n = 0
        for d in placeholders:
            while n in used:
                n += 1
            out.append(replace(d, id=slot_id(fabric, model, n)))
            n += 1
    return Inventory(inventory.machines, tuple(out), version=inventory.version)


def with_arrival(inventory: Inventory, device: PoolDevice) -> Inventory:
    """`inventory` with `device` (an attach's answer) in it, before the fabric's next read.

    A GPU that arrived by model on a fabric that counts its free GPUs was one of that count: it
    leaves the count as it gets an identity of its own. Listed with the old count kept, each
    arrival would offer one free slot more than the fabric has GPUs (a claim given that number
    waits for a GPU that does not exist). So when `device` is new to the inventory, attached or
    attaching, and its fabric and model have free placeholders, the highest-numbered one goes.
    A read taken during the attach may already have dropped the count: the view then offers one
    number fewer until the next read, never one more. Fabrics that name their free devices have
    no placeholders: only the device's entry changes."""
    old = inventory.device(device.id)
    devices = [d for d in inventory.devices if d.id != device.id]
    if old is None and device.state in (DeviceState.ATTACHED, DeviceState.ATTACHING):
        placeholders = [
            d
            for d in devices
            if d.anonymous
            and d.state == DeviceState.FREE
            and d.fabric == device.fabric
            and d.model == device.model
        ]
        if placeholders:
            last = max(placeholders, key=lambda d: (parse_slot(d.id) or ("", "", -1))[2])
            devices.remove(last)
    devices.append(device)
    return Inventory(inventory.machines, tuple(devices), version="local")


def unowned_arrivals(
    inventory: Inventory, *, machine: str, model: str, owned: set[str]
) -> list[PoolDevice]:
    """Devices of `model` attached to `machine` that no resource names: after an attach through a
    slot whose answer was lost, the GPU that arrived is one of these (the lowest id first)."""
    return sorted(
        (
            d
            for d in inventory.devices
            if not d.anonymous
            and d.model == model
            and d.machine == machine
            and d.state in (DeviceState.ATTACHED, DeviceState.ATTACHING)
            and d.id not in owned
        ),
        key=lambda d: d.id,
    )
