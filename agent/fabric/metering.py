"""Operation metrics of any fabric backend: a `FabricManager` that times and counts the calls the
cluster role makes (`attach`, `detach`, `inventory`) in `cohdi_fabric_operation_seconds` and
`cohdi_fabric_operation_errors_total{backend,operation,error}` (`agent.health`), and passes
everything else to the backend it wraps. The HTTP requests under them are measured by the
transport (`cohdi_fabric_http_request_seconds`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from agent import errors, health
from agent.fabric.link import FabricLink
from agent.fabric.protocol import FabricManager
from agent.model.fabric import DeviceId, Inventory, MachineId, PoolDevice

T = TypeVar("T")


class MeteredFabric:
    """Wraps a FabricManager; the same interface, measured."""

    def __init__(self, inner: FabricManager) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.link: FabricLink = inner.link  # the backend's own (it records reachability there)

    async def _measured(self, operation: str, call: Awaitable[T]) -> T:
        started = time.monotonic()
        outcome = "error"
        try:
            result = await call
            outcome = "ok"
            return result
        except errors.AgentError as exc:
            health.FABRIC_OPERATION_ERRORS.labels(self.backend, operation, type(exc).__name__).inc()
            raise
        finally:
            health.FABRIC_OPERATION_SECONDS.labels(self.backend, operation, outcome).observe(
                time.monotonic() - started
            )

    async def inventory(self) -> Inventory:
        return await self._measured("inventory", self.inner.inventory())

    async def attach(self, device: DeviceId, machine: MachineId, *, model: str = "") -> PoolDevice:
        return await self._measured("attach", self.inner.attach(device, machine, model=model))

    async def detach(self, device: DeviceId) -> PoolDevice:
        return await self._measured("detach", self.inner.detach(device))

    def watch(self) -> AsyncIterator[Inventory]:
        return self.inner.watch()

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:  # the backend's own API (tests, benchmarks)
        return getattr(self.inner, name)
