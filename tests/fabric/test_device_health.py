"""A device's own health through the wire: the emulator's per-device health fault and link flap
(admin API) rendered in Redfish `Status` of the ResourceBlock and its Processor (and FTI's
`res_op_status`), read back by the clients as `PoolDevice.health` without changing the
composition state."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.fabric.emulator.redfish_api import RedfishApi
from agent.fabric.emulator.server import EmulatorServer
from agent.model.fabric import DeviceState, MachineId, PoolDevice
from agent.model.health import fabric_word
from tests.fabric.conftest import A100, admin, make_client, serving, small_config, until
from tests.fabric.test_clients import free_a100


async def device(fabric: object, device_id: str) -> PoolDevice | None:
    inv = await fabric.inventory()  # type: ignore[attr-defined]
    return inv.device(device_id)  # type: ignore[no-any-return]


async def test_redfish_health_fault_on_a_free_gpu(emulator: EmulatorServer) -> None:
    fabric = make_client(emulator, "redfish")
    try:
        gpu = await free_a100(fabric)
        got = await admin(
            emulator, "PUT", f"/devices/{gpu}/health", {"health": "Critical", "reason": "ECC storm"}
        )
        assert got == {"health": "Critical", "reason": "ECC storm"}
        dev = await device(fabric, gpu)
        assert dev is not None
        assert (dev.state, dev.health, dev.health_reason) == (
            DeviceState.FREE,
            "Critical",
            "ECC storm",
        )
        word = fabric_word(dev)
        assert word is not None
        assert not word.healthy
        await admin(emulator, "PUT", f"/devices/{gpu}/health", {"health": "Warning"})
        dev = await device(fabric, gpu)
        assert dev is not None
        assert (dev.health, dev.health_reason) == ("Warning", "injected Warning health")
        await admin(emulator, "PUT", f"/devices/{gpu}/health", {"health": "OK"})
        dev = await device(fabric, gpu)
        assert dev is not None
        assert (dev.state, dev.health, dev.health_reason) == (DeviceState.FREE, "OK", "")
    finally:
        await fabric.close()


async def test_fti_never_counts_or_hands_out_a_sick_free_gpu(emulator: EmulatorServer) -> None:
    """FTI names no free GPU (it counts them per model and picks one on attach): a free GPU with
    a health fault is not counted and never picked, so no slot can lead to it."""
    fabric = make_client(emulator, "fti")
    try:
        a100s = sorted(d.spec.id for d in emulator.state.devices.values() if d.spec.model == A100)
        sick = a100s[0]

        async def free_slots() -> list[PoolDevice]:
            inv = await fabric.inventory()
            return [d for d in inv.devices if d.model == A100 and d.state == DeviceState.FREE]

        assert len(await free_slots()) == len(a100s)
        await admin(emulator, "PUT", f"/devices/{sick}/health", {"health": "Critical"})
        slots = await free_slots()
        assert len(slots) == len(a100s) - 1
        got = [await fabric.attach(s.id, MachineId("m-node-0"), model=A100) for s in slots]
        assert sick not in {d.id for d in got}
        assert emulator.state.devices[sick].state == DeviceState.FREE
        assert await free_slots() == []
        await admin(emulator, "PUT", f"/devices/{sick}/health", {"health": "OK"})
        assert len(await free_slots()) == 1  # repaired: offered again
    finally:
        await fabric.close()


async def test_redfish_renders_health_on_the_block_and_the_processor(
    emulator: EmulatorServer,
) -> None:
    gpu = next(d.spec.id for d in emulator.state.devices.values() if d.spec.model == A100)
    emulator.state.set_health(gpu, "Critical", "fell off the bus")
    redfish = RedfishApi(emulator.state, emulator.creds)
    block = redfish._block_doc(emulator.state.devices[gpu])
    proc = redfish._processor_doc(emulator.state.devices[gpu])
    for status in (block["Status"], proc["Status"]):
        assert status["Health"] == "Critical"
        assert status["Conditions"][0]["Message"] == "fell off the bus"
        assert status["Conditions"][0]["Severity"] == "Critical"
    assert block["CompositionStatus"]["CompositionState"] == "Unused"  # composition untouched


@pytest.mark.parametrize("backend", ["redfish", "fti"])
async def test_an_attached_gpu_turns_critical_and_stays_attached(
    emulator: EmulatorServer, backend: str
) -> None:
    fabric = make_client(emulator, backend)
    try:
        slot = await free_a100(fabric)
        attached = await fabric.attach(slot, MachineId("m-node-0"), model=A100)
        await admin(
            emulator,
            "PUT",
            f"/devices/{attached.id}/health",
            {"health": "Critical", "reason": "Xid"},
        )
        dev = await device(fabric, attached.id)
        assert dev is not None
        # Redfish keeps the composition (CompositionState Composed); FTI keeps res_status 4
        # (attached) and says critical in res_op_status
        assert (dev.state, dev.machine) == (DeviceState.ATTACHED, "m-node-0")
        assert dev.health == "Critical"
        assert "Xid" in dev.health_reason
    finally:
        await fabric.close()


async def test_link_flap_flips_health_and_ends_healthy(emulator: EmulatorServer) -> None:
    fabric = make_client(emulator, "redfish")
    try:
        gpu = await free_a100(fabric)
        await admin(emulator, "PUT", f"/devices/{gpu}/faults", {"link_flap_period": 0.1})
        seen: set[str] = set()
        async with asyncio.timeout(10):
            while seen != {"OK", "Critical"}:
                dev = await device(fabric, gpu)
                assert dev is not None
                assert dev.state == DeviceState.FREE
                seen.add(dev.health)
                await asyncio.sleep(0.03)
        await admin(emulator, "PUT", f"/devices/{gpu}/faults", {"link_flap_period": 0})
        await until(emulator, lambda: emulator.state.devices[gpu].health == "OK", timeout=5)
        await asyncio.sleep(0.3)  # the flap has ended: it stays healthy
        dev = await device(fabric, gpu)
        assert dev is not None
        assert dev.health == "OK"
    finally:
        await fabric.close()


async def test_bad_health_is_refused(emulator: EmulatorServer) -> None:
    gpu = next(iter(emulator.state.devices))
    import ssl

    import aiohttp

    ctx = ssl.create_default_context(cafile=str(emulator.ca_file))
    async with (
        aiohttp.ClientSession() as s,
        s.put(
            f"{emulator.url}/emulator/v1/devices/{gpu}/health", json={"health": "Sick"}, ssl=ctx
        ) as resp,
    ):
        assert resp.status == 400
        assert "Critical" in (await resp.json())["error"]


async def test_health_survives_an_emulator_restart(tmp_path: Path) -> None:
    cfg = small_config()
    async with serving(cfg, tmp_path) as server:
        gpu = next(iter(server.state.devices))
        server.state.set_health(gpu, "Critical", "link down")
    async with serving(cfg, tmp_path) as server:
        dev = server.state.devices[gpu]
        assert (dev.health, dev.health_reason) == ("Critical", "link down")
        snap = next(d for d in server.state.snapshot()["devices"] if d["id"] == gpu)
        assert (snap["health"], snap["health_reason"]) == ("Critical", "link down")
