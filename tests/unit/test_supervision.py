"""Supervision, fast (no control plane): a loop or a role that fails is logged, counted and
restarted with backoff while its siblings go on; permanent errors are retried slowly with their
reason visible; only cancellation stops everything, and every unit's clean-up runs.

Before the fix every loop of the cluster role ran in one TaskGroup and both roles in another: the
first exception of any of them ended all of them (and the process, with exit status 1)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from agent import app, errors, health, settings
from agent.controllers import running
from agent.controllers.queueing import KeyedQueue
from agent.devcluster.controlplane import free_port
from agent.fabric.link import FabricLink
from agent.model.fabric import (
    DeviceId,
    DeviceState,
    FabricId,
    Inventory,
    Machine,
    MachineId,
    PoolDevice,
)
from agent.supervision import Policy, Supervisor
from agent.testing.fakekube import FakeKube
from tests.waiting import until

FAST = Policy(
    first=0.01, ceiling=0.04, permanent_first=0.2, permanent_ceiling=0.4, settle=0.1, jitter=0
)


async def wait_for(predicate: Callable[[], object], what: str) -> None:
    async def probe() -> object:
        return predicate()

    await until(probe, what=what, timeout=10, interval=0.005)


def sample(metric: str, **labels: str) -> float:
    value = health.REGISTRY.get_sample_value(metric, labels)
    return value or 0.0


@contextlib.asynccontextmanager
async def running_task(coro: Awaitable[None]) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.ensure_future(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_crashing_loop_is_restarted_with_backoff_and_the_others_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.supervision")
    sup = Supervisor("loop", policy=FAST)
    delays: list[float] = []
    steady_cleanups = 0
    before = sample("cohdi_loop_restarts_total", loop="t-crashy", error="KubeUnavailable")

    async def crashy() -> None:
        delays.append(sup.units["t-crashy"].last_delay)
        await asyncio.sleep(0)
        raise errors.KubeUnavailable("the API server timed out")

    async def steady() -> None:
        nonlocal steady_cleanups
        try:
            await asyncio.Event().wait()
        finally:
            steady_cleanups += 1

    async with running_task(sup.run({"t-crashy": crashy, "t-steady": steady})) as task:
        await wait_for(lambda: len(delays) >= 5, "five starts of the crashing loop")
        assert delays[:5] == [0.0, 0.01, 0.02, 0.04, 0.04]  # the backoff, capped
        steady_unit = sup.units["t-steady"]
        assert (steady_unit.starts, steady_unit.running) == (1, True)
        assert sample("cohdi_loop_up", loop="t-steady") == 1
        crashy_unit = sup.units["t-crashy"]
        assert crashy_unit.restarts >= 4
        assert (
            sample("cohdi_loop_restarts_total", loop="t-crashy", error="KubeUnavailable") - before
            == crashy_unit.restarts
        )
        problem = sup.problems()["t-crashy"]
        assert "KubeUnavailable: the API server timed out" in problem
        assert "t-steady" not in sup.problems()
        print(f"\nrestarts {crashy_unit.restarts}, delays {delays[:5]}, problem: {problem}")
    assert task.cancelled()
    assert steady_cleanups == 1, "cancelling the supervisor runs every unit's clean-up"
    logged = [r for r in caplog.records if "t-crashy failed" in r.getMessage()]
    assert logged
    assert logged[0].levelno == logging.WARNING  # transient: a warning, no traceback
    assert logged[0].exc_info is None


async def test_a_bug_is_logged_with_its_traceback_and_a_returning_loop_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sup = Supervisor("loop", policy=FAST)
    runs = {"t-bug": 0, "t-returns": 0}

    async def bug() -> None:
        runs["t-bug"] += 1
        raise KeyError("ResourceBlocks")

    async def returns() -> None:
        runs["t-returns"] += 1

    async with running_task(sup.run({"t-bug": bug, "t-returns": returns})):
        await wait_for(lambda: min(runs.values()) >= 3, "both restarted")
    (first, *_) = [r for r in caplog.records if "t-bug failed" in r.getMessage()]
    assert first.levelno == logging.ERROR
    assert first.exc_info is not None
    assert sample("cohdi_loop_restarts_total", loop="t-bug", error="KeyError") >= 2
    assert sample("cohdi_loop_restarts_total", loop="t-returns", error="Returned") >= 2


async def test_a_permanent_error_is_retried_slowly_and_shown_until_fixed() -> None:
    policy = Policy(first=0.001, permanent_first=0.2, permanent_ceiling=1.0, settle=0.1, jitter=0)
    sup = Supervisor("loop", policy=policy)
    broken = True
    breaks_again = asyncio.Event()
    starts = 0

    async def publisher() -> None:
        nonlocal starts
        starts += 1
        if broken:
            raise errors.KubeForbidden("resourceslices is forbidden for user cohdi")
        await breaks_again.wait()
        raise errors.KubeForbidden("forbidden again")

    async with running_task(sup.run({"t-publisher": publisher})):
        await wait_for(lambda: starts == 1 and sup.problems(), "the first failure")
        unit = sup.units["t-publisher"]
        assert unit.last_delay == 0.2, "permanent: the slow backoff, not the transient one"
        assert "forbidden" in sup.problems()["t-publisher"]
        broken = False  # an operator fixes the ClusterRole
        await wait_for(lambda: starts == 2, "the slow retry")
        await wait_for(lambda: not sup.problems(), "the loop settled")
        assert unit.error == ""
        breaks_again.set()
        await wait_for(lambda: unit.restarts == 2, "the second failure")
        assert unit.last_delay == 0.2, "settling reset the backoff (else 0.4)"


# --- roles ---------------------------------------------------------------------------------------


class FakeRole:
    """A role that fails `failures` times (with `error`), then runs until cancelled."""

    def __init__(self, failures: int = 0, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or errors.KubeUnavailable("boom")
        self.starts = 0
        self.stopped = 0
        self.ready_reasons: list[str] = []

    async def run(self) -> None:
        self.starts += 1
        try:
            if self.starts <= self.failures:
                raise self.error
            await asyncio.Event().wait()
        finally:
            self.stopped += 1

    def not_ready(self) -> list[str]:
        return self.ready_reasons


async def get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, await resp.text()


async def test_a_failing_role_does_not_stop_the_other_and_shows_in_readyz() -> None:
    port = free_port()
    cfg = settings.Settings(cluster=settings.ClusterSettings(metrics_port=port))
    node = FakeRole()
    cluster = FakeRole(
        failures=1000, error=errors.CheckpointError("checkpoint.json: checksum mismatch")
    )
    board = health.Health()
    before = sample("cohdi_role_restarts_total", role="cluster")
    policy = Policy(first=0.01, permanent_first=0.05, permanent_ceiling=0.05, jitter=0)
    roles: dict[str, Any] = {"node": node, "cluster": cluster}
    async with running_task(app.run_roles(roles, board, cfg, policy=policy)) as task:
        await wait_for(lambda: cluster.starts >= 3, "the failing role restarted")
        assert (node.starts, node.stopped) == (1, 0), "the other role was never stopped"
        assert sample("cohdi_role_up", role="node") == 1
        assert sample("cohdi_role_restarts_total", role="cluster") - before >= 2
        status, body = await get(port, "/readyz")
        print(f"\n/readyz {status}:\n{body}")
        assert status == 503
        assert "[+]node ok" in body
        assert "[-]cluster: failed" in body
        assert "CheckpointError: checkpoint.json: checksum mismatch" in body
        assert await get(port, "/healthz") == (200, "ok\n")
        status, metrics = await get(port, "/metrics")
        assert 'cohdi_role_restarts_total{role="cluster"}' in metrics

        node.ready_reasons = ["first PCI scan not done"]
        _, body = await get(port, "/readyz")
        assert "[-]node: first PCI scan not done" in body
    assert task.cancelled()
    assert node.stopped == 1, "SIGTERM (cancellation) stops every role, with its clean-up"
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(port, "/healthz")  # the endpoints go with the process's roles


async def test_readyz_is_200_when_every_role_is_ready() -> None:
    port = free_port()
    cfg = settings.Settings(cluster=settings.ClusterSettings(metrics_port=port))
    board = health.Health()
    roles: dict[str, Any] = {"node": FakeRole(), "cluster": FakeRole(failures=1)}
    policy = Policy(first=0.01, settle=0.05, jitter=0)
    async with running_task(app.run_roles(roles, board, cfg, policy=policy)):

        async def ready() -> bool:
            try:
                return (await get(port, "/readyz"))[0] == 200
            except aiohttp.ClientConnectionError:
                return False  # not listening yet

        await until(ready, what="/readyz 200 once the restarted role settled", timeout=10)
        _, body = await get(port, "/readyz")
        assert body == "[+]cluster ok\n[+]node ok\nreadyz check passed\n"


# --- the cluster role's own loops ----------------------------------------------------------------


class CrashOnceFabric:
    """An in-memory fabric whose first watch dies of a bug (as a malformed answer once did)."""

    backend = "fake"

    def __init__(self) -> None:
        self.link = FabricLink("fake://fabric")
        f = FabricId("fab")
        self.inv = Inventory(
            (Machine(MachineId("m-n0"), "n0", f, "n0"),),
            tuple(PoolDevice(DeviceId(f"gpu-{i}"), f, "A100", DeviceState.FREE) for i in range(3)),
        )
        self.watches = 0

    async def inventory(self) -> Inventory:
        return self.inv

    async def watch(self) -> AsyncIterator[Inventory]:
        self.watches += 1
        if self.watches == 1:
            raise KeyError("Members")
        self.link.reached()
        yield self.inv
        await asyncio.Event().wait()

    async def attach(self, *_a: Any, **_k: Any) -> PoolDevice:
        raise NotImplementedError

    async def detach(self, *_a: Any) -> PoolDevice:
        raise NotImplementedError

    async def close(self) -> None:
        return None


async def test_a_cluster_role_loop_that_crashes_is_restarted_and_the_role_publishes() -> None:
    kube = FakeKube(bookmark_interval=60)
    kube.add("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n0"}})
    fabric = CrashOnceFabric()
    cfg = settings.Settings(cluster=settings.ClusterSettings(driver="sup.cohdi.io"))
    role = running.build(kube, fabric, cfg, identity="t", policy=FAST)  # type: ignore[arg-type]
    async with running_task(role.run()) as task:

        def published() -> int:
            return sum(
                len(s["spec"].get("devices") or [])
                for s in kube.objects("resourceslices")
                if s["spec"]["driver"] == "sup.cohdi.io"
            )

        await wait_for(lambda: published() == 3, "the pool published after the restart")
        units = role.supervisor.units
        assert units["fabric-watch"].restarts == 1
        others = {n: u.starts for n, u in units.items() if n != "fabric-watch"}
        assert set(others.values()) == {1}, f"no other loop was restarted: {others}"
        assert not task.done()
        await wait_for(lambda: not role.not_ready(), "the leader ready")
    assert sample("cohdi_loop_up", loop="fabric-watch") == 0


async def test_a_work_queue_stopped_mid_handle_handles_the_key_again_when_restarted() -> None:
    """A restarted controller loop resumes its queue: the key whose handler was cut off is not
    lost until its object's next event."""
    release = asyncio.Event()
    handled: list[str] = []

    async def handle(key: str) -> None:
        handled.append(key)
        await release.wait()

    queue: KeyedQueue[str] = KeyedQueue("t-queue", handle, workers=2)
    queue.enqueue("claim-a")
    async with running_task(queue.run()):
        await wait_for(lambda: handled == ["claim-a"], "the key being handled")
    release.set()
    async with running_task(queue.run()):
        await wait_for(lambda: handled == ["claim-a", "claim-a"], "the key handled again")
