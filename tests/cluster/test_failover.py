"""Two `cohdi-agent run` processes; the leader is killed (SIGKILL, no goodbye) in the middle of a
burst. The other takes the Lease and finishes: every pod bound, no device attached twice, none
leaked (the emulator's state is the judge)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.devcluster.controlplane import ControlPlane
from agent.kube.resources import RESOURCES
from agent.model import claims as claimmodel
from agent.model.fabric import DeviceState
from agent.model.objects import attached_device, fabric_device
from agent.model.pool import device_name
from tests.cluster.conftest import BACKENDS, CLAIMS, PASSWORD, World, backend_args
from tests.cluster.test_scale_up import bound_pods
from tests.waiting import until

pytestmark = [
    pytest.mark.controlplane,
    pytest.mark.parametrize("backend", BACKENDS, indirect=True),
]


def agent(world: World, cp: ControlPlane, log: Path) -> subprocess.Popen[bytes]:
    args = [
        sys.executable,
        "-m",
        "agent",
        "run",
        "--kubeconfig",
        str(cp.kubeconfig),
        "--driver",
        world.driver,
        "--lease-name",
        f"lease-{world.suffix}",
        "--lease-duration",
        "3",
        "--lease-renew-deadline",
        "2",
        "--lease-retry-period",
        "0.25",
        "--fabric-url",
        world.emulator.url,
        "--fabric-user",
        "admin",
        "--fabric-ca-bundle",
        str(world.emulator.ca_file),
        "--fabric-poll-interval",
        "0.5",
        *backend_args(world.backend),
        "--log-format",
        "json",
    ]
    with log.open("wb") as out:
        return subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COHDI_FABRIC_PASSWORD": PASSWORD},
        )


@pytest.mark.parametrize("world", [{"nodes": 4, "gpus": 16, "latency": 0.3}], indirect=True)
async def test_leader_killed_mid_burst(
    world: World, control_plane: ControlPlane, tmp_path: Path
) -> None:
    procs = [agent(world, control_plane, tmp_path / f"agent-{i}.log") for i in range(2)]
    try:
        lease_path = (
            f"/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/lease-{world.suffix}"
        )

        async def holder() -> str | None:
            try:
                return (await world.kube.get(lease_path))["spec"].get("holderIdentity") or None
            except Exception:
                return None

        first = await until(holder, what="a leader", timeout=30)
        leader = next(p for p in procs if first.endswith(f"_{p.pid}"))
        names = [f"p{world.suffix}-{i:02d}" for i in range(12)]
        await asyncio.gather(*(world.claim_and_pod(n) for n in names))

        async def some_attaching() -> bool:
            ours = [
                o
                for o in (await world.kube.get(RESOURCES))["items"]
                if o["spec"]["target_node"] in world.nodes
            ]
            return len(ours) >= 4

        await until(some_attaching, what="the burst under way", timeout=60)
        leader.send_signal(signal.SIGKILL)
        leader.wait()

        async def new_holder() -> str | None:
            h = await holder()
            return h if h and h != first else None

        await until(new_holder, what="the other agent to take the Lease", timeout=30)
        placed = await until(lambda: bound_pods(world, names), what="all pods bound", timeout=120)
        assert len(placed) == 12

        # the GPU behind each published name (for an anonymous slot: the one that arrived)
        behind = {
            device_name(fabric_device(o)): attached_device(o)
            for o in (await world.kube.get(RESOURCES))["items"]
            if o["spec"]["target_node"] in world.nodes
        }
        held = set()
        for n in names:
            (b,) = claimmodel.bindings(await world.kube.get(f"{CLAIMS}/{n}"), world.driver)
            assert b.ready
            held.add(behind[b.device])
        attached = {
            d.spec.id for d in world.emulator.state.devices.values() if d.state != DeviceState.FREE
        }
        assert attached == held, "every attached device is held by a claim, and vice versa"
        assert len(held) == 12, "no GPU held by two claims"
        assert world.emulator.state.attach_started == 12, "no device was attached twice"
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    logs = "\n".join((tmp_path / f"agent-{i}.log").read_text() for i in range(2))
    assert PASSWORD not in logs
