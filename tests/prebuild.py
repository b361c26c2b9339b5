"""Build the suite's small Go test programs before pytest starts: `python -m tests.prebuild`.

`./dev test` runs this after `cohdi-agent dev-cluster build`, so on a fresh machine their builds
(minutes each: kubelet's DRA plugin manager of two Kubernetes releases, kubelet's plugin-side
client, the CDI library's checker, Prometheus' linter) are shown as progress and done once, one
after another, instead of inside whichever fast-tier test first needs one — where parallel
workers would build the same program at the same time and the tier's time would include them.
Each builder keeps its own cache key (the program's source and library version), so this is a
no-op when everything is cached. Exits 1 naming the program whose build failed."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests import cdi, kubelet, promlint


def programs() -> list[tuple[str, Callable[[], Path]]]:
    return [
        ("kubelet's DRA plugin manager (1.36)", kubelet.build_manager),
        (
            "kubelet's DRA plugin manager (1.37)",
            lambda: kubelet.build_manager(kubelet.KUBERNETES_1_37, kubelet.MANAGER_1_37),
        ),
        ("kubelet's plugin client", kubelet.build),
        ("the CDI library's checker", cdi.build),
        ("Prometheus' metric linter", promlint.build),
    ]


def main() -> int:
    for what, build in programs():
        started = time.monotonic()
        try:
            path = build()
        except (RuntimeError, OSError) as exc:
            print(f"prebuild: {what}: {exc}", file=sys.stderr)
            return 1
        took = time.monotonic() - started
        if took > 1:
            print(f"prebuild: {what} built in {took:.0f} s ({path})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
