"""Our CDI specs through the library container runtimes load them with
(tags.cncf.io/container-device-interface, tests/cdi/main.go built from the Go module proxy):
specs the plugin writes for claim UIDs drawn like real ones are all accepted and every device
resolves; our cdiVersion rules give exactly the library's minimum for every feature it knows, and
one version lower is refused; our name checks agree with the library's."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.node import cdi
from tests import cdi as cdicheck
from tests.node.simnode import DRIVER, make_node

CLAIMS = 1000
#: claims prepared at once: as many as the node has GPUs (8), as on a busy node
BATCH = 8


@pytest.fixture(scope="module")
def checker() -> Path:
    return cdicheck.build()


async def test_library_accepts_the_plugins_specs_for_real_claim_uids(
    checker: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,000 claims with uuid4 UIDs (a UUID starts with a digit about 10 times in 16, which needs
    cdiVersion 0.5.0), prepared by the real Preparer: GPUs bound to nvidia and to vfio-pci
    (passthrough), claims of one and of two devices.

    fsync is what keeps the checkpoint and the specs through a power cut; this test is about
    what they say, and on a disk the ~5,000 fsyncs of 1,000 prepares and unprepares would wait
    ~20 s, so here they return at once (the writes, renames and locks are the real ones)."""
    monkeypatch.setattr(os, "fsync", lambda _fd: None)
    node = make_node(tmp_path, monkeypatch)
    fabric_ids = [f"gpu-{i:02d}" for i in range(8)]
    for i, fid in enumerate(fabric_ids):
        vfio = i % 2 == 1
        await node.attach(
            fid,
            f"0000:{0x41 + i:02x}:00.0",
            minor=i,
            driver="vfio-pci" if vfio else "nvidia",
            iommu_group=100 + i,
            in_nvml=not vfio,
        )
    await node.reporter.nvml.start()
    kept = tmp_path / "all-specs"
    kept.mkdir()
    try:
        preparer = node.preparer()
        uids: list[str] = []
        expected: dict[str, str] = {}  # qualified name -> the spec file it must resolve to
        # Over the node's life, BATCH claims at a time: each batch is prepared, its spec files
        # are kept for the library, then it is unprepared (pods end), as on a real node.
        for start in range(0, CLAIMS, BATCH):
            batch = []
            for i in range(start, start + BATCH):
                devices = [fabric_ids[i % 8]] + ([] if i % 3 else [fabric_ids[(i + 3) % 8]])
                uid = node.claim(f"claim-{i}", devices)["metadata"]["uid"]
                batch.append(uid)
                for d in await preparer.prepare("default", uid, f"claim-{i}"):
                    (qualified,) = d["cdi_ids"]
                    expected[qualified] = str(kept / cdi.file_name(DRIVER, uid))
            for path in (tmp_path / "cdi").iterdir():
                shutil.copyfile(path, kept / path.name)
            for uid in batch:
                await preparer.unprepare(uid)
            assert list((tmp_path / "cdi").iterdir()) == []
            uids += batch
    finally:
        await node.reporter.nvml.close()

    report = await asyncio.to_thread(cdicheck.check, checker, kept, expected)
    assert report["library"] == f"{cdicheck.LIBRARY}@{cdicheck.VERSION}"
    assert report["rejected"] == {}
    assert len(report["accepted"]) == CLAIMS
    assert report["resolved"] == expected

    assert all(uuid.UUID(u).version == 4 for u in uids)
    leading_digit = sum(u[0].isdigit() for u in uids)
    assert 0 < leading_digit < CLAIMS  # both kinds of name are in the sample
    specs = [json.loads(p.read_text()) for p in kept.glob("*.json")]
    assert len(specs) == CLAIMS
    assert {s["cdiVersion"] for s in specs} == {"0.3.0", "0.5.0"}
    vfio_nodes = {
        n["path"]
        for s in specs
        for d in s["devices"]
        for n in d["containerEdits"]["deviceNodes"]
        if n["path"].startswith("/dev/vfio/")
    }
    assert "/dev/vfio/vfio" in vfio_nodes  # the passthrough variant is in the sample


def _spec(name: str = "", **edits: Any) -> dict[str, Any]:
    """A one-device spec; a device name of its own (the cache refuses a name two specs share)."""
    name = name or f"claim-{uuid.uuid4().hex[:8]}-gpu-0"
    return {
        "kind": cdi.kind(DRIVER),
        "devices": [
            {
                "name": name,
                "containerEdits": {"env": ["A=1"], "deviceNodes": [{"path": "/dev/x"}], **edits},
            }
        ],
    }


