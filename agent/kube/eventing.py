"""Kubernetes Events for every decision (`kubectl describe` shows them). Emitted in the
background through a bounded queue: an event that cannot be written is dropped with a log line,
never allowed to slow down or fail the decision it describes."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from typing import Any

from agent import errors
from agent.kube.client import Kube, Obj

logger = logging.getLogger(__name__)


class Recorder:
    def __init__(self, kube: Kube, *, component: str, instance: str, capacity: int = 1000) -> None:
        self.kube = kube
        self.component = component
        self.instance = instance
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(capacity)

    def emit(self, obj: Obj, reason: str, message: str, *, warning: bool = False) -> None:
        meta = obj.get("metadata", {})
        namespace = meta.get("namespace") or "default"
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        stem = str(meta.get("name") or "x")[:240].rstrip("-.")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                # <= 253 whatever the object's name (a 253-character request has Events too)
                "name": f"{stem}.{uuid.uuid4().hex[:12]}",
                "namespace": namespace,
            },
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", ""),
                "kind": obj.get("kind", ""),
                "name": meta.get("name", ""),
                "namespace": meta.get("namespace", ""),
                "uid": meta.get("uid", ""),
                "resourceVersion": meta.get("resourceVersion", ""),
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": self.component},
            "reportingComponent": self.component,
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            logger.warning("event queue full; dropped %s %s", reason, message)

    async def run(self) -> None:
        while True:
            event = await self._queue.get()
            ns = event["metadata"]["namespace"]
            try:
                await self.kube.create(f"/api/v1/namespaces/{ns}/events", event)
            except errors.AgentError as exc:
                logger.debug("could not record event %s: %s", event["reason"], exc)
