"""Secrets never reach the logs; the emulator keeps attachments across a restart; the appear hook
writes a simulated node's sysfs entry; a bad emulator config names what is wrong."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from agent.fabric.credentials import Secret, load_secret
from agent.fabric.emulator import config
from agent.fabric.emulator.server import EmulatorServer
from agent.fabric.emulator.sysfs_hook import SysfsHook
from agent.model.fabric import DeviceId, DeviceState, MachineId
from tests.fabric.conftest import A100, PASSWORD, admin, make_client, small_config, until


async def test_no_password_or_token_in_logs(
    emulator: EmulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # everything, aiohttp and ours
    for backend in ("redfish", "fti"):
        fabric = make_client(emulator, backend)
        try:
            inv = await fabric.inventory()
            slot = next(
                d.id for d in inv.devices if d.model == A100 and d.state == DeviceState.FREE
            )
            await admin(emulator, "POST", "/expire-credentials")  # forces a re-login, logged
            dev = await fabric.attach(slot, MachineId("m-node-0"), model=A100)
            await fabric.detach(dev.id)
        finally:
            await fabric.close()
        bad = make_client(emulator, backend, password="wrong-" + PASSWORD)
        try:
            with pytest.raises(Exception, match="refused"):
                await bad.inventory()
        finally:
            await bad.close()
    tokens = [s.token for s in emulator.creds.sessions.values()] + list(emulator.creds.tokens)
    assert tokens, "the clients should hold live credentials at this point"
    assert "re-login" in caplog.text or "renewing" in caplog.text or "expired" in caplog.text
    for secret in (PASSWORD, *tokens):
        assert secret not in caplog.text


def test_secret_repr_hides_the_value(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("hunter2-long\nignored\n")
    s = load_secret(file=str(f), env_var="UNUSED", what="pw")
    assert s.reveal() == "hunter2-long"
    assert "hunter2" not in repr(s) + str(s) + f"{s}"
    assert load_secret(file="", env_var="PW", what="pw", environ={"PW": "x"}).reveal() == "x"
    assert not Secret("")


async def test_restart_keeps_attachments_and_finishes_transitions(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    first = EmulatorServer(small_config(), state_file=state_file, tls_dir=tmp_path / "tls")
    await first.start()
    devs = [d.spec.id for d in first.state.devices.values()]
    first.state.attach(devs[0], "m-node-0")
    object.__setattr__(first.state.devices[devs[1]].spec, "attach_latency", 30.0)
    first.state.attach(devs[1], "m-node-1")  # still attaching when we "crash"
    await asyncio.sleep(0.05)
    await first.stop()
    saved = json.loads(state_file.read_text())
    assert saved["devices"][devs[0]]["state"] == "attached"
    assert saved["devices"][devs[1]]["state"] == "attaching"

    second = EmulatorServer(small_config(), state_file=state_file, tls_dir=tmp_path / "tls2")
    await second.start()
    try:
        d0, d1 = second.state.devices[devs[0]], second.state.devices[devs[1]]
        assert (d0.state, d0.machine) == (DeviceState.ATTACHED, "m-node-0")
        # resumed with the config's latency (0)
        await until(second, lambda: d1.state == DeviceState.ATTACHED, 5)
        assert d1.machine == "m-node-1"
        fabric = make_client(second, "redfish")
        try:
            inv = await fabric.inventory()
        finally:
            await fabric.close()
        assert {d.id: d.machine for d in inv.devices if d.machine} == {
            devs[0]: "m-node-0",
            devs[1]: "m-node-1",
        }
    finally:
        await second.stop()


async def test_corrupt_state_file_is_a_clear_error(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    state_file.write_text("{not json")
    with pytest.raises(Exception, match=r"state\.json is unreadable .* move it away"):
        EmulatorServer(small_config(), state_file=state_file)


async def test_appear_hook_writes_and_removes_the_pci_function(tmp_path: Path) -> None:
    server = EmulatorServer(small_config())
    hook = SysfsHook(lambda m: tmp_path / m.name)
    server.state.on_appear.append(hook.appear)
    server.state.on_disappear.append(hook.disappear)
    await server.start()
    try:
        fabric = make_client(server, "redfish")
        try:
            inv = await fabric.inventory()
            slot = next(d.id for d in inv.devices if d.model == A100)
            dev = await fabric.attach(DeviceId(slot), MachineId("m-node-1"), model=A100)
            fn = tmp_path / "node-1" / "sys" / "bus" / "pci" / "devices" / dev.pci_address
            assert (fn / "vendor").read_text().strip() == "0x10de"
            assert (fn / "class").read_text().strip() == "0x030200"
            lines = (tmp_path / "node-1" / "nvml-gpus").read_text().splitlines()
            assert [line.split("\t")[:3] for line in lines] == [
                [dev.gpu_uuid, A100, dev.pci_address]
            ]
            await fabric.detach(dev.id)
            assert not fn.exists()
            assert (tmp_path / "node-1" / "nvml-gpus").read_text() == ""
        finally:
            await fabric.close()
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "must be a mapping"),
        (
            {"machines": [{"id": "m"}], "devices": [{"count": 2}]},
            r"devices\[0\]\.model: must be a non-empty string",
        ),
        (
            {"machines": [{"id": "m"}], "devices": [{"model": "X", "count": -1}]},
            r"devices\[0\]\.count: must be a number >= 0",
        ),
        (
            {"machines": [{"id": "m", "fabric": "a"}], "devices": [{"model": "X", "fabric": "b"}]},
            "which no machine is wired to",
        ),
        ({"machines": [{"id": "m"}, {"id": "m"}]}, "ids must be unique"),
        ({"users": [{"name": "u", "password_env": "NOPE_NOT_SET"}]}, r"\$NOPE_NOT_SET is not set"),
        (
            {"machines": [{"id": "m"}], "devices": [{"model": "X", "ids": ["system-m"]}]},
            "taken by the systems' own Redfish blocks",
        ),
        ({"mockup": "/nonexistent-mockup"}, "no index.json"),
        ({"mockup": {"dir": "/tmp"}, "machines": [{"id": "m"}]}, "either mockup or machines"),
        ({"expand": "yes"}, "config.expand: must be true or false"),
    ],
)
def test_bad_emulator_config_says_where(doc: object, message: str) -> None:
    with pytest.raises(config.EmulatorConfigError, match=message):
        config.parse(doc, environ={})
