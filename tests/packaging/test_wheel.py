"""The built wheel is the product: build it from the tracked source (as a clean clone would), check
it carries every file the code reads at run time, install it into a fresh virtual environment
(first without extras, then with `[demo]`) and run `cohdi-agent demo` from there.

The wheel is built by `python -m pip wheel --no-deps` with build isolation (setuptools, wheel and
cffi come from the registry or the pip cache; the build compiles the C scan through cffi_modules in
setup.py). The fresh venv installs the wheel's dependencies the same way. Nothing here uses the
repository's own .venv: the interpreter running pytest only builds the wheel and makes the venv.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import __version__, settings

ROOT = Path(__file__).resolve().parents[2]

#: Child processes see no trace of the environment pytest runs in (its venv, its sys.path).
_DROP = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PIP_REQUIRE_VIRTUALENV")


def _tracked_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files of the working tree (what a commit of it holds;
    no build/ leftovers, no locally compiled .so)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    return sorted({f for f in out.stdout.decode().split("\0") if f and (ROOT / f).is_file()})


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel from a copy of the tracked source tree; returns the .whl path."""
    src = tmp_path_factory.mktemp("src")
    for rel in _tracked_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel, follow_symlinks=False)
    dist = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(src)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (whl,) = dist.glob("cohdi_agent-*.whl")
    return whl


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return {**env, **extra}


def _wheel_names(whl: Path) -> set[str]:
    with zipfile.ZipFile(whl) as z:
        return set(z.namelist())


def _package_data() -> dict[str, list[str]]:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data: dict[str, list[str]] = doc["tool"]["setuptools"]["package-data"]
    return data


def _files_named_beside_modules() -> set[str]:
    """Data files the code opens relative to its own module: `Path(__file__).with_name("x")` and
    `Path(__file__).parent / "x"`, as wheel paths (agent/.../x)."""
    found: set[str] = set()
    for path in (ROOT / "agent").rglob("*.py"):
        here = path.parent.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not any(isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(node)):
                continue
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "with_name"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                found.add(f"{here}/{node.args[0].value}")
            elif (
                isinstance(node, ast.BinOp)
                and isinstance(node.op, ast.Div)
                and isinstance(node.right, ast.Constant)
                and isinstance(node.right.value, str)
            ):
                found.add(f"{here}/{node.right.value}")
    return found


def test_wheel_carries_every_file_the_code_reads(wheel: Path) -> None:
    names = _wheel_names(wheel)
    tracked = _tracked_files()

    # every package-data pattern names at least one file (none names a missing one)
    for package, patterns in _package_data().items():
        base = package.replace(".", "/")
        for pattern in patterns:
            matches = [f for f in tracked if fnmatch.fnmatch(f, f"{base}/{pattern}")]
            assert matches, f"package-data {package}: {pattern!r} matches no file"
            assert set(matches) <= names, f"{package}: {pattern!r} files not in the wheel"

    # every file the code opens beside its module ships
    beside = _files_named_beside_modules()
    assert "agent/simulated/stubnvml/stub_nvml.c" in beside  # the scan sees through the code
    assert beside <= names, sorted(beside - names)

    # every tracked file under agent/ ships (Python and data alike), plus the compiled C scan
    assert {f for f in tracked if f.startswith("agent/")} - names == set()
    assert any(n.startswith("agent/native/_scan.") and n.endswith(".so") for n in names)
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


