"""The stub NVML library is compiled into the cache directory it is given, never beside its source
(an installed package may be read-only), and a missing compiler is a clear DevClusterError."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import errors
from agent.simulated import stubnvml


def _listing(directory: Path) -> set[str]:
    return {
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if "__pycache__" not in p.parts
    }


def test_builds_into_the_cache_dir_once(tmp_path: Path) -> None:
    package = stubnvml.SOURCE.parent
    before = _listing(package)
    out = stubnvml.build(tmp_path)
    assert out.parent.parent == tmp_path
    assert out.name == "libnvidia-ml.so.1"
    assert out.read_bytes().startswith(b"\x7fELF")
    assert _listing(tmp_path) == {out.parent.name, f"{out.parent.name}/{out.name}"}  # no temp left
    assert _listing(package) == before
    mtime = out.stat().st_mtime_ns
    assert stubnvml.build(tmp_path) == out
    assert out.stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_no_compiler_is_a_devcluster_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(errors.DevClusterError, match="no C compiler"):
        stubnvml.build(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_failed_compile_is_a_devcluster_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cc = bin_dir / "cc"
    cc.write_text("#!/bin/sh\necho 'stub_nvml.c:1: error: no' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(errors.DevClusterError, match=r"failed \(1\): stub_nvml.c:1: error: no"):
        stubnvml.build(tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
