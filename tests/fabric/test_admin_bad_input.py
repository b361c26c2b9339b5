"""The emulator's admin API refuses bad input with 400 and a reason, changing nothing: a body
that is not JSON, a knob value of the wrong kind or not finite, a health reason that is not a
short string, a link flap period too short to be a link (it flipped the health ~1,000 times a
second, each a persisted state change). Before: 500 "Server got itself in trouble", NaN stored,
`{"a": 1}` stored as the reason "{'a': 1}"."""

from __future__ import annotations

import ssl
from typing import Any

import aiohttp
import pytest

from agent.fabric.emulator.server import EmulatorServer


async def put(server: EmulatorServer, path: str, **kw: Any) -> tuple[int, Any]:
    assert server.ca_file is not None
    ctx = ssl.create_default_context(cafile=str(server.ca_file))
    async with (
        aiohttp.ClientSession() as s,
        s.put(f"{server.url}/emulator/v1{path}", ssl=ctx, **kw) as resp,
    ):
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    ("where", "kw"),
    [
        ("health", {"data": b"not json", "headers": {"Content-Type": "application/json"}}),
        ("health", {"json": {"health": "Critical", "reason": {"a": 1}}}),
        ("health", {"json": {"health": "Critical", "reason": "x" * 5000}}),
        ("health", {"json": {"health": "critical"}}),
        ("faults", {"data": b"{", "headers": {"Content-Type": "application/json"}}),
        ("faults", {"json": {"link_flap_period": "abc"}}),
        ("faults", {"json": {"link_flap_period": None}}),
        ("faults", {"json": {"link_flap_period": "nan"}}),
        ("faults", {"json": {"link_flap_period": "inf"}}),
        ("faults", {"json": {"link_flap_period": -1}}),
        ("faults", {"json": {"link_flap_period": 1e-6}}),
        ("faults", {"json": {"link_flap_period": "0.001"}}),
        ("faults", {"json": {"stuck": "yes", "fail_next_attaches": 2}}),
    ],
)
async def test_bad_admin_input_is_refused_and_changes_nothing(
    emulator: EmulatorServer, where: str, kw: dict[str, Any]
) -> None:
    gpu = next(iter(emulator.state.devices))
    before = (emulator.state.snapshot(), emulator.state.device_faults(gpu))
    status, body = await put(emulator, f"/devices/{gpu}/{where}", **kw)
    assert status == 400, body
    assert body["error"]
    assert (emulator.state.snapshot(), emulator.state.device_faults(gpu)) == before


async def test_good_admin_input_still_taken(emulator: EmulatorServer) -> None:
    gpu = next(iter(emulator.state.devices))
    status, body = await put(emulator, f"/devices/{gpu}/faults", json={"link_flap_period": "0.5"})
    assert (status, body["link_flap_period"]) == (200, 0.5)
    status, body = await put(emulator, f"/devices/{gpu}/faults", json={"link_flap_period": 0})
    assert status == 200
    status, body = await put(
        emulator, f"/devices/{gpu}/health", json={"health": "Critical", "reason": "link down"}
    )
    assert (status, body) == (200, {"health": "Critical", "reason": "link down"})
