"""The native PCI scan (C, cffi API mode) against synthetic trees and the real /sys: the same
answer as the pure-Python scan, errors reported per function, never swallowed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent import errors
from agent.native import scanning
from agent.simulated.sysfs import add_function, tree


def by_address(fns: list) -> dict:  # type: ignore[type-arg]
    return {f.address: f for f in fns}


def test_native_module_is_built() -> None:
    assert scanning.native_available(), "the package build must compile agent.native._scan"


def test_c_and_python_agree_on_a_synthetic_tree(tmp_path: Path) -> None:
    tree(tmp_path, 256)
    c, py = (
        by_address(scanning.scan_c(str(tmp_path))),
        by_address(scanning.scan_python(str(tmp_path))),
    )
    assert len(c) == 256
    assert c == py
    gpu = c["0000:00:00.0"]
    assert (gpu.vendor, gpu.device, gpu.class_code) == (0x10DE, 0x20B0, 0x030200)
    assert gpu.is_gpu
    assert (gpu.subsystem_vendor, gpu.subsystem_device, gpu.revision) == (0x10DE, 0x1533, 0xA1)
    assert gpu.driver == "nvidia"
    assert gpu.link_speed == ""  # i == 0: no link files
    assert gpu.link_width == -1
    assert gpu.iommu_group == -1  # i % 7 == 0
    other = c["0000:00:01.0"]
    assert (other.link_speed, other.link_width, other.iommu_group, other.numa_node) == (
        "16.0 GT/s PCIe",
        16,
        1,
        1,
    )
    assert not other.is_gpu
    assert all(f.error == "" for f in c.values())


def test_more_functions_than_the_first_buffer(tmp_path: Path) -> None:
    tree(tmp_path, 700)
    assert len(scanning.scan_c(str(tmp_path))) == 700


def test_errors_are_reported_per_function(tmp_path: Path) -> None:
    add_function(tmp_path, "0000:01:00.0")
    broken = add_function(tmp_path, "0000:02:00.0")
    (broken / "vendor").unlink()
    weird = add_function(tmp_path, "0000:03:00.0")
    (weird / "device").unlink()
    (weird / "device").mkdir()  # read() gives EISDIR
    for fns in (scanning.scan_c(str(tmp_path)), scanning.scan_python(str(tmp_path))):
        found = by_address(fns)
        assert found["0000:01:00.0"].error == ""
        assert found["0000:02:00.0"].error == "vendor: No such file or directory"
        assert found["0000:03:00.0"].error == "device: Is a directory"


def test_missing_tree_is_a_sysfs_error(tmp_path: Path) -> None:
    for scan in (scanning.scan_c, scanning.scan_python):
        with pytest.raises(errors.SysfsError, match="bus/pci/devices"):
            scan(str(tmp_path / "nothing"))


@pytest.mark.skipif(
    not Path("/sys/bus/pci/devices").is_dir(), reason="no /sys/bus/pci on this machine"
)
def test_real_sys_matches_python() -> None:
    c = by_address(scanning.scan_c("/sys"))
    assert c
    assert c == by_address(scanning.scan_python("/sys"))
    assert all(f.vendor for f in c.values())


def test_empty_tree(tmp_path: Path) -> None:
    (tmp_path / "bus" / "pci" / "devices").mkdir(parents=True)
    assert scanning.scan_c(str(tmp_path)) == []
    shutil.rmtree(tmp_path / "bus")
