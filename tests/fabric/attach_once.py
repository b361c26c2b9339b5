"""A client process for the crash test: attach one device and print the result.
Usage: python -m tests.fabric.attach_once BACKEND URL CA DEVICE MACHINE MODEL"""

from __future__ import annotations

import asyncio
import sys

from agent.fabric.credentials import Secret
from agent.fabric.emulator.config import DEFAULT_TENANT
from agent.fabric.fti import FtiFabric
from agent.fabric.redfish import RedfishFabric
from agent.fabric.transport import FabricHttp
from agent.model.fabric import DeviceId, MachineId
from tests.fabric.conftest import PASSWORD


async def main(backend: str, url: str, ca: str, device: str, machine: str, model: str) -> None:
    http = FabricHttp(base_url=url, ca_bundle=ca)
    fabric = (
        RedfishFabric(http, user="admin", password=Secret(PASSWORD))
        if backend == "redfish"
        else FtiFabric(http, user="admin", password=Secret(PASSWORD), tenant=DEFAULT_TENANT)
    )
    try:
        dev = await fabric.attach(DeviceId(device), MachineId(machine), model=model)
        print(dev.state, dev.machine, flush=True)
    finally:
        await fabric.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:7]))