@pytest.fixture
def venv(tmp_path: Path) -> Iterator[Path]:
    """A fresh virtual environment (no system site-packages) made from the base interpreter."""
    path = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _in_venv(
    venv: Path, *args: str, cwd: Path, timeout: float = 600, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run a command of the venv (`cohdi-agent ...`, `python ...`) away from the source tree."""
    exe = venv / "bin" / args[0]
    path = f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(
        [str(exe), *args[1:]],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(PATH=path, VIRTUAL_ENV=str(venv), **env),
        timeout=timeout,
        check=False,
    )


def _package_files(venv: Path) -> set[str]:
    (site,) = venv.glob("lib/python3*/site-packages")
    return {
        p.relative_to(site).as_posix()
        for p in (site / "agent").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.mark.controlplane
def test_installed_wheel_runs_the_demo(
    wheel: Path, venv: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    work = tmp_path / "work"  # cwd of every command: the source tree is not importable from here
    work.mkdir()

    # --- without extras: what `cohdi-agent run` needs, nothing more ------------------------------
    installed = _in_venv(venv, "python", "-m", "pip", "install", "--quiet", str(wheel), cwd=work)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    where = _in_venv(venv, "python", "-c", "import agent; print(agent.__file__)", cwd=work)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr

    version = _in_venv(venv, "cohdi-agent", "version", cwd=work)
    assert version.returncode == 0, version.stderr
    assert f"cohdi-agent {__version__}" in version.stdout
    for command in ("run", "fabric-emulator", "demo"):
        helped = _in_venv(venv, "cohdi-agent", command, "--help", cwd=work)
        assert helped.returncode == 0, helped.stderr
        assert f"usage: cohdi-agent {command}" in helped.stdout

    run_path = (
        "import agent.app, agent.controllers.running, agent.fabric.backends, agent.kube.leasing, "
        "agent.node.plugin, agent.node.reporting, agent.native.scanning, agent.native.nvml"
    )
    imported = _in_venv(venv, "python", "-c", run_path, cwd=work)
    assert imported.returncode == 0, imported.stderr
    missing = _in_venv(venv, "python", "-c", "import cryptography", cwd=work)
    assert missing.returncode != 0, "cryptography came with the runtime dependencies"
    emulator = _in_venv(venv, "cohdi-agent", "fabric-emulator", cwd=work, timeout=60)
    assert emulator.returncode == 1
    assert "Traceback" not in emulator.stderr
    assert "pip install 'cohdi-agent[demo]'" in emulator.stderr

    # --- with [demo]: the demo, start to finish, from the installed package ----------------------
    with_demo = _in_venv(
        venv, "python", "-m", "pip", "install", "--quiet", f"{wheel}[demo]", cwd=work
    )
    assert with_demo.returncode == 0, with_demo.stdout + with_demo.stderr
    before = _package_files(venv)
    cache = settings.Settings().cache_dir  # the Go builds of the control plane, shared
    # short: each simulated node's plugin socket lives under it (unix socket paths < 108 bytes)
    state = Path(tempfile.mkdtemp(prefix="whl-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(state, ignore_errors=True))
    demo = _in_venv(
        venv,
        "cohdi-agent",
        "demo",
        "--pods",
        "4",
        "--duration",
        "8",
        "--dev-cache-dir",
        str(cache),
        "--dev-state-dir",
        str(state / "dev-cluster"),
        cwd=work,
        timeout=420,
    )
    logs = "\n".join(
        f"--- {log.name}\n{log.read_text()[-3000:]}"
        for log in sorted((state / "demo" / "logs").glob("*.log"))
    )
    report = f"rc={demo.returncode}\n{demo.stdout}\n{demo.stderr}\n{logs}"
    print(demo.stdout)  # shown with -s or on failure
    assert demo.returncode == 0, report
    assert "4 of 4 pods bound in one scheduling cycle each" in demo.stdout, report
    assert "fabric, API server and node checkpoints agree on all" in demo.stdout, report
    assert "install cohdi-agent[plot] for the timeline plot" in demo.stdout, report
    assert "Traceback" not in demo.stdout + demo.stderr, report
    assert "stopped every process" in demo.stdout, report

    # the stub NVML was compiled into the cache directory, not into the installed package
    assert list(cache.glob("stub-nvml-*/libnvidia-ml.so.1"))
    assert _package_files(venv) == before
