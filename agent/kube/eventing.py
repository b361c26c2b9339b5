"""Kubernetes Events for every decision (`kubectl describe` shows them), aggregated the way
Kubernetes' own recorder does it (client-go's EventCorrelator).

Aggregation. The same (involved object, type, reason, message) emitted again is *one* Event whose
`count` and `lastTimestamp` grow (a merge PATCH of those two fields), not a second Event: 20
identical failures on one object are one Event with `count: 20`. What is remembered is bounded
(`capacity` series, least recently used forgotten first); a series whose Event is gone from the
server (Events expire after an hour) starts a new Event. Occurrences that arrive while a write is
in flight are folded into the next write, so a burst costs a create and one patch, not one
request per occurrence.

Writing never slows down or fails the decision it describes: `emit()` is synchronous and only
records; `run()` writes in the background. An Event that cannot be written (RBAC forbids it, the
API server is away) is dropped with a WARNING the first time and whenever the kind of error
changes (repeats at DEBUG), and an INFO line when writing works again, with how many were
dropped.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Final

from agent import errors, health
from agent.backoff import FailureStreak, describe
from agent.kube.client import MERGE_PATCH, Kube, Obj

logger = logging.getLogger(__name__)

#: Series remembered for aggregation (client-go's EventCorrelator keeps 4096 too).
CAPACITY: Final = 4096

SeriesKey = tuple[str, str, str, str, str, str, str]


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Series:
    """One aggregated Event: its body as first emitted, how often it happened, how often the
    server has been told, and the Event's name there once created."""

    body: dict[str, Any]
    count: int = 1
    written: int = 0
    name: str = ""
    queued: bool = False

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"]["namespace"])


class Recorder:
    """`emit()` from anywhere on the loop; `await run()` in the role's task group."""

    def __init__(
        self, kube: Kube, *, component: str, instance: str, capacity: int = CAPACITY
    ) -> None:
        self.kube = kube
        self.component = component
        self.instance = instance
        self.capacity = capacity
        self._series: collections.OrderedDict[SeriesKey, _Series] = collections.OrderedDict()
        self._queue: asyncio.Queue[_Series] = asyncio.Queue()
        self._streak = FailureStreak()
        #: Occurrences not written because the API server refused or did not answer.
        self.dropped = 0

    def emit(self, obj: Obj, reason: str, message: str, *, warning: bool = False) -> None:
        meta = obj.get("metadata", {})
        kind = "Warning" if warning else "Normal"
        message = message[:1024]
        key: SeriesKey = (
            str(obj.get("kind", "")),
            str(meta.get("namespace", "")),
            str(meta.get("name", "")),
            str(meta.get("uid", "")),
            kind,
            reason,
            message,
        )
        series = self._series.get(key)
        now = _now()
        if series is not None:
            self._series.move_to_end(key)
            series.count += 1
            series.body["lastTimestamp"] = now
        else:
            series = self._series[key] = _Series(self._body(obj, kind, reason, message, now))
            while len(self._series) > self.capacity:
                self._series.popitem(last=False)
        if not series.queued:
            series.queued = True
            self._queue.put_nowait(series)

    def _body(self, obj: Obj, kind: str, reason: str, message: str, now: str) -> dict[str, Any]:
        meta = obj.get("metadata", {})
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"namespace": meta.get("namespace") or "default"},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", ""),
                "kind": obj.get("kind", ""),
                "name": meta.get("name", ""),
                "namespace": meta.get("namespace", ""),
                "uid": meta.get("uid", ""),
                "resourceVersion": meta.get("resourceVersion", ""),
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "source": {"component": self.component},
            "reportingComponent": self.component,
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }

    async def run(self) -> None:
        while True:
            series = await self._queue.get()
            series.queued = False
            count = series.count
            try:
                await self._write(series, count)
            except errors.AgentError as exc:
                self._failed(series, count, exc)
                continue
            series.written = count
            took = self._streak.succeed()
            if took is not None:
                logger.info(
                    "Events are written again after %.1f s (%d dropped meanwhile)",
                    took,
                    self.dropped,
                )

    async def _write(self, series: _Series, count: int) -> None:
        collection = f"/api/v1/namespaces/{series.namespace}/events"
        if series.name:
            try:
                await self.kube.patch(
                    f"{collection}/{series.name}",
                    {"count": count, "lastTimestamp": series.body["lastTimestamp"]},
                    content_type=MERGE_PATCH,
                )
                return
            except errors.KubeNotFound:
                pass  # expired on the server: this series starts a new Event
        stem = str(series.body["involvedObject"]["name"] or "x")[:240].rstrip("-.")
        # <= 253 whatever the object's name (a 253-character request has Events too)
        name = f"{stem}.{uuid.uuid4().hex[:12]}"
        body = {
            **series.body,
            "metadata": {**series.body["metadata"], "name": name},
            "count": count,
        }
        await self.kube.create(collection, body)
        series.name = name

    def _failed(self, series: _Series, count: int, exc: errors.AgentError) -> None:
        lost = count - series.written
        self.dropped += lost
        health.EVENTS_DROPPED.inc(lost)
        series.written = count  # dropped, not retried: a later occurrence writes the total
        reason = series.body["reason"]
        if self._streak.fail(exc):
            logger.warning(
                "cannot write Events (%s %s dropped): %s; decisions go on without their "
                "Events until writing works again (repeats logged at DEBUG)",
                series.body["type"],
                reason,
                describe(exc),
            )
        else:
            logger.debug("Event %s dropped: %s", reason, describe(exc))
