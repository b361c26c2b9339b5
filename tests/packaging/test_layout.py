"""What the package is made of, read from the source tree (no wheel build): product code does not
import test code, and the modules `cohdi-agent run` needs import without the optional extras."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "agent"

#: Optional dependencies and the extra that installs each (pyproject.toml's optional-dependencies).
EXTRA_MODULES = {"cryptography": "demo", "matplotlib": "plot"}


def _block(modules: list[str]) -> str:
    """Code for a child interpreter in which `modules` (and their submodules) fail to import, as
    on a machine where the extras that install them were not asked for."""
    return f"""
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {sorted(modules)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""


#: `pip install cohdi-agent` without any extra.
BLOCK = _block(list(EXTRA_MODULES))


def _imported_modules(path: Path) -> set[str]:
    """Every module an `import` / `from ... import` in `path` names, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _product_modules() -> list[Path]:
    return sorted(
        p
        for p in AGENT.rglob("*.py")
        if "testing" not in p.relative_to(AGENT).parts[:1] and "_proto" not in p.parts
    )


def test_product_code_does_not_import_test_code() -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            m for m in _imported_modules(p) if (m + ".").startswith("agent.testing.")
        )
        for p in _product_modules()
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(offenders) > 50  # the walk found the package


def _child(code: str, *args: str, block: str = BLOCK) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", block + code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_run_path_imports_without_extras() -> None:
    """`cohdi-agent run` (both roles) needs only the runtime dependencies."""
    modules = [
        "agent.app",
        "agent.cli",
        "agent.kube.client",
        "agent.kube.leasing",
        "agent.controllers.running",
        "agent.controllers.metrics",
        "agent.fabric.backends",
        "agent.node.plugin",
        "agent.node.reporting",
    ]
    out = _child("import importlib\nfor m in sys.argv[1:]: importlib.import_module(m)", *modules)
    assert out.returncode == 0, out.stderr


def test_every_module_imports_or_names_its_extra() -> None:
    """With the extras missing, a module either imports or raises MissingExtra naming the extra:
    never a bare ModuleNotFoundError for an optional dependency."""
    code = """
import importlib, pkgutil
import agent
from agent import errors
needs = {}
for info in pkgutil.walk_packages(agent.__path__, "agent."):
    try:
        importlib.import_module(info.name)
    except errors.MissingExtra as exc:
        needs[info.name] = exc.extra
print(sorted(needs.items()))
"""
    out = _child(code)
    assert out.returncode == 0, out.stderr
    needs = dict(ast.literal_eval(out.stdout.strip()))
    assert set(needs.values()) <= set(EXTRA_MODULES.values())
    assert "agent.pki" in needs  # the probe did block cryptography
    assert not {m for m in needs if m.startswith(("agent.node", "agent.controllers", "agent.kube"))}


@pytest.mark.parametrize(
    "argv",
    [
        ["fabric-emulator"],
        ["demo", "--pods", "1"],
        ["dev-cluster", "up"],
    ],
)
def test_command_without_its_extra_says_which_extra(argv: list[str], tmp_path: Path) -> None:
    code = "from agent.__main__ import main\nsys.exit(main())"
    out = subprocess.run(
        [sys.executable, "-c", BLOCK + code, *argv, "--dev-cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert "cohdi-agent[demo]" in out.stderr
    assert "cryptography" in out.stderr


def test_demo_plot_without_matplotlib_names_the_plot_extra(tmp_path: Path) -> None:
    code = """
from pathlib import Path
from agent import errors
from agent.demo import running
try:
    running.plot([], 0.0, Path(sys.argv[1]), "t")
except errors.MissingExtra as exc:
    print(exc.extra, exc)
"""
    out = _child(code, str(tmp_path / "timeline.png"), block=_block(["matplotlib"]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("plot ")
    assert "cohdi-agent[plot]" in out.stdout
    assert not (tmp_path / "timeline.png").exists()
