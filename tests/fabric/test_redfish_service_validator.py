"""DMTF's Redfish service validator (`redfish_service_validator` from PyPI) against the emulator,
offline: every resource it reaches is checked against DMTF's CSDL (2025.4, read from a local
directory, never downloaded) plus the CSDL of the emulator's one OEM object. Zero FAIL, and every
WARN one the README explains (today there is none).

The emulator runs as `cohdi-agent fabric-emulator` (HTTPS, its generated CA, session login), with
GPUs in every state a client meets: free, attached (PCI address, Links.ComputerSystems) and
failed (Status.Conditions), so those documents are validated too. The validator runs as its own
process, in full but for its Excel report, which nobody reads and which costs most of its CPU
(tests/fabric/dmtf.py)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from agent import errors
from agent.fabric.credentials import Secret
from agent.fabric.emulator import oem
from agent.fabric.redfish import RedfishFabric
from agent.fabric.transport import FabricHttp
from agent.model.fabric import DeviceId, MachineId
from tests.fabric import dmtf
from tests.fabric.conftest import emulator_subprocess

PASSWORD = "service-Validator-1"
CSDL = Path(__file__).resolve().parents[2].parent / "shared" / "redfish-schemas" / "csdl"
VALIDATOR = Path(sys.executable).with_name("rf_service_validator")

#: WARN messages the validator gives and why they are right for this service (kept in sync with
#: the README's "Redfish service validator" section). Empty: it gives none.
EXPLAINED_WARNINGS: dict[str, str] = {}

pytestmark = [
    pytest.mark.skipif(not CSDL.is_dir(), reason=f"no DMTF CSDL at {CSDL}"),
    pytest.mark.skipif(not VALIDATOR.exists(), reason="redfish_service_validator not installed"),
]


@pytest.fixture
def emulator_process(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    with emulator_subprocess(tmp_path, PASSWORD) as served:
        yield served


async def _compose_some(url: str, ca: Path) -> None:
    """Attach one GPU, and fail another (its attach fails on the fabric), through the API."""
    fabric = RedfishFabric(
        FabricHttp(base_url=url, ca_bundle=str(ca)), user="admin", password=Secret(PASSWORD)
    )
    try:
        inv = await fabric.inventory()
        first, second = inv.devices[0].id, inv.devices[1].id
        await fabric.attach(DeviceId(first), MachineId("m-node-0"))
        ctx = ssl.create_default_context(cafile=str(ca))
        async with aiohttp.ClientSession() as s:
            fault = f"{url}/emulator/v1/devices/{second}/faults"
            async with s.put(fault, json={"fail_next_attaches": 1}, ssl=ctx) as resp:
                assert resp.status == 200
        with pytest.raises(errors.DeviceFailed):
            await fabric.attach(DeviceId(second), MachineId("m-node-1"))
    finally:
        await fabric.close()


def test_service_validator_finds_no_failure(
    emulator_process: tuple[str, Path], tmp_path: Path
) -> None:
    url, ca = emulator_process
    asyncio.run(_compose_some(url, ca))
    schemas = tmp_path / "schemas"
    shutil.copytree(CSDL, schemas)
    (schemas / oem.SCHEMA_FILE).write_text(oem.CSDL)
    done = subprocess.run(
        dmtf.command(
            "service",
            "--rhost",
            url,
            "--user",
            "admin",
            "--password",
            PASSWORD,
            "--authtype",
            "Session",
            "--schema_directory",
            str(schemas),
            "--skipschema",
            "--logdir",
            str(tmp_path / "report"),
        ),
        # The validator does not verify TLS itself; requests does, with this CA.
        env={**os.environ, "REQUESTS_CA_BUNDLE": str(ca)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    table = re.search(
        r"PASS\s*\|\s*WARN\s*\|\s*FAIL\s*\|\s*NOT TESTED\s*\|\s*\n[+-]+\n\|([^\n]*)", done.stdout
    )
    assert table, done.stdout[-3000:] + done.stderr[-2000:]
    passed, warned, failed, not_tested = (int(n) for n in re.findall(r"\d+", table.group(1)))
    (debug,) = (tmp_path / "report").rglob("RedfishServiceValidatorDebug_*.log")
    lines = debug.read_text().splitlines()
    failures = [line.split(" - FAIL - ", 1)[1] for line in lines if " - FAIL - " in line]
    warnings = [line.split(" - WARN - ", 1)[1] for line in lines if " - WARN - " in line]
    print(
        f"service validator: {passed} PASS, {warned} WARN, {failed} FAIL, {not_tested} NOT TESTED"
    )
    assert failed == 0, "\n".join(failures)
    unexplained = [w for w in warnings if not any(k in w for k in EXPLAINED_WARNINGS)]
    assert not unexplained, "\n".join(unexplained)
    assert passed > 400
    validated = {m for m in re.findall(r"Validating (\S+)\.\.\.", done.stdout)}
    assert any("/ResourceBlocks/" in v for v in validated)
    assert any("/Processors/GPU" in v for v in validated)
