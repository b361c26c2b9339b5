"""The one interface the cluster role uses to drive any fabric manager.

Contract for every backend:
- `attach` and `detach` are idempotent: they read the device's state first, act only if needed,
  and after a lost answer re-read instead of resending. Calling `attach` again after a crash
  between "sent" and "confirmed" converges to exactly one attachment.
- They return only when the fabric reports the final state (following task monitors or the
  synchronous answer), or raise: `DeviceNotFound`, `DeviceBusy` (attached elsewhere),
  `DeviceFailed`, `FabricAuthError` (permanent); `FabricUnavailable`, `FabricTimeout`,
  `FabricProtocolError` (transient, already retried with backoff).
- Calls on one device are serialised; calls on different devices run in parallel up to a bound.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from agent.fabric.link import FabricLink
from agent.model.fabric import DeviceId, Inventory, MachineId, PoolDevice


class FabricManager(Protocol):
    #: "redfish" or "fti".
    backend: str
    #: Whether the fabric manager answered the watch's last read (readiness checks read it).
    link: FabricLink

    async def inventory(self) -> Inventory:
        """Machines and pooled devices, read now."""
        ...

    async def attach(self, device: DeviceId, machine: MachineId, *, model: str = "") -> PoolDevice:
        """Attach `device` to `machine`. For fabrics that name no free device (FTI), `device` may
        be an anonymous slot and `model` says which kind to take; the result names the device
        the fabric picked."""
        ...

    async def detach(self, device: DeviceId) -> PoolDevice:
        """Detach `device` from whatever machine holds it; a free device is left alone."""
        ...

    def watch(self) -> AsyncIterator[Inventory]:
        """Yield an inventory now and then every time it changes (push channel if the backend
        has one, else conditional polling at the configured interval). Never ends and never
        raises for an unreachable or refusing fabric manager, not even on the first read: it
        retries, and records the state on `link`."""
        ...

    async def close(self) -> None: ...
