"""A cluster role that can never lead but says it is ready, found by trying to break issue 10's
"a role's fatal error ... shows in /readyz". It failed before its fix and now guards it.

Seen with a real process at 1ba0002: `cohdi-agent run --roles node,cluster --lease-namespace nope
...` → 'cannot acquire lease nope/brk-nl: KubeNotFound: POST .../namespaces/nope/leases: 404
NotFound: namespaces "nope" not found; retrying every 2 s', and `/readyz` answers
`[+]cluster ok ... readyz check passed` for as long as it runs. The same holds for a Lease the
agent's RBAC does not allow (403): every replica is "ready", none ever acts. (`serving()`, what
systemd's READY=1 waits for, does require an answer naming a holder; `not_ready()`, what /readyz
shows, does not.)
"""

from __future__ import annotations

import asyncio

import pytest

from agent import app, settings
from agent.testing.fakekube import FakeKube

LEASES = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases"


@pytest.mark.parametrize("status", [403, 404])
async def test_a_cluster_role_that_cannot_reach_its_lease_is_not_ready(status: int) -> None:
    kube = FakeKube(bookmark_interval=60)
    kube.fail("*", LEASES, status=status, times=10_000)
    cfg = settings.Settings(
        cluster=settings.ClusterSettings(driver="fake.cohdi.io"),
        leader=settings.LeaderSettings(duration=2, renew_deadline=1.5, retry_period=0.1),
    )
    role = app._ClusterRole(kube, cfg, fabric=None)  # type: ignore[arg-type]
    task = asyncio.create_task(role.run())
    try:
        await asyncio.sleep(1.0)  # ten refused campaign rounds
        assert not task.done()
        assert role.campaigning
        assert role.elector is not None
        assert not role.elector.is_leader
        assert role.elector.holder is None  # no answer naming a holder: every request refused
        assert role.not_ready(), "it can never lead, yet /readyz would say ok"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