def _feature_specs() -> dict[str, dict[str, Any]]:
    """One spec per rule of specs-go/version.go (and combinations), before its cdiVersion."""
    out: dict[str, dict[str, Any]] = {
        "plain": _spec(),
        "digit-name": _spec(f"{uuid.uuid4().int % 10}{uuid.uuid4()}-gpu-0"),
        "host-path": _spec(deviceNodes=[{"path": "/dev/x", "hostPath": "/dev/y"}]),
        "mount-type": _spec(mounts=[{"hostPath": "/a", "containerPath": "/b", "type": "bind"}]),
        "mount-untyped": _spec(mounts=[{"hostPath": "/a", "containerPath": "/b"}]),
        "device-annotations": _spec(),
        "spec-annotations": _spec(),
        "class-with-dot": _spec(),
        "additional-gids": _spec(additionalGids=[44]),
        "intel-rdt": _spec(intelRdt={"closID": "c1"}),
        "intel-rdt-schemata": _spec(intelRdt={"schemata": ["L3:0=ff"]}),
        "intel-rdt-monitoring": _spec(intelRdt={"enableMonitoring": True}),
        "net-devices": _spec(netDevices=[{"hostInterfaceName": "eth1", "name": "net1"}]),
        "spec-level-gids": _spec(),
        "digit-and-annotations": _spec(f"1{uuid.uuid4()}-gpu-0"),
    }
    out["device-annotations"]["devices"][0]["annotations"] = {"cohdi.io/x": "y"}
    out["spec-annotations"]["annotations"] = {"cohdi.io/x": "y"}
    out["digit-and-annotations"]["annotations"] = {"cohdi.io/x": "y"}
    out["class-with-dot"]["kind"] = f"{DRIVER}/gpu.a100"
    out["spec-level-gids"]["containerEdits"] = {"additionalGids": [44]}
    return out


VERSIONS = ["0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0"]


def test_version_rules_are_the_librarys(checker: Path, tmp_path: Path) -> None:
    """Each feature's spec declares our minimum_version: the library accepts it and computes the
    same minimum; declared one release lower, it is refused."""
    ok, low = tmp_path / "ok", tmp_path / "low"
    ok.mkdir()
    low.mkdir()
    ours: dict[str, str] = {}
    for feature, body in _feature_specs().items():
        version = cdi.minimum_version(body)
        ours[feature] = version
        (ok / f"{feature}.json").write_text(json.dumps({"cdiVersion": version, **body}))
        if version != cdi.EARLIEST:
            lower = VERSIONS[VERSIONS.index(version) - 1]
            (low / f"{feature}.json").write_text(json.dumps({"cdiVersion": lower, **body}))
    assert ours == {
        "plain": "0.3.0",
        "digit-name": "0.5.0",
        "host-path": "0.5.0",
        "mount-type": "0.4.0",
        "mount-untyped": "0.3.0",
        "device-annotations": "0.6.0",
        "spec-annotations": "0.6.0",
        "class-with-dot": "0.6.0",
        "additional-gids": "0.7.0",
        "intel-rdt": "0.7.0",
        "intel-rdt-schemata": "1.1.0",
        "intel-rdt-monitoring": "1.1.0",
        "net-devices": "1.1.0",
        "spec-level-gids": "0.7.0",
        "digit-and-annotations": "0.6.0",
    }

    accepted = cdicheck.check(checker, ok, [])
    assert accepted["rejected"] == {}
    assert {Path(p).stem: v for p, v in accepted["required"].items()} == ours

    refused = cdicheck.check(checker, low, [])
    assert refused["accepted"] == []
    assert sorted(Path(p).stem for p in refused["rejected"]) == sorted(
        f for f, v in ours.items() if v != cdi.EARLIEST
    )
    for path, errs in refused["rejected"].items():
        assert any(f"must be at least v{ours[Path(path).stem]}" in e for e in errs), errs


NAMES = {
    # (vendor, device name): valid for the library?
    ("composable.cohdi.io", "0b9e1c2a-gpu-0"): True,
    ("composable.cohdi.io", "a"): True,
    ("composable.cohdi.io", "7"): True,
    ("composable.cohdi.io", "x:y_z.w"): True,
    ("composable.cohdi.io", "gpu-"): False,
    ("composable.cohdi.io", "-gpu"): False,
    ("composable.cohdi.io", "gpu/0"): False,
    ("composable.cohdi.io", "gpu 0"): False,
    ("9lives.example.com", "gpu-0"): False,
    ("e", "gpu-0"): True,
    ("example.com.", "gpu-0"): False,
    ("ex:ample.com", "gpu-0"): False,
}


def test_name_checks_agree_with_the_library(checker: Path, tmp_path: Path) -> None:
    for i, ((vendor, name), valid) in enumerate(NAMES.items()):
        body = _spec(name)
        body["kind"] = f"{vendor}/gpu"
        spec = {"cdiVersion": "1.1.0", **body}
        (tmp_path / f"{i}.json").write_text(json.dumps(spec))
        if valid:
            cdi.check_names(spec)
        else:
            with pytest.raises(ValueError, match="is not valid"):
                cdi.check_names(spec)
    report = cdicheck.check(checker, tmp_path, [])
    library = {int(Path(p).stem) for p in report["accepted"]}
    assert library == {i for i, valid in enumerate(NAMES.values()) if valid}


def test_build_refuses_names_the_library_would_refuse() -> None:
    with pytest.raises(ValueError, match=re.escape("vendor '9lives.example.com'")):
        cdi.build("9lives.example.com", str(uuid.uuid4()), [("gpu-0", ["/dev/x"], {"A": "1"})])
    uid = "0b9e1c2a-4d3f-4a5b-8c7d-123456789abc"
    spec = cdi.build(DRIVER, uid, [("gpu-0", ["/dev/x"], {})])
    assert spec["cdiVersion"] == "0.5.0"
    assert cdi.qualified_ids(spec) == [f"{DRIVER}/gpu={uid}-gpu-0"]
