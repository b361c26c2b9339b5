"""Build tests/promlint/main.go (Prometheus's text parser and the linter `promtool check metrics`
runs) into the cache, like tests/cdi: a wrapper module requiring `LIBRARY` at `VERSION` from the
Go module proxy, `go mod tidy`, `go build`. `lint(text)` runs it on an exposition.

promtool itself lives in github.com/prometheus/prometheus (a build of minutes and hundreds of
modules); its `check metrics` is `promlint.New(stdin).Lint()` from client_golang, which is what
this builds. `VERSION` is a release the proxy serves
(`go list -m -versions github.com/prometheus/client_golang`: ... v1.23.0 v1.23.1 v1.23.2)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests import gobuild

MAIN = Path(__file__).with_name("main.go")
LIBRARY = "github.com/prometheus/client_golang"
VERSION = "v1.23.2"


def build() -> Path:
    """The promlint binary, built once per main.go content and library version."""
    return gobuild.build(MAIN, "promlint", LIBRARY, VERSION)


def lint(binary: Path, exposition: str) -> dict[str, Any]:
    """{"library", "families": N, "problems": ["<metric>: <text>"]}; raises AssertionError
    with the parser's message when the exposition does not parse."""
    done = subprocess.run(
        [str(binary)], input=exposition, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"Prometheus's text parser refused the exposition: {done.stderr}")
    report: dict[str, Any] = json.loads(done.stdout)
    return report
