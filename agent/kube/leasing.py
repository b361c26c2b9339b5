"""Leader election on a coordination.k8s.io/v1 Lease, with a monotonic clock.

The rules that make "at no instant do two replicas act" hold:

- A candidate takes a Lease held by someone else only after it has *observed the same record* for
  a full `lease_duration` on its own monotonic clock (wall clocks of different machines never
  meet), or when the holder released it (empty holderIdentity).
- The leader counts its deadline from the moment it *sent* its last successful write of the Lease
  — every one alike: creating it, taking it over, renewing it, or taking back the Lease that still
  names us after an outage — and cancels its work (and waits for the work to finish) once
  `renew_deadline` has passed without another. Any in-flight renewal is cut off at that deadline
  too, and an acquisition attempt is cut off after `renew_deadline`, so a term never starts with
  its deadline already behind it. Since renew_deadline is below lease_duration, the old leader has
  stopped before a candidate may start.
- Updates carry the resourceVersion they read, so two candidates racing for a free Lease cannot both
  win: the loser gets 409 and tries again later.
- On shutdown the leader cancels its work, then releases the Lease (empty holder, duration 1 s), so
  a successor takes over at its next retry instead of after a full lease_duration.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from agent import errors
from agent.backoff import FailureStreak, describe
from agent.kube.client import Kube, Obj, path_of

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


def _micro_time() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Campaign for one Lease; run `lead()` only while holding it."""

    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float,
        renew_deadline: float,
        retry_period: float,
        release_on_cancel: bool = True,
        clock: Clock = time.monotonic,
    ) -> None:
        if not retry_period < renew_deadline < lease_duration:
            raise errors.ConfigError(
                "--lease-retry-period < --lease-renew-deadline < --lease-duration",
                (retry_period, renew_deadline, lease_duration),
                "the three periods must be strictly increasing",
            )
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.release_on_cancel = release_on_cancel
        self._clock = clock
        self._path = path_of(
            group="coordination.k8s.io", version="v1", plural="leases", namespace=namespace
        )
        self._observed_spec: dict[str, Any] | None = None
        self._observed_at = 0.0
        self._lease: Obj | None = None
        #: When the last successful write of the Lease (any kind) was sent; the term ends at
        #: `_written_at + renew_deadline` unless another write succeeds.
        self._written_at = 0.0
        #: The last read showed another holder: if we thought we led, we do not any more.
        self._taken_by_other = False
        self._outage = FailureStreak(clock)
        self.is_leader = False
        #: Who the last answer from the API server named as holder ("" for a free Lease); None
        #: before the first answer. Status lines read it.
        self.holder: str | None = None
        #: Set while leading; tests and health checks read it.
        self.leading = asyncio.Event()

    async def run(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Campaign forever. While leader, `lead()` runs; it is cancelled when the Lease is lost
        (and we campaign again) or when `run` itself is cancelled (and we release the Lease).
        If `lead()` returns or raises on its own, we release the Lease and return/raise too."""
        while True:
            await self._acquire()
            await self._lead(lead)

    async def _acquire(self) -> None:
        """Return once we hold the Lease with a term that has not yet run out."""
        while True:
            try:
                async with asyncio.timeout(self.renew_deadline):
                    acquired = await self._try_acquire_or_renew()
            except (TimeoutError, errors.AgentError) as exc:
                self._campaign_failed(exc)
            else:
                took = self._outage.succeed()
                if took is not None:
                    logger.info(
                        "lease %s/%s: the API server answers again after %.1f s",
                        self.namespace,
                        self.name,
                        took,
                    )
                if acquired:
                    logger.info(
                        "became leader", extra={"lease": self.name, "identity": self.identity}
                    )
                    return
            await asyncio.sleep(self.retry_period)

    def _campaign_failed(self, exc: BaseException) -> None:
        """One line when the failures start (or change kind), DEBUG while they repeat."""
        loud = self._outage.fail(exc)
        logger.log(
            logging.WARNING if loud else logging.DEBUG,
            "cannot acquire lease %s/%s: %s%s",
            self.namespace,
            self.name,
            describe(exc, timeout=self.renew_deadline),
            f"; retrying every {self.retry_period:g} s" if loud else "",
        )

    async def _lead(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.is_leader = True
        self.leading.set()
        work = asyncio.create_task(lead(), name=f"leader-work:{self.name}")
        try:
            while True:
                deadline = self._written_at + self.renew_deadline
                # Renew every retry period, and never later than the deadline itself.
                pause = max(0.0, min(self.retry_period, deadline - self._clock()))
                sleeper = asyncio.create_task(asyncio.sleep(pause))
                done, _ = await asyncio.wait({work, sleeper}, return_when=asyncio.FIRST_COMPLETED)
                if work in done:
                    sleeper.cancel()
                    await self._release()
                    work.result()  # propagate the work's exception, if any
                    return
                limit = max(0.0, deadline - self._clock())
                try:
                    async with asyncio.timeout(limit):
                        renewed = await self._try_acquire_or_renew()
                except (TimeoutError, errors.AgentError) as exc:
                    logger.warning("lease renewal failed: %s", describe(exc, timeout=limit))
                    renewed = False
                if not renewed and (self._taken_by_other or self._clock() >= deadline):
                    logger.error(
                        "lost leadership (%s); stopping the cluster role",
                        "the Lease has another holder"
                        if self._taken_by_other
                        else f"no renewal for {self.renew_deadline:.1f} s",
                        extra={"lease": self.name, "identity": self.identity},
                    )
                    await _cancel_and_wait(work)
                    return
        except asyncio.CancelledError:
            await _cancel_and_wait(work)
            if self.release_on_cancel:
                await asyncio.shield(self._release())
            raise
        finally:
            self.is_leader = False
            self.leading.clear()

    async def _try_acquire_or_renew(self) -> bool:
        """One attempt to create, take over or renew the Lease. True when our write succeeded;
        then `_written_at` is the moment the attempt started (before its first request), which
        is no later than the renewTime the server stored, whoever held the Lease before."""
        sent = self._clock()
        try:
            lease = await self.kube.get(f"{self._path}/{self.name}")
        except errors.KubeNotFound:
            self._taken_by_other = False
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(transitions=0, acquire=True),
            }
            try:
                self._remember(await self.kube.create(self._path, body), sent)
            except errors.KubeAlreadyExists:
                self.holder = (
                    ""  # someone created it meanwhile: an answer, the next read names them
                )
                return False
            # (a create refused otherwise, e.g. a namespace that does not exist, is no answer)
            return True
        spec = lease.get("spec", {})
        if spec != self._observed_spec:
            self._observed_spec = spec
            self._observed_at = self._clock()
        holder = self.holder = spec.get("holderIdentity") or ""
        ours = holder == self.identity
        self._taken_by_other = bool(holder) and not ours
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        if holder and not ours and self._clock() < self._observed_at + duration:
            return False  # held by someone else, and not yet expired by our own clock
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if ours else 1)
        lease["spec"] = {**spec, **self._spec(transitions=transitions, acquire=not ours)}
        try:
            self._remember(await self.kube.replace(f"{self._path}/{self.name}", lease), sent)
        except errors.KubeConflict:
            return False
        return True

    def _spec(self, *, transitions: int, acquire: bool) -> dict[str, Any]:
        now = _micro_time()
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease_duration)),
            "renewTime": now,
            "leaseTransitions": transitions,
        }
        if acquire:
            spec["acquireTime"] = now
        return spec

    def _remember(self, lease: Obj, sent: float) -> None:
        """Our write of `lease`, sent at `sent`, succeeded: a new (or longer) term."""
        self._lease = lease
        self._observed_spec = lease.get("spec", {})
        self.holder = self.identity
        self._observed_at = sent
        self._written_at = sent

    async def _release(self) -> None:
        """Hand the Lease back so a successor need not wait out the lease duration."""
        if self._lease is None:
            return
        try:
            async with asyncio.timeout(self.renew_deadline):
                await self._hand_back()
        except TimeoutError:
            logger.warning(
                "could not release lease %s: no answer within %.1f s (it expires by itself)",
                self.name,
                self.renew_deadline,
            )
        except errors.AgentError as exc:
            logger.warning(
                "could not release lease %s: %s (it expires by itself)", self.name, describe(exc)
            )

    async def _hand_back(self) -> None:
        lease = await self.kube.get(f"{self._path}/{self.name}")
        if lease.get("spec", {}).get("holderIdentity") != self.identity:
            return
        lease["spec"] = {
            **lease["spec"],
            "holderIdentity": "",
            "leaseDurationSeconds": 1,
            "renewTime": _micro_time(),
        }
        await self.kube.replace(f"{self._path}/{self.name}", lease)
        logger.info("released lease", extra={"lease": self.name, "identity": self.identity})


async def _cancel_and_wait(task: asyncio.Task[Any]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:
        logger.exception("leader work failed while being stopped")
