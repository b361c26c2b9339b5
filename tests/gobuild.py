"""Build a small Go test program (one main.go beside its Python wrapper) against one library from
the Go module proxy, into the cache outside the repository, once per main.go content and library
version: a wrapper module requiring the library, `go mod tidy`, `go build`, landed atomically."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from agent import settings


def build(main: Path, name: str, library: str, version: str) -> Path:
    """The binary `name` built from `main` requiring `library` at `version`. Raises RuntimeError
    with the end of Go's stderr when a step fails."""
    cache = settings.Settings().cache_dir
    digest = hashlib.sha256(main.read_bytes() + version.encode()).hexdigest()[:12]
    out = cache / name / digest / name
    if out.exists():
        return out
    src = out.parent / "src"
    src.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(main, src / "main.go")
    (src / "go.mod").write_text(
        f"module cohdi.local/{name}\n\ngo 1.26.0\n\nrequire {library} {version}\n"
    )
    env = {**os.environ, "GOFLAGS": "-mod=mod"}
    tmp = out.with_name(f".{name}.tmp")
    for args in (["go", "mod", "tidy"], ["go", "build", "-o", str(tmp), "."]):
        done = subprocess.run(args, cwd=src, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed in {src}:\n{done.stderr[-3000:]}")
    tmp.replace(out)  # lands whole: a concurrent or interrupted build never leaves half a binary
    return out
