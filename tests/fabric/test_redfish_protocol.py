"""The redfish backend against what standard services do and what goes wrong between them and
us: no `$expand` (501), a failure in the middle of discovery, concurrent first calls, a write
acknowledged without effect, a malformed `Links.ResourceBlocks`, a URL that leads nowhere. Each
test names the request counts it relies on, read from the emulator's request log."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent import errors
from agent.fabric import redfish as redfish_module
from agent.fabric.credentials import Secret
from agent.fabric.emulator.server import EmulatorServer
from agent.fabric.redfish import RedfishFabric
from agent.fabric.transport import FabricHttp
from agent.model.fabric import DeviceId, DeviceState, FabricId, MachineId
from tests.fabric.conftest import (
    MOCKUPS,
    PASSWORD,
    admin,
    edited_mockup,
    make_client,
    mockup_config,
    serving,
    small_config,
)
from tests.fabric.test_clients import attached, free_a100

SESSIONS = "/redfish/v1/SessionService/Sessions"
COMPOSITION = "/redfish/v1/CompositionService"
needs_mockups = pytest.mark.skipif(not MOCKUPS.is_dir(), reason=f"no DMTF mockups at {MOCKUPS}")


def sent(server: EmulatorServer, method: str, fragment: str) -> int:
    """How many `method` requests whose path (and query) contains `fragment` the emulator got."""
    return sum(1 for m, p in server.state.requests if m == method and fragment in p)


def redfish(server: EmulatorServer, **kw: Any) -> RedfishFabric:
    client = make_client(server, "redfish", **kw)
    assert isinstance(client, RedfishFabric)
    return client


# --- $expand -------------------------------------------------------------------------------------


async def test_a_service_without_expand_is_read_member_by_member(tmp_path: Path) -> None:
    """The service root advertises no ExpandQuery (and the service answers 501 to `$expand`):
    the client never sends it, and reads each block."""
    async with serving(dataclasses.replace(small_config(), expand=False), tmp_path) as server:
        fabric = redfish(server)
        try:
            inv = await fabric.inventory()
            assert len(inv.devices) == 4
            assert {m.id for m in inv.machines} == {"m-node-0", "m-node-1"}
            assert sent(server, "GET", "expand") == 0
            blocks = sent(server, "GET", f"{COMPOSITION}/ResourceBlocks/fabric0-gpu-")
            assert blocks >= 4, "every GPU block read on its own"
        finally:
            await fabric.close()


async def test_a_501_to_expand_switches_to_member_reads_for_good(emulator: EmulatorServer) -> None:
    """The root advertises `$expand` but the service answers 501 to it: one 501, then per-member
    reads, and no `$expand` again (not a transient error retried until the inventory fails)."""
    await admin(emulator, "PUT", "/faults", {"expand_unsupported": True})
    fabric = redfish(emulator)
    try:
        inv = await fabric.inventory()
        assert len(inv.devices) == 4
        assert sent(emulator, "GET", "expand") == 1
        again = await fabric.inventory()
        assert {d.id for d in again.devices} == {d.id for d in inv.devices}
        assert sent(emulator, "GET", "expand") == 1
    finally:
        await fabric.close()


async def test_an_expanding_service_costs_three_requests_a_read_and_304s_when_unchanged(
    emulator: EmulatorServer,
) -> None:
    """Blocks two levels deep (their Processors inline), systems and zones one level: three
    requests an inventory, no Processor read; an unchanged fabric answers three 304s."""
    fabric = redfish(emulator)
    try:
        inv = await fabric.inventory()
        assert len(inv.devices) == 4
        assert sent(emulator, "GET", "/Processors") == 0
        assert sent(emulator, "GET", "$expand") == 3
        assert sent(emulator, "GET", "ResourceBlocks?$expand=.($levels=2)") == 1
        before = len(emulator.state.requests)
        assert await fabric._read_inventory(True) is None
        assert len(emulator.state.requests) - before == 3
        await fabric.attach(inv.devices[0].id, MachineId("m-node-0"))
        changed = await fabric._read_inventory(True)
        assert changed is not None
        attached_now = changed.device(inv.devices[0].id)
        assert attached_now is not None
        assert attached_now.state == DeviceState.ATTACHED
    finally:
        await fabric.close()


# --- discovery -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [SESSIONS, COMPOSITION])
async def test_a_503_in_the_middle_of_discovery_then_recovery(
    emulator: EmulatorServer, path: str
) -> None:
    """The service root answers, then login or the CompositionService answers 503 past every
    retry: the call fails with a transient error, and once the service recovers every call
    works (nothing half-discovered is kept)."""
    fabric = redfish(emulator, retries=2)
    try:
        await admin(emulator, "PUT", "/faults", {"unavailable_paths": {path: 1000}})
        with pytest.raises(errors.FabricUnavailable, match="503") as info:
            await fabric.inventory()
        assert info.value.transient
        with pytest.raises(errors.FabricUnavailable):
            await fabric.attach(DeviceId("fabric0-gpu-0000"), MachineId("m-node-0"))
        await admin(emulator, "PUT", "/faults", {"unavailable_paths": {}})
        assert len((await fabric.inventory()).devices) == 4
        dev = await fabric.attach(DeviceId("fabric0-gpu-0000"), MachineId("m-node-0"))
        assert dev.state == DeviceState.ATTACHED
        assert attached(emulator) == {"fabric0-gpu-0000": "m-node-0"}
    finally:
        await fabric.close()


async def test_concurrent_first_calls_share_one_discovery_and_one_login(
    emulator: EmulatorServer,
) -> None:
    """Eight calls on a fresh client while every request is slow: all succeed, one session."""
    await admin(emulator, "PUT", "/faults", {"delay": 0.05})
    fabric = redfish(emulator)
    try:
        results = await asyncio.gather(
            *(fabric.inventory() for _ in range(6)),
            fabric.attach(DeviceId("fabric0-gpu-0001"), MachineId("m-node-1")),
            fabric.detach(DeviceId("fabric0-gpu-0002")),
        )
        assert sent(emulator, "POST", SESSIONS) == 1
        assert len(emulator.creds.sessions) == 1
        assert attached(emulator) == {"fabric0-gpu-0001": "m-node-1"}
        assert all(len(inv.devices) == 4 for inv in results[:6])
    finally:
        await admin(emulator, "PUT", "/faults", {"delay": 0.0})
        await fabric.close()


# --- writes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("attach", [True, False])
async def test_a_write_acknowledged_without_effect_is_reread_then_a_typed_error(
    emulator: EmulatorServer, attach: bool
) -> None:
    """AddResourceBlock/RemoveResourceBlock answer 204 and nothing changes: the client re-reads
    the block with growing pauses, sends the write once, and gives up with a typed, transient
    error naming the block — long before the operation timeout, and without a storm of POSTs."""
    fabric = redfish(emulator, operation_timeout=20.0)
    try:
        device = await free_a100(fabric)
        if not attach:
            await fabric.attach(device, MachineId("m-node-0"))
        action = "AddResourceBlock" if attach else "RemoveResourceBlock"
        await admin(emulator, "PUT", "/faults", {"no_effect_next": 1000})
        reads_before = sent(emulator, "GET", f"ResourceBlocks/{device}")
        write = fabric.attach(device, MachineId("m-node-0")) if attach else fabric.detach(device)
        with pytest.raises(errors.FabricProtocolError, match="no effect") as info:
            await write
        assert info.value.transient
        assert device in str(info.value)
        assert sent(emulator, "POST", action) == 1
        reads = sent(emulator, "GET", f"ResourceBlocks/{device}") - reads_before
        assert 3 <= reads <= 20, f"{reads} reads of the block"
        assert attached(emulator) == ({} if attach else {device: "m-node-0"})
    finally:
        await admin(emulator, "PUT", "/faults", {"no_effect_next": 0})
        await fabric.close()


def _no_actions_and_a_bad_link(doc: dict[str, Any]) -> None:
    for name in ("#ComputerSystem.AddResourceBlock", "#ComputerSystem.RemoveResourceBlock"):
        doc["Actions"].pop(name)
    doc["Links"]["ResourceBlocks"].append({"Name": "a link without @odata.id"})


@needs_mockups
async def test_patch_fallback_with_an_element_without_odata_id(tmp_path: Path) -> None:
    """A system without the composition actions is composed with a Links PATCH; an element of
    its `Links.ResourceBlocks` without `@odata.id` is a typed protocol error naming the system
    and the element, not a KeyError."""
    tree = edited_mockup(
        tmp_path,
        "public-composability",
        {"/redfish/v1/Systems/ComposedSystem2": _no_actions_and_a_bad_link},
    )
    async with serving(mockup_config(tree), tmp_path) as server:
        fabric = redfish(server)
        try:
            with pytest.raises(errors.FabricProtocolError) as info:
                await fabric.attach(DeviceId("OffloadBlock9"), MachineId("ComposedSystem2"))
            assert "/redfish/v1/Systems/ComposedSystem2" in str(info.value)
            assert re.search(r"Links\.ResourceBlocks\[\d+\]\.@odata\.id", str(info.value))
            assert sent(server, "PATCH", "/Systems/") == 0
        finally:
            await fabric.close()


@needs_mockups
async def test_patch_fallback_composes_a_system_without_actions(tmp_path: Path) -> None:
    def no_actions(doc: dict[str, Any]) -> None:
        for name in ("#ComputerSystem.AddResourceBlock", "#ComputerSystem.RemoveResourceBlock"):
            doc["Actions"].pop(name)

    tree = edited_mockup(
        tmp_path, "public-composability", {"/redfish/v1/Systems/ComposedSystem2": no_actions}
    )
    async with serving(mockup_config(tree), tmp_path) as server:
        fabric = redfish(server)
        try:
            dev = await fabric.attach(DeviceId("OffloadBlock9"), MachineId("ComposedSystem2"))
            assert (dev.state, dev.machine) == (DeviceState.ATTACHED, "ComposedSystem2")
            assert attached(server)["OffloadBlock9"] == "ComposedSystem2"
            gone = await fabric.detach(DeviceId("OffloadBlock9"))
            assert gone.state == DeviceState.FREE
            assert "OffloadBlock9" not in attached(server)
            assert sent(server, "PATCH", "/Systems/ComposedSystem2") == 2
            assert sent(server, "POST", "ResourceBlock") == 0
        finally:
            await fabric.close()


# --- configuration errors ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def root_only() -> AsyncIterator[str]:
    """A service that answers its root, with `Links.Sessions`, and 404 to everything else (the
    root of another product, a proxy's, a copied mockup): plain HTTP on loopback."""

    async def root(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "@odata.id": "/redfish/v1/",
                "Systems": {"@odata.id": "/redfish/v1/Systems"},
                "CompositionService": {"@odata.id": "/redfish/v1/CompositionService"},
                "Links": {"Sessions": {"@odata.id": "/redfish/v1/SessionService/Sessions"}},
            }
        )

    app = web.Application()
    app.router.add_get("/redfish/v1/", root)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_404_at_login_is_a_configuration_error_naming_the_url() -> None:
    async with root_only() as url:
        fabric = RedfishFabric(
            FabricHttp(base_url=url, retries=3), user="admin", password=Secret(PASSWORD)
        )
        try:
            with pytest.raises(errors.ConfigError, match="SessionService/Sessions") as info:
                await fabric.inventory()
            assert info.value.setting == "--fabric-url"
            assert url in str(info.value)
        finally:
            await fabric.close()


