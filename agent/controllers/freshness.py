"""Fresh reads of every ResourceClaim from the API server, for the decisions that must not trust
an informer (which may lag the scheduler's writes): before a detach, and before a device changes
the identity it is offered under. Concurrent callers share one LIST."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from agent.kube.client import Kube, Obj

ALL_CLAIMS = "/apis/resource.k8s.io/v1/resourceclaims"


class FreshClaims:
    def __init__(self, kube: Kube, *, mono: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.mono = mono
        self._lock = asyncio.Lock()
        self._listed: tuple[float, list[Obj]] = (float("-inf"), [])
        #: LISTs made (tests and the curious)
        self.lists = 0

    async def since(self, not_before: float) -> list[Obj]:
        """Every ResourceClaim, from a LIST that started at or after `not_before` (this object's
        monotonic clock). Raises `errors.Kube*` from the client."""
        async with self._lock:
            started, items = self._listed
            if started >= not_before:
                return items
            started = self.mono()
            items = []
            params: dict[str, str | int] = {"limit": 500}
            while True:
                page = await self.kube.get(ALL_CLAIMS, **params)
                items.extend(page.get("items") or [])
                cont = (page.get("metadata") or {}).get("continue")
                if not cont:
                    break
                params["continue"] = cont
            self.lists += 1
            self._listed = (started, items)
            return items
