"""A client killed between "attach sent" and "attach confirmed": a fresh client converges to
exactly one attachment, for both protocols (FTI with a named device: its anonymous by-model
attach cannot be made idempotent by the API itself, see agent/fabric/fti.py)."""

from __future__ import annotations

import asyncio
import signal
import sys

import pytest

from agent.fabric.emulator.server import EmulatorServer
from agent.model.fabric import DeviceId, DeviceState, MachineId
from tests.fabric.conftest import A100, make_client, until
from tests.fabric.test_clients import attached


@pytest.mark.parametrize("backend", ["redfish", "fti"])
async def test_killed_mid_attach_then_a_fresh_client_converges(
    emulator: EmulatorServer, backend: str
) -> None:
    device = next(d for d in emulator.state.devices.values() if d.spec.model == A100)
    object.__setattr__(device.spec, "attach_latency", 1.0)
    assert emulator.ca_file is not None
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fabric.attach_once",
        backend,
        emulator.url,
        str(emulator.ca_file),
        device.spec.id,
        "m-node-1",
        A100,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await until(emulator, lambda: device.state == DeviceState.ATTACHING, 30)  # "sent"
    proc.send_signal(signal.SIGKILL)  # ...and the client dies before it is confirmed
    await proc.wait()
    assert device.state == DeviceState.ATTACHING

    fresh = make_client(emulator, backend)
    try:
        dev = await fresh.attach(DeviceId(device.spec.id), MachineId("m-node-1"), model=A100)
    finally:
        await fresh.close()
    assert dev.state == DeviceState.ATTACHED
    assert dev.id == device.spec.id
    assert attached(emulator) == {device.spec.id: "m-node-1"}
    assert emulator.state.attach_started == 1, "the fresh client sent a second attach"