async def test_a_url_without_a_redfish_service_is_a_configuration_error(
    emulator: EmulatorServer,
) -> None:
    fabric = make_client(emulator, "redfish")
    assert isinstance(fabric, RedfishFabric)
    fabric.http.base_url += "/not-here"
    try:
        with pytest.raises(errors.ConfigError, match="no Redfish service root") as info:
            await fabric.inventory()
        assert info.value.setting == "--fabric-url"
    finally:
        await fabric.close()


# --- malformed documents -------------------------------------------------------------------------

BLOCK9 = "/redfish/v1/CompositionService/ResourceBlocks/OffloadBlock9"
GPU9 = f"{BLOCK9}/Processors/Block9GPU"


def _set(path: list[str | int], value: Any) -> Any:
    def edit(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


@needs_mockups
@pytest.mark.parametrize(
    ("uri", "edit", "named"),
    [
        (BLOCK9, _set(["ResourceBlockType"], "Processor"), "ResourceBlockType"),
        (BLOCK9, _set(["Processors", 0], {"href": GPU9}), "Processors[0].@odata.id"),
        (BLOCK9, _set(["Links", "Zones", 0], "2"), "Links.Zones[0].@odata.id"),
        (GPU9, _set(["Model"], 2000), "Model"),
        (
            "/redfish/v1/CompositionService/ResourceZones/2",
            _set(["Links", "ResourceBlocks", 1], {}),
            "Links.ResourceBlocks[1].@odata.id",
        ),
        ("/redfish/v1/Systems", _set(["Members"], {"oops": 1}), "Members"),
    ],
)
async def test_a_malformed_document_is_a_protocol_error_naming_uri_and_field(
    tmp_path: Path, uri: str, edit: Any, named: str
) -> None:
    tree = edited_mockup(tmp_path, "public-composability", {uri: edit})
    async with serving(mockup_config(tree), tmp_path) as server:
        fabric = redfish(server, retries=1)
        try:
            with pytest.raises(errors.FabricProtocolError) as info:
                await fabric.inventory()
            assert uri in str(info.value)
            assert named in str(info.value)
        finally:
            await fabric.close()


@pytest.mark.parametrize(
    ("status", "named"),
    [
        (None, "CompositionStatus.CompositionState"),
        ("Composed", "CompositionStatus"),
        ({"CompositionState": 7}, "CompositionStatus.CompositionState"),
        ({"CompositionState": "Borrowed"}, "CompositionStatus.CompositionState"),
    ],
)
def test_a_malformed_composition_status_is_a_protocol_error(status: Any, named: str) -> None:
    """(The emulator renders a composable block's status itself, so this one is checked on the
    parser directly.)"""
    block = {"@odata.id": BLOCK9, "ResourceBlockType": ["Processor"], "CompositionStatus": status}
    with pytest.raises(errors.FabricProtocolError) as info:
        redfish_module._device(BLOCK9, block, GPU9, {"Model": "X"}, FabricId("2"))
    assert f"{BLOCK9}: {named}" in str(info.value)


# --- what a service lacks ------------------------------------------------------------------------


def _no_zones(doc: dict[str, Any]) -> None:
    doc.pop("ResourceZones", None)
    doc.get("Links", {}).pop("Zones", None)


@needs_mockups
async def test_a_composition_service_without_zones_is_one_implicit_fabric(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No ResourceZones and no block in a zone: said once at start, and every system and block is
    in one fabric named after the service, so the GPU is offered and composes to any system."""
    blocks = (MOCKUPS / "public-composability" / "CompositionService" / "ResourceBlocks").iterdir()
    edits = {"/redfish/v1/CompositionService": _no_zones} | {
        f"/redfish/v1/CompositionService/ResourceBlocks/{b.name}": _no_zones
        for b in blocks
        if b.is_dir() and b.name != "Capabilities"
    }
    tree = edited_mockup(tmp_path, "public-composability", edits)
    async with serving(mockup_config(tree), tmp_path) as server:
        fabric = redfish(server)
        try:
            inv = await fabric.inventory()
            host = server.url.removeprefix("https://")
            assert [(d.id, d.fabric) for d in inv.devices] == [("OffloadBlock9", host)]
            assert {m.fabric for m in inv.machines} == {host}
            assert len(inv.machines) == 5
            await fabric.inventory()
            assert caplog.text.count("has no resource zones") == 1
            assert "configure ResourceZones" in caplog.text
            dev = await fabric.attach(DeviceId("OffloadBlock9"), MachineId("ComposedSystem"))
            assert (dev.state, dev.machine) == (DeviceState.ATTACHED, "ComposedSystem")
        finally:
            await fabric.close()


@needs_mockups
async def test_processor_types_choose_what_is_pooled(tmp_path: Path) -> None:
    async with serving(mockup_config(MOCKUPS / "public-composability"), tmp_path) as server:
        fpga_only = redfish(server)
        fpga_only.processor_types = frozenset({"FPGA"})
        try:
            assert (await fpga_only.inventory()).devices == ()
            with pytest.raises(errors.DeviceNotFound, match="not a pooled device"):
                await fpga_only.attach(DeviceId("OffloadBlock9"), MachineId("ComposedSystem2"))
        finally:
            await fpga_only.close()
