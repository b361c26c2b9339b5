"""Where a `cohdi-agent` process's Python memory goes: run the agent under tracemalloc and, after
a while, write what is allocated, by the package (or agent module, or standard-library module)
that allocated it, to a JSON file; the agent runs on until it is stopped.

Usage: python -m bench.rss_probe OUT.json SECONDS -- <cohdi-agent arguments>

tracemalloc's own bookkeeping costs memory too, so this process's RSS is not the figure; the
split of the traced bytes is. "<frozen importlib...>" is what importing modules costs (code
objects, module dictionaries); the benchmark also reports how many modules were loaded.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any


def _owner(filename: str) -> str:
    if "/agent/" in filename and "site-packages" not in filename:
        rest = filename.rsplit("/agent/", 1)[1]
        return "agent/" + rest.split("/")[0]
    for marker in ("site-packages/", "/lib/python3."):
        if marker in filename:
            rest = filename.split(marker, 1)[1]
            if marker.startswith("/lib/python3."):
                rest = rest.split("/", 1)[1] if "/" in rest else rest
            return rest.split("/")[0].removesuffix(".py")
    return filename


def snapshot(top: int = 25) -> dict[str, Any]:
    """MiB traced per owner (largest `top`), the total, and the modules loaded."""
    per: Counter[str] = Counter()
    for stat in tracemalloc.take_snapshot().statistics("filename"):
        per[_owner(stat.traceback[0].filename)] += stat.size
    total = sum(per.values())
    agent_modules = sorted(m for m in sys.modules if m == "agent" or m.startswith("agent."))
    return {
        "traced_mib": round(total / 2**20, 2),
        "by_owner_mib": {k: round(v / 2**20, 2) for k, v in per.most_common(top)},
        "modules_loaded": len(sys.modules),
        "top_level_packages": len({m.split(".")[0] for m in sys.modules}),
        "agent_modules": agent_modules,
    }


def main() -> int:
    out, seconds, sep, *args = sys.argv[1:]
    assert sep == "--", __doc__
    tracemalloc.start(1)

    def later() -> None:
        time.sleep(float(seconds))
        Path(out).write_text(json.dumps(snapshot(), indent=2) + "\n")

    threading.Thread(target=later, daemon=True, name="rss-probe").start()
    from agent.__main__ import main as agent_main

    return agent_main(args)


if __name__ == "__main__":
    sys.exit(main())
