"""The plugin's checkpoint (version, checksum, boot id, atomic, locked, every kind of corruption)
and CDI specs (names, ids, device nodes, lowest cdiVersion; tests/node/test_cdi_library.py checks
them against the CDI library itself)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent import errors
from agent.model.pci import PciAddress, PciFunction
from agent.node import cdi
from agent.node.checkpoint import (
    COMPLETED,
    STARTED,
    Checkpoint,
    PreparedClaim,
    _checksum,
    boot_id,
)


def claim(uid: str, state: str = COMPLETED) -> PreparedClaim:
    return PreparedClaim(
        uid, "ns", f"c-{uid}", state, [{"pool": "p", "device": "d", "cdi_ids": ["x"]}]
    )


def test_round_trip_and_atomic(tmp_path: Path) -> None:
    cp = Checkpoint(tmp_path / "checkpoint.json", boot="boot-1")
    with cp.locked():
        cp.save({"u1": claim("u1"), "u2": claim("u2", STARTED)})
    loaded = cp.load()
    assert loaded["u1"] == claim("u1")
    assert loaded["u2"].state == STARTED
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".checkpoint-")] == []
    doc = json.loads((tmp_path / "checkpoint.json").read_text())
    assert (doc["version"], doc["boot_id"]) == (1, "boot-1")
    assert len(doc["checksum"]) == 64


def test_entries_of_an_earlier_boot_are_stale(tmp_path: Path) -> None:
    Checkpoint(tmp_path / "c.json", boot="before").save({"u1": claim("u1")})
    after = Checkpoint(tmp_path / "c.json", boot="after")
    assert after.load() == {}
    assert [c.uid for c in after.stale] == ["u1"]


CORRUPT = {
    "half-written": ("{half", "not JSON"),
    "not UTF-8": (b"\xff\xfe{}", "not JSON"),
    "a JSON list": ("[]", "holds a JSON list"),
    "another version": ('{"version": 2, "claims": {}}', "has version 2"),
    "no version": ('{"claims": {}}', "has version None"),
}


def test_corruption_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    Checkpoint(path, boot="b").save({"u1": claim("u1")})
    doc = json.loads(path.read_text())
    doc["claims"]["u1"]["state"] = STARTED  # someone edited it
    path.write_text(json.dumps(doc))
    with pytest.raises(errors.CheckpointError, match="checksum"):
        Checkpoint(path, boot="b").load()


@pytest.mark.parametrize("case", list(CORRUPT))
def test_every_kind_of_unreadable_file_is_a_checkpoint_error(tmp_path: Path, case: str) -> None:
    content, message = CORRUPT[case]
    path = tmp_path / "c.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(errors.CheckpointError, match=message):
        Checkpoint(path, boot="b").load()


@pytest.mark.parametrize(
    "claims", [{"u1": {"uid": "u1", "colour": "red"}}, {"u1": "a string"}, ["u1"]]
)
def test_entries_of_the_wrong_shape_are_a_checkpoint_error(tmp_path: Path, claims: object) -> None:
    """A checksum that matches (written by a program that computes it) over entries this agent
    cannot read: an error, not a TypeError out of the plugin."""
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps({"version": 1, "boot_id": "b", "checksum": _checksum(claims), "claims": claims})
    )
    with pytest.raises(errors.CheckpointError, match="cannot read"):
        Checkpoint(path, boot="b").load()


def test_the_boot_id_is_this_machines(tmp_path: Path) -> None:
    cp = Checkpoint(tmp_path / "c.json")
    assert cp.boot == boot_id()
    assert len(boot_id()) == 36  # a UUID, from /proc/sys/kernel/random/boot_id


def test_without_proc_the_boot_id_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreadable(self: Path) -> str:
        raise PermissionError(13, "denied")

    monkeypatch.setattr(Path, "read_text", unreadable)
    assert boot_id() == "unknown"


def fn(driver: str, group: int = 7) -> PciFunction:
    return PciFunction(
        PciAddress("0000:41:00.0"),
        0x10DE,
        0x20B0,
        0x030200,
        0x10DE,
        0x1533,
        0xA1,
        0,
        "16.0 GT/s PCIe",
        16,
        driver,
        group,
    )


def test_device_nodes_for_nvidia_and_vfio() -> None:
    assert cdi.device_nodes(fn("nvidia"), minor=3) == [
        "/dev/nvidia3",
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/nvidia-uvm-tools",
    ]
    assert cdi.device_nodes(fn("vfio-pci", 42), minor=None) == ["/dev/vfio/42", "/dev/vfio/vfio"]
    with pytest.raises(ValueError, match="no /dev/nvidia<minor>"):
        cdi.device_nodes(fn("nvidia"), minor=None)


def test_spec_names_ids_and_lowest_version(tmp_path: Path) -> None:
    driver = "composable.cohdi.io"
    for uid, version in (
        ("0b9e1c2a-4d3f-4a5b-8c7d-123456789abc", "0.5.0"),  # a UUID starting with a digit
        ("e3b0c442-98fc-4c14-9afb-f4c8996fb924", "0.3.0"),
    ):
        spec = cdi.build(driver, uid, [("gpu-0", ["/dev/nvidia0"], {"A": "1"})])
        assert spec["cdiVersion"] == version
        assert cdi.qualified_ids(spec) == [f"{driver}/gpu={uid}-gpu-0"]
        path = cdi.write(tmp_path, driver, uid, spec)
        assert path.name == f"{driver}-gpu_{uid}.json"
        assert json.loads(path.read_text()) == spec
        cdi.remove(tmp_path, driver, uid)
        cdi.remove(tmp_path, driver, uid)  # idempotent
    assert list(tmp_path.iterdir()) == []
