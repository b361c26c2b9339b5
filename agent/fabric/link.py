"""Reachability of the fabric manager, and the polling watch both backends share.

`poll()` reads the inventory every poll interval and never gives up: the first read is inside the
same retry as every later one, so a cluster role started while the fabric manager is down stays
up (not ready) and starts publishing once it answers. Each outcome is recorded on the backend's
`FabricLink`, which logs one line per change of state (unreachable, reachable again, another kind
of error) rather than one per attempt, and which the readiness check reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from agent import errors
from agent.fabric.transport import quiet_retries
from agent.model.fabric import Inventory

logger = logging.getLogger(__name__)

#: Seconds between reads while the fabric refuses us for a reason retrying cannot fix soon
#: (credentials, TLS trust, no composition service): an operator may fix it while we run.
PERMANENT_RETRY = 30.0


class FabricLink:
    """Whether the last read reached the fabric manager. `up` is None before the first read."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.up: bool | None = None
        self.error = "not read yet"
        self.since = time.monotonic()
        self._kind = ""
        self._transient = True

    @property
    def reason(self) -> str | None:
        """Why the fabric counts as unreachable now; None while it answers."""
        if self.up:
            return None
        if self.up is None:
            return f"fabric manager at {self.url} not read yet"
        return f"fabric manager at {self.url} {self._state()}: {self.error}"

    def _state(self) -> str:
        return "unreachable" if self._transient else "refuses us"

    def reached(self) -> None:
        if self.up is False:
            logger.info(
                "fabric manager at %s reachable again after %.0f s",
                self.url,
                time.monotonic() - self.since,
            )
        elif self.up is None:
            logger.info("fabric manager at %s reachable", self.url)
        if not self.up:
            self.since = time.monotonic()
        self.up, self.error, self._kind = True, "", ""

    def lost(self, exc: errors.AgentError) -> None:
        kind = type(exc).__name__
        self.error = str(exc)
        self._transient = exc.transient
        if self.up is not False or kind != self._kind:
            logger.warning(
                "fabric manager at %s %s: %s (retrying %s; logged again only when this changes)",
                self.url,
                self._state(),
                exc,
                "every poll" if exc.transient else f"every {PERMANENT_RETRY:.0f} s",
            )
        if self.up is not False:
            self.since = time.monotonic()
        self.up, self._kind = False, kind


async def poll(
    read: Callable[[bool], Awaitable[Inventory | None]],
    link: FabricLink,
    interval: float,
) -> AsyncIterator[Inventory]:
    """Yield the inventory, then each changed one. `read(conditional)` returns the inventory, or
    None when `conditional` and nothing changed; the first call of every `poll()` is
    unconditional, so a new consumer always gets a first inventory. Errors of the tree are
    recorded on `link` and retried (transient: every `interval`; permanent: every
    `PERMANENT_RETRY` s); anything else is a bug and propagates."""
    conditional = False
    while True:
        try:
            with quiet_retries():
                inv = await read(conditional)
        except errors.AgentError as exc:
            link.lost(exc)
            await asyncio.sleep(interval if exc.transient else max(interval, PERMANENT_RETRY))
            continue
        link.reached()
        if inv is not None:
            conditional = True
            yield inv
        await asyncio.sleep(interval)
