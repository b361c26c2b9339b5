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
from collections.abc import AsyncIterator, Awaitable, Callable

from agent import errors
from agent.backoff import FailureStreak
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
        self._transient = True
        self._streak = FailureStreak()

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
        down_for = self._streak.succeed()
        if down_for is not None:
            logger.info("fabric manager at %s reachable again after %.0f s", self.url, down_for)
        elif self.up is None:
            logger.info("fabric manager at %s reachable", self.url)
        self.up, self.error = True, ""

    def lost(self, exc: errors.AgentError) -> None:
        self.up, self.error, self._transient = False, str(exc), exc.transient
        if self._streak.fail(exc):  # the first failure, or another kind of failure
            logger.warning(
                "fabric manager at %s %s: %s (retrying %s; logged again only when this changes)",
                self.url,
                self._state(),
                exc,
                "every poll" if exc.transient else f"every {PERMANENT_RETRY:.0f} s",
            )


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
