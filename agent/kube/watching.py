"""List-then-watch informers over raw JSON.

An `Informer` keeps a store of one resource (optionally filtered by field/label selectors) that
converges to the server's truth, and tells handlers what changed:

- start: a paginated LIST, then a WATCH from the list's resourceVersion with bookmarks;
- the watch ends (server timeout, dropped connection, apiserver restart): resume from the last
  resourceVersion seen (events or bookmarks), so nothing is missed and nothing is replayed;
- 410 Gone (the resourceVersion was compacted away or the watch cache restarted): relist, and diff
  the new list against the store, so handlers see ADDED/MODIFIED/DELETED for everything that changed
  while we were away — a relist never loses an object, not even a deletion;
- any other error: exponential backoff with jitter, capped by a setting, then resume; a server's
  Retry-After (429) is honoured. One log line when the failures start (WARNING; ERROR for a
  permanent one such as RBAC), DEBUG while they repeat, one INFO line once the server answers
  again; `healthy` and `last_error` tell readiness checks where it stands.

Handlers are plain callables run on the loop; they must not block (enqueue work, do not do it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from agent import errors
from agent.backoff import Backoff, FailureStreak, RateLimiter, describe, loop_time
from agent.kube.client import Kube, Obj

logger = logging.getLogger(__name__)

EventType = Literal["ADDED", "MODIFIED", "DELETED"]
Key = tuple[str, str]  # (namespace or "", name)

_LIST_PAGE: Final = 500
#: First retry delay after a failure, seconds (doubling up to `backoff_max`).
_RETRY_BASE: Final = 0.2


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
        #: One stream, so one key; no overall bucket (the watch is a single request at a time).
        self._limiter: RateLimiter[str] = RateLimiter(
            Backoff(base=min(_RETRY_BASE, backoff_max), cap=backoff_max)
        )
        self._streak = FailureStreak(loop_time)
        #: The latest error of a list or watch (kept after recovery, for the curious).
        self.last_error: errors.AgentError | None = None
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

    @property
    def healthy(self) -> bool:
        """Listed at least once, and the last list or watch request got an answer: the store
        follows the server. False from the first failure until the server answers again."""
        return self.synced.is_set() and not self._streak.failing

    async def run(self) -> None:
        """Run until cancelled. Never returns on its own; API errors are retried with backoff."""
        need_list = True
        while True:
            try:
                if need_list:
                    await self._relist()
                    need_list = False
                await self._watch_once()
                self._limiter.forget(self.name)  # a watch that ran its course
            except errors.KubeGone as exc:
                self.gone += 1
                logger.info("%s: %s; relisting", self.name, exc)
                need_list = True
            except errors.AgentError as exc:
                # Permanent errors (RBAC, a missing API) are retried too, more slowly: an operator
                # may fix the ClusterRole or install the CRD while we run.
                await asyncio.sleep(self._failed(exc))

    def _failed(self, exc: errors.AgentError) -> float:
        """Count a failure, log it if it changes the state; the seconds to wait."""
        self.last_error = exc
        delay = self._limiter.when(self.name, retry_after=exc.retry_after)
        if self._streak.fail(exc):
            level = logging.WARNING if exc.transient else logging.ERROR
            logger.log(
                level,
                "%s: %s; retrying with backoff (at most every %.0f s; repeats logged at DEBUG)",
                self.name,
                describe(exc),
                self._limiter.backoff.cap,
            )
        else:
            logger.debug("%s: %s; retry in %.1f s", self.name, describe(exc), delay)
        return delay

    def _answered(self) -> None:
        """The server answered a list or opened a watch: end a failure streak, if any."""
        failures = self._streak.failures
        took = self._streak.succeed()
        if took is not None:
            logger.info(
                "%s: recovered after %.1f s (%d failed attempts)", self.name, took, failures
            )

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
        self._answered()

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
            self._answered()
            async for line in body:
                if line.strip():
                    self._apply(orjson.loads(line))
                    if self._limiter.failures(self.name):
                        self._limiter.forget(self.name)  # the watch delivers: start over

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
