"""Build tests/cdi/main.go (a CDI spec directory loaded by the library container runtimes use)
into the cache, like tests/kubelet: a wrapper module requiring `LIBRARY` at `VERSION` from the Go
module proxy, `go mod tidy`, `go build`. `check(dir, names)` runs it and returns its JSON report.

`VERSION` is the newest release the proxy served when this was written
(`go list -m -versions tags.cncf.io/container-device-interface`: ... v1.1.0 v1.1.1 v1.1.2); its
go.mod requires `tags.cncf.io/container-device-interface/specs-go` v1.1.1, where the version rules
live (`specs-go/version.go`)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests import gobuild

MAIN = Path(__file__).with_name("main.go")
LIBRARY = "tags.cncf.io/container-device-interface"
VERSION = "v1.1.2"


def build() -> Path:
    """The cdi-check binary, built once per main.go content and library version."""
    return gobuild.build(MAIN, "cdi-check", LIBRARY, VERSION)


def check(binary: Path, spec_dir: Path, names: Iterable[str]) -> dict[str, Any]:
    """Load `spec_dir` with the library's cache and resolve each qualified device name.
    Returns {"library", "accepted": [path], "rejected": {path: [error]},
    "resolved": {name: path or ""}, "required": {path: lowest cdiVersion}}."""
    done = subprocess.run(
        [str(binary), "-dir", str(spec_dir)],
        input="".join(f"{n}\n" for n in names),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"cdi-check failed: {done.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    return report
