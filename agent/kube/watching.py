"""List-then-watch informers over raw JSON.

An `Informer` keeps a store of one resource (optionally filtered by field/label selectors) that
converges to the server's truth, and tells handlers what changed:

- start: a paginated LIST, then a WATCH from the list's resourceVersion with bookmarks;
- the watch ends (server timeout, dropped connection, apiserver restart): resume from the last
  resourceVersion seen (events or bookmarks), so nothing is missed and nothing is replayed;
- 410 Gone (the resourceVersion was compacted away or the watch cache restarted): relist, and diff
  the new list against the store, so handlers see ADDED/MODIFIED/DELETED for everything that changed
  while we were away — a relist never loses an object, not even a deletion;
- any other error: exponential backoff with jitter, capped by a setting, then resume.

Handlers are plain callables run on the loop; they must not block (enqueue work, do not do it).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from agent import errors
from agent.kube.client import Kube, Obj

logger = logging.getLogger(__name__)

EventType = Literal["ADDED", "MODIFIED", "DELETED"]
Key = tuple[str, str]  # (namespace or "", name)

_LIST_PAGE: Final = 500


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    obj: Obj
    #: The store's previous version of the object, when there was one.
    old: Obj | None = None


Handler = Callable[[Event], None]


def key_of(obj: Obj) -> Key:
    meta = obj["metadata"]
    return (meta.get("namespace", ""), meta["name"])


class Informer:
    def __init__(
        self,
        kube: Kube,
        path: str,
        *,
        name: str = "",
        field_selector: str = "",
        label_selector: str = "",
        watch_timeout: float = 300.0,
        backoff_max: float = 30.0,
    ) -> None:
        self.kube = kube
        self.path = path
        self.name = name or path
        self._selectors = {
            k: v
            for k, v in (("fieldSelector", field_selector), ("labelSelector", label_selector))
            if v
        }
        self._watch_timeout = watch_timeout
        self._backoff_max = backoff_max
        self.store: dict[Key, Obj] = {}
        self.resource_version = ""
        self.synced = asyncio.Event()
        self._handlers: list[Handler] = []
        #: Counters for tests, metrics and the curious.
        self.lists = 0
        self.watches = 0
        self.gone = 0

    def add_handler(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def get(self, namespace: str, name: str) -> Obj | None:
        return self.store.get((namespace, name))

    async def run(self) -> None:
        """Run until cancelled. Never returns on its own; API errors are retried with backoff."""
        delay = 0.2
        need_list = True
        while True:
            try:
                if need_list:
                    await self._relist()
                    need_list = False
                await self._watch_once()
                delay = 0.2
            except errors.KubeGone as exc:
                self.gone += 1
                logger.info("%s: %s; relisting", self.name, exc)
                need_list = True
            except errors.AgentError as exc:
                # Permanent errors (RBAC, a missing API) are retried too, more slowly: an operator
                # may fix the ClusterRole or install the CRD while we run.
                level = logging.WARNING if exc.transient else logging.ERROR
                logger.log(level, "%s: %s; retrying in %.1f s", self.name, exc, delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311
                delay = min(delay * 2, self._backoff_max)

    async def _relist(self) -> None:
        params: dict[str, str | int] = {"limit": _LIST_PAGE, **self._selectors}
        items: list[Obj] = []
        while True:
            page = await self.kube.request("GET", self.path, params=params)
            items.extend(page.get("items") or [])
            cont = page["metadata"].get("continue")
            if not cont:
                break
            params["continue"] = cont
        self.lists += 1
        kind = page.get("kind", "").removesuffix("List")
        api_version = page.get("apiVersion", "")
        fresh: dict[Key, Obj] = {}
        for item in items:
            # LIST items come without kind/apiVersion; watch events carry them. Keep them uniform.
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", api_version)
            fresh[key_of(item)] = item
        old_store, self.store = self.store, fresh
        self.resource_version = page["metadata"]["resourceVersion"]
        for key, obj in fresh.items():
            prev = old_store.get(key)
            if prev is None:
                self._emit(Event("ADDED", obj))
            elif prev["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                self._emit(Event("MODIFIED", obj, prev))
        for key, prev in old_store.items():
            if key not in fresh:
                self._emit(Event("DELETED", prev, prev))
        logger.debug("%s: listed %d objects at rv %s", self.name, len(fresh), self.resource_version)
        self.synced.set()

    async def _watch_once(self) -> None:
        params: dict[str, str | int] = {
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": self.resource_version,
            "timeoutSeconds": int(self._watch_timeout),
            **self._selectors,
        }
        self.watches += 1
        async with self.kube.stream(
            self.path, params=params, read_timeout=self._watch_timeout + 30
        ) as body:
            async for line in body:
                if line.strip():
                    self._apply(orjson.loads(line))

    def _apply(self, event: dict[str, Any]) -> None:
        etype = event.get("type")
        obj: Obj = event.get("object") or {}
        if etype == "ERROR":
            code = obj.get("code", 0)
            message = f"watch error {code} {obj.get('reason', '')}: {obj.get('message', obj)}"
            if code == 410:
                raise errors.KubeGone(message, status=410, reason=str(obj.get("reason", "")))
            raise errors.KubeUnavailable(message, status=int(code or 0))
        rv = obj.get("metadata", {}).get("resourceVersion")
        if etype == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return
        if etype not in ("ADDED", "MODIFIED", "DELETED"):
            raise errors.KubeUnavailable(f"unexpected watch event type {etype!r}")
        key = key_of(obj)
        prev = self.store.get(key)
        if etype == "DELETED":
            self.store.pop(key, None)
            self._emit(Event("DELETED", obj, prev))
        else:
            self.store[key] = obj
            self._emit(Event("ADDED" if prev is None else "MODIFIED", obj, prev))
        if rv:
            self.resource_version = rv

    def _emit(self, event: Event) -> None:
        for handler in self._handlers:
            try:
                handler(event)
            except Exception:
                logger.exception("%s: handler %r failed on %s", self.name, handler, event.type)
