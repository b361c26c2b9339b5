"""Generate agent/_proto/ from the .proto files under proto/ (the only way that code is made).

    python proto/generate.py           # write agent/_proto/**/api_pb2*.py
    python proto/generate.py --check   # exit 1 if regenerating would change anything

Protos live at proto/agent/_proto/<api>/<version>/api.proto, so the generated modules import
each other as `agent._proto...` and every file keeps its upstream `package` (the wire paths).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def protos() -> list[Path]:
    return sorted(HERE.rglob("*.proto"))


def generate(out: Path) -> None:
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    for proto in protos():
        rel = proto.relative_to(HERE)
        rc = protoc.main(
            [
                "protoc",
                f"-I{HERE}",
                f"-I{include}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                f"--pyi_out={out}",
                str(rel),
            ]
        )
        if rc != 0:
            sys.exit(f"protoc failed on {rel}")
    for d in {p.parent for p in out.rglob("*_pb2.py")}:
        for parent in [d, *d.parents]:
            if parent == out:
                break
            (parent / "__init__.py").touch()


def generated(root: Path) -> set[Path]:
    base = root / "agent" / "_proto"
    return {
        p.relative_to(root)
        for p in base.rglob("*")
        if p.is_file()
        and p.suffix in (".py", ".pyi")
        and "__pycache__" not in p.parts
        and p.name != "__init__.py"
        or p.name == "__init__.py"
        and p.parent != base
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        fresh = generated(out)
        if args.check:
            stale = sorted(
                str(p)
                for p in fresh
                if not (REPO / p).exists() or not filecmp.cmp(out / p, REPO / p, shallow=False)
            )
            extra = sorted(str(p) for p in generated(REPO) - fresh)
            if stale or extra:
                sys.exit(f"agent/_proto is stale (run python proto/generate.py): {stale + extra}")
            print("agent/_proto is up to date")
            return
        for p in fresh:
            (REPO / p).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / p, REPO / p)
        for p in generated(REPO) - fresh:
            (REPO / p).unlink()
        print(f"wrote {len(fresh)} files under agent/_proto")


if __name__ == "__main__":
    main()
