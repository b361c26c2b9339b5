"""With the DRADeviceTaints gate off, the API server drops device taints from ResourceSlices
(`dropDisabledDRADeviceTaintsFields`): the publisher says so once and withholds unhealthy devices
instead, so no scheduler can allocate a GPU it was told is broken. Proven against a real
kube-apiserver started with only that gate off."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator

import pytest

from agent import settings
from agent.controllers.publishing import NODES, SLICES, Publisher
from agent.devcluster import local
from agent.devcluster.controlplane import ControlPlane
from agent.kube.client import Kube
from agent.kube.watching import Informer
from agent.model import health as healthmodel
from agent.model.fabric import (
    DeviceId,
    DeviceState,
    FabricId,
    Inventory,
    Machine,
    MachineId,
    PoolDevice,
)

pytestmark = pytest.mark.controlplane

DRIVER = "taints-off.cohdi.io"


@pytest.fixture(scope="module")
def taints_off(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    cp = ControlPlane(
        binaries=local.binaries(settings.Settings().cache_dir),
        state_dir=tmp_path_factory.mktemp("taints-off"),
        apiserver_extra_args=["--feature-gates=DRADeviceTaints=false"],
        with_scheduler=False,
    )
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
async def kube_off(taints_off: ControlPlane) -> AsyncIterator[Kube]:
    async with await Kube.connect(kubeconfig=str(taints_off.kubeconfig)) as kube:
        yield kube


async def test_taints_dropped_are_said_once_and_the_device_withheld(
    kube_off: Kube, caplog: pytest.LogCaptureFixture
) -> None:
    slices = Informer(kube_off, SLICES, field_selector=f"spec.driver={DRIVER}")
    nodes = Informer(kube_off, NODES)
    tasks = [asyncio.create_task(slices.run()), asyncio.create_task(nodes.run())]
    try:
        await asyncio.wait_for(slices.synced.wait(), 30)
        await asyncio.wait_for(nodes.synced.wait(), 30)
        publisher = Publisher(kube_off, driver=DRIVER, slices=slices, nodes=nodes)
        f = FabricId("fab0")
        publisher.update_inventory(
            Inventory(
                (Machine(MachineId("m0"), "n0", f, "n0"),),
                tuple(
                    PoolDevice(DeviceId(f"gpu-{i}"), f, "A100", DeviceState.FREE) for i in range(3)
                ),
            )
        )
        sick = healthmodel.Health(healthmodel.Source.NODE, "Xid79", "fell off the bus", added=0)
        publisher.set_taints("gpu-1", healthmodel.taints(sick, evict=False))
        with caplog.at_level(logging.ERROR):
            await publisher.sync()  # the taint is sent and dropped
            assert publisher.taints_supported is False
            await publisher.sync()  # from now on the device is withheld
            publisher.set_taints("gpu-2", healthmodel.taints(sick, evict=False))
            await publisher.sync()
        said = [r for r in caplog.records if "DRADeviceTaints" in r.getMessage()]
        assert len(said) == 1
        stored = (await kube_off.get(SLICES, fieldSelector=f"spec.driver={DRIVER}"))["items"]
        offered = {d["name"] for s in stored for d in s["spec"]["devices"]}
        assert offered == {"gpu-0"}
        assert all("taints" not in d for s in stored for d in s["spec"]["devices"])
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
