"""Defects of the built-in fabric emulator found by trying to break issues 9-11 with real
processes (`cohdi-agent fabric-emulator --emulator-config ...` and `cohdi-agent run`). Each failed
before its fix and now guards it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.fabric.emulator import config
from agent.fabric.emulator.config import EmulatorConfigError
from tests.fabric.conftest import A100, PASSWORD, make_client, serving, small_config

#: Device ids a config may give (`devices[].ids`) that are no URI path segment as they stand.
ODD_IDS = ["GPU/0", "id?q=1#f"]


@pytest.mark.parametrize("odd", ODD_IDS)
async def test_device_ids_that_are_no_uri_segment_are_served_or_refused(
    odd: str, tmp_path: Path
) -> None:
    doc = {
        "machines": [{"id": "m-a", "name": "a", "fabric": "f"}],
        "devices": [{"model": A100, "count": 2, "ids": [odd, "gpu-ok"], "fabric": "f"}],
        "users": [{"name": "admin", "password": PASSWORD}],
    }
    try:
        cfg = config.parse(doc)
    except EmulatorConfigError:
        return  # refusing the id up front is a fix too
    async with serving(cfg, tmp_path) as server:
        fabric = make_client(server, "redfish", retries=1)
        try:
            inv = await fabric.inventory()
        finally:
            await fabric.close()
    assert len(inv.devices) == 2, [d.id for d in inv.devices]


async def test_a_restarted_emulator_is_still_trusted_by_its_clients(tmp_path: Path) -> None:
    async with serving(small_config(), tmp_path) as server:
        assert server.ca_file is not None
        kept_ca = tmp_path / "ca-as-the-client-loaded-it.crt"
        shutil.copy(server.ca_file, kept_ca)
    async with serving(small_config(), tmp_path) as server:  # same tls dir, same state file
        fabric = make_client(server, "redfish", ca=kept_ca, retries=1)
        try:
            inv = await fabric.inventory()
        finally:
            await fabric.close()
    assert len(inv.devices) == 4
