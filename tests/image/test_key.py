"""The image's cache key (`agent.devcluster.image.source_key`) follows exactly what goes into the
image: a change to the agent's code or the build files rebuilds; caches, compiled objects and
files outside the context do not."""

from __future__ import annotations

import shutil
from pathlib import Path

from agent.devcluster import image


def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for rel in ("pyproject.toml", "setup.py", "README.md", "packaging/image/Containerfile"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"{rel}\n")
    (root / "agent/native").mkdir(parents=True)
    (root / "agent/__init__.py").write_text("")
    (root / "agent/native/_build_scan.py").write_text("# C\n")
    return root


def test_the_key_changes_with_the_code_and_the_build_files(tmp_path: Path) -> None:
    root = tree(tmp_path)
    first = image.source_key(root)
    assert image.source_key(root) == first
    (root / "agent/native/_build_scan.py").write_text("# C, changed\n")
    second = image.source_key(root)
    assert second != first
    (root / "agent/new.py").write_text("")
    third = image.source_key(root)
    assert third != second
    (root / "packaging/image/Containerfile").write_text("FROM other\n")
    assert image.source_key(root) != third


def test_caches_compiled_objects_and_other_files_do_not_change_the_key(tmp_path: Path) -> None:
    root = tree(tmp_path)
    before = image.source_key(root)
    (root / "agent/__pycache__").mkdir()
    (root / "agent/__pycache__/x.cpython-311.pyc").write_bytes(b"\0")
    (root / "agent/native/_scan.abi3.so").write_bytes(b"\x7fELF")
    (root / "agent/native/_scan.o").write_bytes(b"\0")
    (root / "tests").mkdir()
    (root / "tests/test_x.py").write_text("")
    (root / "packaging/helm").mkdir()
    (root / "packaging/helm/values.yaml").write_text("")
    assert image.source_key(root) == before
    assert "agent/native/_scan.abi3.so" not in image.source_files(root)


def test_the_context_copy_has_the_key_of_its_source(tmp_path: Path) -> None:
    root = tree(tmp_path)
    (root / "agent/native/_scan.abi3.so").write_bytes(b"\x7fELF")
    context = tmp_path / "context"
    image._assemble_context(root, context)
    assert image.source_key(context) == image.source_key(root)
    assert not (context / "agent/native/_scan.abi3.so").exists()
    shutil.rmtree(context)


def test_the_wheelhouse_holds_what_pyproject_requires() -> None:
    build, run = image.requirements(image.repo_root())
    assert any(r.startswith("cffi") for r in build)
    assert any(r.startswith("setuptools") for r in build)
    assert any(r.startswith("grpcio") for r in run)
    assert any(r.startswith("cryptography") for r in run), "fabric-emulator needs the demo extra"
