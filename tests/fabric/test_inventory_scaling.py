"""An inventory read costs work linear in the fabric's size, on both sides of the wire.

Found by the leader benchmark (bench/test_leader.py), whose profile of a leader facing 1,000
machines and 8,000 GPUs spent 72 % of its samples in the Redfish client's search for each
system's own blocks (every block scanned again for every system: 112 s to publish), and whose
5,000-machine fabric then spent minutes in the emulator listing each system's devices (every
device scanned again for every system). Counted, not timed: the work one read does for twice
the fabric must stay about twice."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.fabric import redfish
from agent.fabric.credentials import Secret
from agent.fabric.emulator import config
from agent.fabric.emulator.server import EmulatorServer
from agent.fabric.transport import FabricHttp

PASSWORD = "s3cret-fabric-pass"


def _config(machines: int) -> config.EmulatorConfig:
    return config.parse(
        {
            "machines": [
                {"id": f"m{i}", "name": f"node-{i}", "fabric": "f0"} for i in range(machines)
            ],
            "devices": [{"model": "GPU-X", "count": 4 * machines, "fabric": "f0"}],
            "users": [{"name": "admin", "password": PASSWORD}],
        }
    )


class CountingDict(dict[str, Any]):
    """A dict that counts full scans (values/items/iteration)."""

    scans = 0

    def values(self) -> Any:
        CountingDict.scans += 1
        return super().values()

    def items(self) -> Any:
        CountingDict.scans += 1
        return super().items()

    def __iter__(self) -> Iterator[str]:
        CountingDict.scans += 1
        return super().__iter__()


async def _read(machines: int, tmp: Path) -> tuple[int, int, int]:
    """(norm calls in the client, device scans in the emulator, devices read) for one read."""
    server = EmulatorServer(_config(machines), tls_dir=tmp / f"tls-{machines}")
    await server.start()
    server.state.devices = CountingDict(server.state.devices)
    http = FabricHttp(base_url=server.url, ca_bundle=str(server.ca_file))
    fabric = redfish.RedfishFabric(http, user="admin", password=Secret(PASSWORD))
    calls = 0
    norm = redfish._norm

    def counting(uri: str) -> str:
        nonlocal calls
        calls += 1
        return norm(uri)

    try:
        await fabric.inventory()  # log in; the service document
        CountingDict.scans = 0
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(redfish, "_norm", counting)
            fabric._version = None  # type: ignore[attr-defined]
            inv = await fabric.inventory()
        return calls, CountingDict.scans, len(inv.devices)
    finally:
        await fabric.close()
        await server.stop()


async def test_one_read_is_linear_in_machines_and_devices(tmp_path: Path) -> None:
    small_calls, small_scans, small_devices = await _read(40, tmp_path)
    big_calls, big_scans, big_devices = await _read(80, tmp_path)
    assert (small_devices, big_devices) == (160, 320)
    # client: twice the fabric, about twice the URI work (quadratic was about four times)
    assert big_calls <= 2.5 * small_calls, (small_calls, big_calls)
    # emulator: the devices are not scanned once per system
    assert big_scans <= 2.5 * small_scans, (small_scans, big_scans)
    assert big_scans < 80, big_scans
