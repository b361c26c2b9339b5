"""Faults between the clients and the fabric: each gives a typed error whose message says what
happened, transient ones are retried, and no half-state is left in the emulator."""

from __future__ import annotations

import asyncio

import pytest

from agent import errors
from agent.fabric.emulator.server import EmulatorServer
from agent.model.fabric import DeviceState, MachineId
from tests.fabric.conftest import A100, admin, make_client, until
from tests.fabric.test_clients import attached, free_a100

BACKENDS = ["redfish", "fti"]


def states(server: EmulatorServer) -> dict[str, str]:
    return {d.spec.id: d.state.value for d in server.state.devices.values()}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_fabric_down(emulator: EmulatorServer, backend: str) -> None:
    fabric = make_client(emulator, backend, retries=2)
    await emulator.stop()
    try:
        with pytest.raises(
            errors.FabricUnavailable, match="cannot reach the fabric manager"
        ) as info:
            await fabric.inventory()
        assert info.value.transient
    finally:
        await fabric.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_5xx_is_retried_then_surfaced(emulator: EmulatorServer, backend: str) -> None:
    fabric = make_client(emulator, backend, retries=3)
    try:
        await admin(emulator, "PUT", "/faults", {"unavailable_next": 2})
        inv = await fabric.inventory()  # two 503s, then it works
        assert len(inv.devices) == 4
        await admin(emulator, "PUT", "/faults", {"unavailable_next": 1000})
        with pytest.raises(errors.FabricUnavailable, match="503"):
            await fabric.inventory()
        await admin(emulator, "PUT", "/faults", {"unavailable_next": 0})
    finally:
        await fabric.close()
    assert set(states(emulator).values()) == {"free"}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_timeout(emulator: EmulatorServer, backend: str) -> None:
    fabric = make_client(emulator, backend, timeout=0.3, retries=2)
    try:
        await admin(emulator, "PUT", "/faults", {"delay": 1.0})
        with pytest.raises(
            errors.FabricTimeout, match=r"no answer from the fabric manager within 0\.3 s"
        ):
            await fabric.inventory()
    finally:
        await admin(emulator, "PUT", "/faults", {"delay": 0.0})
        await fabric.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_garbage_json(emulator: EmulatorServer, backend: str) -> None:
    fabric = make_client(emulator, backend, retries=2)
    try:
        await fabric.inventory()  # logged in
        await admin(emulator, "PUT", "/faults", {"garbage_next": 1000})
        with pytest.raises(errors.FabricProtocolError, match="not JSON: '<html>"):
            await fabric.inventory()
    finally:
        await admin(emulator, "PUT", "/faults", {"garbage_next": 0})
        await fabric.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_transient_errors_during_attach_leave_exactly_one_attachment(
    emulator: EmulatorServer, backend: str
) -> None:
    """503s sprinkled over an attach: the client re-reads instead of resending blindly."""
    fabric = make_client(emulator, backend, retries=6)
    try:
        slot = await free_a100(fabric)
        await admin(emulator, "PUT", "/faults", {"error_rate": 0.3})
        dev = await fabric.attach(slot, MachineId("m-node-0"), model=A100)
        await admin(emulator, "PUT", "/faults", {"error_rate": 0.0})
        assert attached(emulator) == {dev.id: "m-node-0"}
        assert emulator.state.attach_started == 1
    finally:
        await admin(emulator, "PUT", "/faults", {"error_rate": 0.0})
        await fabric.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_failed_attach_is_typed_and_leaves_a_failed_device_only(
    emulator: EmulatorServer, backend: str
) -> None:
    fabric = make_client(emulator, backend)
    try:
        slot = await free_a100(fabric)
        device = (
            slot
            if backend == "redfish"
            else next(d.spec.id for d in emulator.state.devices.values() if d.spec.model == A100)
        )
        await admin(emulator, "PUT", f"/devices/{device}/faults", {"fail_next_attaches": 1})
        with pytest.raises(errors.DeviceFailed):
            await fabric.attach(slot, MachineId("m-node-1"), model=A100)
        assert states(emulator)[device] == "failed"
        assert [s for s in states(emulator).values() if s != "free"] == ["failed"]
        with pytest.raises(errors.DeviceFailed):  # not attachable until healed
            await fabric.attach(device, MachineId("m-node-1"), model=A100)  # type: ignore[arg-type]
        await admin(emulator, "POST", f"/devices/{device}/heal")
        assert set(states(emulator).values()) == {"free"}
    finally:
        await fabric.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_credentials_expire_mid_operation(emulator: EmulatorServer, backend: str) -> None:
    """Sessions/tokens are revoked while an attach is being followed: the client logs in
    again and finishes; the device ends attached once."""
    fabric = make_client(emulator, backend)
    try:
        slot = await free_a100(fabric)
        for dev in emulator.state.devices.values():
            object.__setattr__(dev.spec, "attach_latency", 0.5)
        attaching = asyncio.create_task(fabric.attach(slot, MachineId("m-node-0"), model=A100))
        await until(
            emulator,
            lambda: any(d.state == DeviceState.ATTACHING for d in emulator.state.devices.values()),
        )
        await admin(emulator, "POST", "/expire-credentials")
        dev = await attaching
        assert dev.state == DeviceState.ATTACHED
        assert attached(emulator) == {dev.id: "m-node-0"}
        await admin(emulator, "POST", "/expire-credentials")
        assert len((await fabric.inventory()).devices) == 4  # a fresh login after expiry
    finally:
        await fabric.close()


async def test_stuck_attach_times_out_with_the_device_still_attaching(
    emulator: EmulatorServer,
) -> None:
    fabric = make_client(emulator, "redfish", operation_timeout=0.5)
    try:
        slot = await free_a100(fabric)
        await admin(emulator, "PUT", f"/devices/{slot}/faults", {"stuck": True})
        with pytest.raises(errors.FabricTimeout, match="did not finish within"):
            await fabric.attach(slot, MachineId("m-node-0"), model=A100)
        assert states(emulator)[slot] == "attaching"  # the truth, reported; not papered over
    finally:
        await fabric.close()
