"""Supervision: keep a set of named coroutines ("units": the loops of the cluster role, or the
roles of the process) running, so that one failing never stops the others.

A unit that raises (or returns, which a loop never should) is logged with its error, counted in a
metric (`cohdi_<kind>_restarts_total`), and started again after a backoff; its siblings go on.

- Transient errors (`TransientError`, and anything unmapped such as a bare `TimeoutError` or a
  bug) back off exponentially from `first` to `ceiling` seconds, less up to 20 % jitter
  (agent.backoff).
- Permanent errors (`PermanentError`: RBAC refused, the DRA feature gates off, a corrupt
  checkpoint) cannot heal by retrying soon, but an operator may fix them while we run: they are
  retried slowly, from `permanent_first` to `permanent_ceiling` seconds.
- A unit that has run `settle` seconds since its last start without failing is healthy again:
  its backoff resets and its failure is no longer reported.

Until then `problems()` names the unit and its last error, which the readiness checks show. Only
cancelling `run()` (the Lease lost, SIGTERM) stops the units; it waits for each to finish its
clean-up. Errors that are not `Exception`s (KeyboardInterrupt, SystemExit) are not caught.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from agent import backoff, errors, health

logger = logging.getLogger(__name__)

#: A unit: called again for every (re)start; runs until cancelled.
Start = Callable[[], Awaitable[None]]


@dataclass
class Policy:
    """How a supervisor restarts its units (seconds)."""

    first: float = 0.2
    ceiling: float = 30.0
    permanent_first: float = 30.0
    permanent_ceiling: float = 300.0
    settle: float = 10.0
    jitter: float = 0.2


@dataclass
class Unit:
    """What a supervisor knows about one unit; tests and readiness checks read it."""

    name: str
    #: Times it was started (1 after the first start).
    starts: int = 0
    #: Times it failed and was (or will be) restarted.
    restarts: int = 0
    running: bool = False
    #: The last failure, "" once the unit has settled again (or never failed).
    error: str = ""
    #: The delay chosen before the last restart, in seconds.
    last_delay: float = 0.0
    #: Monotonic time of the next start while waiting, else 0.
    restart_at: float = 0.0


class Supervisor:
    """Runs named units under one `kind` ("role" or "loop", which names the metrics and the
    logs); see the module docstring for the rules."""

    def __init__(self, kind: str, *, policy: Policy | None = None) -> None:
        if kind not in ("role", "loop"):
            raise ValueError(f"kind must be 'role' or 'loop', not {kind!r}")
        self.kind = kind
        self.policy = p = policy or Policy()
        self.units: dict[str, Unit] = {}
        self._transient: backoff.Backoff[str] = backoff.Backoff(
            base=p.first, cap=p.ceiling, jitter=p.jitter
        )
        self._permanent: backoff.Backoff[str] = backoff.Backoff(
            base=p.permanent_first, cap=p.permanent_ceiling, jitter=p.jitter
        )

    async def run(self, units: Mapping[str, Start]) -> None:
        """Run every unit until cancelled; never returns or raises on a unit's behalf."""
        for name in units:
            self.units[name] = Unit(name)
        async with asyncio.TaskGroup() as tg:
            for name, start in units.items():
                tg.create_task(self._keep(self.units[name], start), name=f"{self.kind}:{name}")

    def problems(self) -> dict[str, str]:
        """Unit name -> why it is unwell now: waiting to restart, or restarted and not settled."""
        now = time.monotonic()
        out: dict[str, str] = {}
        for u in self.units.values():
            if not u.error:
                continue
            if u.running:
                out[u.name] = f"restarted after failing {u.restarts}x; last error: {u.error}"
            else:
                wait = max(0.0, u.restart_at - now)
                out[u.name] = f"failed {u.restarts}x, restarting in {wait:.1f} s: {u.error}"
        return out

    async def _keep(self, unit: Unit, start: Start) -> None:
        loop = asyncio.get_running_loop()
        while True:
            unit.starts += 1
            unit.running = True
            self._up(unit.name, 1)
            settled = loop.call_later(self.policy.settle, self._settled, unit)
            failure: BaseException | None
            try:
                await start()
                failure = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failure = exc
            finally:
                settled.cancel()
                unit.running = False
                self._up(unit.name, 0)
            await self._backoff(unit, failure)

    async def _backoff(self, unit: Unit, failure: BaseException | None) -> None:
        permanent = isinstance(failure, errors.AgentError) and not failure.transient
        delay = (self._permanent if permanent else self._transient).delay(unit.name)
        unit.restarts += 1
        unit.last_delay = delay
        unit.restart_at = time.monotonic() + delay
        unit.error = _describe(failure)
        self._count(unit.name, failure)
        bug = failure is not None and not isinstance(failure, errors.AgentError)
        level = logging.ERROR if permanent or bug else logging.WARNING
        logger.log(
            level,
            "%s %s failed (%s); restarting it in %.1f s, the others go on",
            self.kind,
            unit.name,
            unit.error,
            delay,
            # outside the error tree: a bug or an unmapped dependency error; keep its traceback
            exc_info=failure if bug else None,
            extra={self.kind: unit.name, "restarts": unit.restarts},
        )
        await asyncio.sleep(delay)
        unit.restart_at = 0.0

    def _settled(self, unit: Unit) -> None:
        if unit.error:
            logger.info("%s %s is running again", self.kind, unit.name)
        unit.error = ""
        self._transient.forget(unit.name)
        self._permanent.forget(unit.name)

    def _up(self, name: str, value: int) -> None:
        gauge = health.ROLE_UP if self.kind == "role" else health.LOOP_UP
        gauge.labels(name).set(value)

    def _count(self, name: str, failure: BaseException | None) -> None:
        if self.kind == "role":
            health.ROLE_RESTARTS.labels(name).inc()
        else:
            error = type(failure).__name__ if failure is not None else "Returned"
            health.LOOP_RESTARTS.labels(name, error).inc()


def _describe(failure: BaseException | None) -> str:
    if failure is None:
        return "it returned, which it never should"
    text = str(failure) or "(no message)"
    return f"{type(failure).__name__}: {text}"
