"""The unit files in systemd/ as systemd itself reads them, offline (no systemd as PID 1 needed):

- `systemd-analyze verify` passes with an EMPTY stderr: it exits 0 on unknown keys, sections and
  bad values (it only prints "..., ignoring" on stderr), so stderr is the check; a unit with a
  bad key proves the check sees it.
- `systemd-analyze security --offline=yes` scores the node unit ≤ 5.0 and the cluster-only unit
  ≤ 3.0 (lower is better; "OK" is below 4.0 in systemd's own words).
- the tmpfiles entry creates exactly the directories the node unit's ReadWritePaths= need.
- every COHDI_* variable the units and the example environment file set is a real setting.

Both commands run against a scratch root (`--root`): our units, a stand-in for the venv's
`cohdi-agent` (verify checks that ExecStart= is executable) and a copy of the machine's own
system units (verify resolves the targets ours are ordered after).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent import settings

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
NODE_UNIT = "cohdi-agent.service"
CLUSTER_UNIT = "cohdi-agent-cluster.service"
EXEC = "/opt/cohdi-agent/venv/bin/cohdi-agent"


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return tool


@pytest.fixture
def scratch_root(tmp_path: Path) -> Path:
    """A root with the machine's system units, ours in /etc/systemd/system, and the ExecStart."""
    _analyze()
    root = tmp_path / "root"
    system = Path("/usr/lib/systemd/system")
    if not system.is_dir():
        pytest.skip(f"{system} is missing: no systemd units on this machine to resolve against")
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in (NODE_UNIT, CLUSTER_UNIT):
        shutil.copy(UNITS / unit, root / "etc/systemd/system" / unit)
    exe = root / EXEC.lstrip("/")
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return root


def analyze(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_analyze(), *args, f"--root={root}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("unit", [NODE_UNIT, CLUSTER_UNIT])
def test_verify_passes_with_empty_stderr(scratch_root: Path, unit: str) -> None:
    done = analyze(scratch_root, "verify", unit)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


def test_verify_stderr_catches_what_its_exit_status_does_not(scratch_root: Path) -> None:
    unit = scratch_root / "etc/systemd/system" / NODE_UNIT
    unit.write_text(
        unit.read_text().replace("UMask=0077\n", "UMask=0077\nProtectSystem=stricter\nBogus=1\n")
    )
    done = analyze(scratch_root, "verify", NODE_UNIT)
    print(f"\nverify of a broken unit: exit {done.returncode}, stderr:\n{done.stderr}")
    assert "Unknown key 'Bogus'" in done.stderr
    assert "stricter" in done.stderr


@pytest.mark.parametrize(("unit", "limit"), [(NODE_UNIT, 5.0), (CLUSTER_UNIT, 3.0)])
def test_security_exposure(scratch_root: Path, unit: str, limit: float) -> None:
    done = analyze(scratch_root, "security", "--offline=yes", "--no-pager", unit)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", done.stdout)
    assert found, done.stdout + done.stderr
    score = float(found.group(1))
    print(f"\n{unit}: exposure {score} {found.group(2)} (limit {limit})")
    assert score <= limit, done.stdout


def test_tmpfiles_create_the_node_units_writable_directories(tmp_path: Path) -> None:
    tool = shutil.which("systemd-tmpfiles")
    if tool is None:
        pytest.skip("systemd-tmpfiles is not installed (Debian: apt-get install systemd)")
    done = subprocess.run(
        [tool, f"--root={tmp_path}", "--create", str(UNITS / "cohdi-agent.tmpfiles")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    writable = _values(UNITS / NODE_UNIT, "ReadWritePaths")
    outside_sys = {p for p in writable if not p.startswith("/sys/")}
    kubelet = "/var/lib/kubelet"
    assert outside_sys == {f"{kubelet}/plugins_registry", f"{kubelet}/plugins", "/run/cdi"}
    for path in outside_sys:
        assert (tmp_path / path.lstrip("/")).is_dir(), path


def test_units_and_environment_file_name_real_settings() -> None:
    known = {info.env for info in settings.describe()}
    names: set[str] = set()
    for unit in (NODE_UNIT, CLUSTER_UNIT):
        names |= {v.split("=", 1)[0] for v in _values(UNITS / unit, "Environment")}
    env_file = (UNITS / "cohdi-agent.env").read_text()
    names |= set(re.findall(r"^#?(COHDI_[A-Z0-9_]+)=", env_file, flags=re.MULTILINE))
    assert names - known == set(), "not settings (see `cohdi-agent run --help`)"
    assert len(names) >= 10
    defaults = {info.env: info.default for info in settings.describe()}
    kubelet = defaults["COHDI_NODE_KUBELET_DIR"]
    writable = _values(UNITS / NODE_UNIT, "ReadWritePaths")
    assert {f"{kubelet}/plugins_registry", f"{kubelet}/plugins"} <= set(writable)
    cdi = [v for v in _values(UNITS / NODE_UNIT, "Environment") if "COHDI_NODE_CDI_DIR" in v]
    assert cdi == ["COHDI_NODE_CDI_DIR=/run/cdi"]


def _values(unit: Path, key: str) -> list[str]:
    """Every space-separated value of `key=` lines in `unit`."""
    out: list[str] = []
    for line in unit.read_text().splitlines():
        if line.startswith(f"{key}="):
            out += line.split("=", 1)[1].split()
    return out
