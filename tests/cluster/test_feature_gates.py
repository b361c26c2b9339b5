"""If the API server drops the binding-condition fields (feature gates off), the publisher must
not publish silently-broken slices: it fails loudly, naming the gates to turn on. Proven against a
real kube-apiserver started with the gates off."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from agent import settings
from agent.controllers.publishing import NODES, SLICES, FeatureGateOff, Publisher
from agent.devcluster import local
from agent.devcluster.controlplane import ControlPlane
from agent.kube.client import Kube
from agent.kube.watching import Informer
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


@pytest.fixture(scope="module")
def gates_off(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    cp = ControlPlane(
        binaries=local.binaries(settings.Settings().cache_dir),
        state_dir=tmp_path_factory.mktemp("gates-off"),
        apiserver_extra_args=[
            "--feature-gates=DRADeviceBindingConditions=false,DRAPartitionableDevices=false"
        ],
        with_scheduler=False,
    )
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
async def old_kube(gates_off: ControlPlane) -> AsyncIterator[Kube]:
    async with await Kube.connect(kubeconfig=str(gates_off.kubeconfig)) as kube:
        yield kube


async def test_publisher_refuses_an_api_server_without_the_gates(old_kube: Kube) -> None:
    slices = Informer(old_kube, SLICES, field_selector="spec.driver=gates.cohdi.io")
    nodes = Informer(old_kube, NODES)
    publisher = Publisher(old_kube, driver="gates.cohdi.io", slices=slices, nodes=nodes)
    f = FabricId("fab0")
    publisher.update_inventory(
        Inventory(
            (Machine(MachineId("m0"), "n0", f, "n0"),),
            (PoolDevice(DeviceId("gpu-0"), f, "A100", DeviceState.FREE),),
        )
    )
    with pytest.raises(FeatureGateOff) as info:
        await publisher.sync()
    text = str(info.value)
    assert "DRADeviceBindingConditions" in text
    assert "perDeviceNodeSelection" in text or "bindsToNode" in text
