"""The whole product, as the demo runs it but smaller: real control plane, fabric emulator,
simulated GPU servers each running `cohdi-agent run --roles node` (real node role, synthetic
sysfs, stub NVML), one `cohdi-agent run --roles cluster` process, pods prepared through each
node's DRA plugin socket. Every pod bound with its CDI file on its node; pods gone → devices
detached after the idle grace; fabric, API server and node checkpoints agree throughout."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest

from agent import settings
from agent.demo import consistency
from agent.demo import world as worlds
from agent.demo.workload import Workload
from agent.devcluster.controlplane import ControlPlane
from agent.model.fabric import DeviceState
from tests.waiting import until

pytestmark = pytest.mark.controlplane


@pytest.mark.parametrize("backend", ["redfish", "fti"])
async def test_full_stack(control_plane: ControlPlane, tmp_path: Path, backend: str) -> None:
    driver = f"fs{int(time.time()) % 100000}{backend[0]}.cohdi.io"
    cfg = settings.Settings(
        cluster=settings.ClusterSettings(driver=driver),
        kube=settings.KubeSettings(kubeconfig=str(control_plane.kubeconfig)),
        fabric=settings.FabricSettings(backend=backend),
    )
    world = await worlds.start(
        cfg,
        workdir=Path("/tmp") / f"fs-{driver[:7]}",
        nodes=2,
        gpus=4,
        attach_latency=0.1,
        idle_grace=2.0,
        kubeconfig=str(control_plane.kubeconfig),
        progress=lambda _m: None,
    )
    workload = Workload(world, lifetime=(3.0, 3.0))
    try:
        await workload.start()
        names = [f"{driver[:7]}-{i}" for i in range(4)]
        await asyncio.gather(
            *(workload.submit(n, worlds.MODELS[i % 2]) for i, n in enumerate(names))
        )

        async def all_running() -> bool:
            return all(workload.records[n].prepared for n in names)

        await until(all_running, what="every pod bound and prepared", timeout=120)
        for n in names:
            rec = workload.records[n]
            assert not rec.error
            assert rec.allocated <= rec.ready <= rec.bound <= rec.prepared
            (cdi_file,) = [
                p
                for p in world.cdi_dir(rec.node).iterdir()
                if p.name.endswith(".json")
                and json.loads(p.read_text())["devices"][0]["name"].endswith(rec.device)
                and any(i.startswith(f"{driver}/gpu=") for i in rec.cdi_ids)
            ]
            spec = json.loads(cdi_file.read_text())
            assert spec["kind"] == f"{driver}/gpu"
            assert [f"{spec['kind']}={d['name']}" for d in spec["devices"]] == rec.cdi_ids
        rows, problems = await consistency.check(world)
        assert problems == [], consistency.table(rows)
        assert sum(r.fabric.startswith("attached") for r in rows) == 4
        assert all(r.prepared != "-" for r in rows if r.fabric.startswith("attached"))

        async def all_done_and_detached() -> bool:
            return all(workload.records[n].finished for n in names) and all(
                d.state == DeviceState.FREE for d in world.emulator.state.devices.values()
            )

        await until(all_done_and_detached, what="pods finished and devices detached", timeout=90)

        async def offered_again() -> bool:  # the publisher re-offers detached devices (coalesced)
            rows, _ = await consistency.check(world)
            return all(r.slice.startswith("free") for r in rows)  # FTI: "free (a slot)"

        await until(offered_again, what="detached devices offered free again", timeout=10)
        rows, problems = await consistency.check(world)
        assert problems == [], consistency.table(rows)
        assert all(
            r.fabric == "free" and r.prepared == "-" and r.slice.startswith("free") for r in rows
        ), consistency.table(rows)
        for n in world.nodes:
            assert [p for p in world.cdi_dir(n).iterdir() if p.suffix == ".json"] == []
            assert list((world.node_dir(n) / "sys" / "bus" / "pci" / "devices").iterdir()) == []
    finally:
        await workload.close()
        await worlds.stop(world)
        shutil.rmtree(world.workdir, ignore_errors=True)
