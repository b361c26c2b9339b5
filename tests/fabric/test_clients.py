"""Both fabric clients against the emulator over real HTTPS on loopback: reads, attach/detach,
idempotency, and the emulator's own state checked after every operation."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import errors
from agent.fabric.emulator.server import EmulatorServer, make_tls
from agent.fabric.protocol import FabricManager
from agent.model.fabric import DeviceId, DeviceState, MachineId
from tests.fabric.conftest import A100, make_client


def attached(server: EmulatorServer) -> dict[str, str | None]:
    """device -> machine, for every device that is not free (the emulator's truth)."""
    return {
        d.spec.id: d.machine for d in server.state.devices.values() if d.state != DeviceState.FREE
    }


async def free_a100(client: FabricManager) -> DeviceId:
    inv = await client.inventory()
    return next(d.id for d in inv.devices if d.model == A100 and d.state == DeviceState.FREE)


async def test_inventory_lists_machines_and_free_devices(client: FabricManager) -> None:
    inv = await client.inventory()
    assert {m.id for m in inv.machines} == {"m-node-0", "m-node-1"}
    assert {m.name for m in inv.machines} == {"node-0", "node-1"}
    assert all(m.fabric for m in inv.machines)
    assert len(inv.devices) == 4
    assert {d.state for d in inv.devices} == {DeviceState.FREE}
    assert sorted(d.model for d in inv.devices) == [
        A100,
        A100,
        "NVIDIA-H100-PCIE-80GB",
        "NVIDIA-H100-PCIE-80GB",
    ]
    assert inv.version


async def test_attach_detach_round_trip_is_idempotent(
    client: FabricManager, emulator: EmulatorServer
) -> None:
    slot = await free_a100(client)
    dev = await client.attach(slot, MachineId("m-node-1"), model=A100)
    assert dev.state == DeviceState.ATTACHED
    assert dev.machine == "m-node-1"
    assert dev.model == A100
    assert dev.pci_address.startswith("0000:")
    assert dev.gpu_uuid.startswith("GPU-")
    assert attached(emulator) == {dev.id: "m-node-1"}

    again = await client.attach(dev.id, MachineId("m-node-1"), model=A100)
    assert again.id == dev.id
    assert emulator.state.attach_started == 1, "a repeated attach must not attach again"

    inv = await client.inventory()
    listed = inv.device(dev.id)
    assert listed is not None
    assert listed.state == DeviceState.ATTACHED
    assert listed.machine == "m-node-1"

    gone = await client.detach(dev.id)
    assert gone.state == DeviceState.FREE
    assert attached(emulator) == {}
    assert (await client.detach(dev.id)).state == DeviceState.FREE  # detaching a free device: no-op
    assert attached(emulator) == {}


async def test_attached_elsewhere_is_refused_and_changes_nothing(
    client: FabricManager, emulator: EmulatorServer
) -> None:
    slot = await free_a100(client)
    dev = await client.attach(slot, MachineId("m-node-0"), model=A100)
    with pytest.raises(errors.DeviceBusy, match="m-node-0"):
        await client.attach(dev.id, MachineId("m-node-1"), model=A100)
    assert attached(emulator) == {dev.id: "m-node-0"}


async def test_unknown_device_and_machine(client: FabricManager, emulator: EmulatorServer) -> None:
    with pytest.raises(errors.DeviceNotFound):
        await client.attach(DeviceId("no-such-gpu"), MachineId("m-node-0"), model=A100)
    slot = await free_a100(client)
    with pytest.raises(errors.DeviceNotFound):
        await client.attach(slot, MachineId("no-such-machine"), model=A100)
    assert attached(emulator) == {}


async def test_slow_attach_follows_the_fabric_to_the_end(
    client: FabricManager, emulator: EmulatorServer
) -> None:
    slot = await free_a100(client)
    for dev in emulator.state.devices.values():
        object.__setattr__(dev.spec, "attach_latency", 0.3)
    result = await client.attach(slot, MachineId("m-node-0"), model=A100)
    assert result.state == DeviceState.ATTACHED
    assert emulator.state.tasks, "the slow attach went through a task"
    assert all(t.state == "Completed" for t in emulator.state.tasks.values())
    assert attached(emulator) == {result.id: "m-node-0"}


async def test_https_with_the_wrong_ca_is_refused(emulator: EmulatorServer, tmp_path: Path) -> None:
    _, other_ca = make_tls(tmp_path / "other")
    for backend in ("redfish", "fti"):
        fabric = make_client(emulator, backend, ca=other_ca, retries=1)
        try:
            with pytest.raises(errors.FabricRejected, match="not trusted"):
                await fabric.inventory()
        finally:
            await fabric.close()


async def test_wrong_password_is_a_permanent_auth_error(emulator: EmulatorServer) -> None:
    for backend in ("redfish", "fti"):
        fabric = make_client(emulator, backend, password="wrong-password")
        try:
            with pytest.raises(errors.FabricAuthError, match="admin"):
                await fabric.inventory()
        finally:
            await fabric.close()
