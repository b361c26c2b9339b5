"""A `cohdi-agent` process with a sampling profile of its event loop: every 10 ms a thread
records the main thread's Python stack; when the agent exits (SIGTERM) the counts are written
as JSON with the objects alive by type — why a run took its time and where its memory went.

Usage: python -m bench.sampler OUT.json -- <cohdi-agent arguments>

Creating OUT.json.mark while it runs writes the profile so far into OUT.json.mark.json (the
benchmark does so when the pool is published: the profile of the publication alone).

A sample costs a few microseconds (one stack walk), so the run's own figures stay honest. The
"self" table names the innermost Python function of each sample (where the time was spent);
"cumulative" counts every function on the stack (what the time was spent for). A sample whose
innermost frame is the event loop's own `run_forever`/`run_until_complete` is the loop idle
or in C (uvloop, the TLS and HTTP parsers), reported as such.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType, FunctionType, ModuleType
from typing import Any

INTERVAL_S = 0.01
#: the innermost Python frame while the event loop waits, or runs C code (uvloop, TLS, parsers)
_LOOP = ("asyncio/runners.py:run", "asyncio/base_events.py:run_forever")


def _where(frame: FrameType) -> str:
    code = frame.f_code
    path = code.co_filename
    for marker in ("/agent/", "site-packages/", "/lib/python3.11/"):
        if marker in path:
            path = path.rsplit(marker, 1)[1] if marker == "/agent/" else path.split(marker, 1)[1]
            if marker == "/agent/":
                path = "agent/" + path
            break
    return f"{path}:{code.co_name}"


class Sampler:
    def __init__(self) -> None:
        self.main = threading.main_thread().ident
        self.self_counts: Counter[str] = Counter()
        self.cumulative: Counter[str] = Counter()
        self.samples = 0
        self._stop = threading.Event()

    def run(self, mark: Path) -> None:
        while not self._stop.wait(INTERVAL_S):
            if mark.exists() and not mark.with_suffix(".mark.json").exists():
                mark.with_suffix(".mark.json").write_text(json.dumps(self.report(), indent=2))
            frame = sys._current_frames().get(self.main or 0)
            if frame is None:
                continue
            self.samples += 1
            self.self_counts[_where(frame)] += 1
            seen = set()
            f: FrameType | None = frame
            while f is not None:
                seen.add(_where(f))
                f = f.f_back
            for key in seen:
                self.cumulative[key] += 1

    def stop(self) -> None:
        self._stop.set()

    def report(self, top: int = 30) -> dict[str, Any]:
        def share(c: Counter[str]) -> dict[str, float]:
            n = max(self.samples, 1)
            return {
                k: round(100 * x / n, 1)
                for k, x in c.most_common(top + 12)
                if x < self.samples  # not the entry frames every sample has
            }

        idle = sum(n for k, n in self.self_counts.items() if k.endswith(_LOOP))
        busy = {k: v for k, v in self.self_counts.items() if not k.endswith(_LOOP)}
        return {
            "interval_ms": INTERVAL_S * 1e3,
            "samples": self.samples,
            "loop_idle_or_in_c_percent": round(100 * idle / max(self.samples, 1), 1),
            "self_percent": dict(list(share(Counter(busy)).items())[:top]),
            "cumulative_percent": dict(list(share(self.cumulative).items())[:top]),
        }


def objects(top: int = 20) -> dict[str, Any]:
    """Objects alive by type: count and their own (shallow) size in MiB, largest first."""
    count: Counter[str] = Counter()
    size: Counter[str] = Counter()
    for o in gc.get_objects():
        name = type(o).__name__
        count[name] += 1
        size[name] += sys.getsizeof(o)
    return {
        name: {"count": count[name], "shallow_mib": round(size[name] / 2**20, 1)}
        for name, _ in size.most_common(top)
    }


def deep_mib(root: object) -> float:
    """MiB of `root` and everything it reaches through containers and attributes (each object
    once; classes, functions and modules are not followed)."""
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, type | ModuleType | FunctionType):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list | tuple | set | frozenset):
            stack.extend(o)
        else:
            stack.extend(getattr(o, "__dict__", {}).values())
            for slot in getattr(type(o), "__slots__", ()):
                if hasattr(o, slot):
                    stack.append(getattr(o, slot))
    return round(total / 2**20, 1)


#: What holds the cluster role's data: attributes of these classes, measured deeply.
HOLDERS = {
    "Informer": ("store",),
    "Publisher": ("inventory", "_sent", "_stored", "_entries", "_names", "_view"),
}


def holders() -> dict[str, float]:
    """MiB held by each informer's store and by the publisher's caches (each measured on its
    own: what two of them share is counted in both)."""
    out: dict[str, float] = {}
    for o in gc.get_objects():
        attrs = HOLDERS.get(type(o).__name__)
        if attrs is None:
            continue
        label = getattr(o, "name", "") or type(o).__name__
        for attr in attrs:
            if hasattr(o, attr):
                out[f"{type(o).__name__} {label}.{attr}"] = deep_mib(getattr(o, attr))
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main() -> int:
    out, sep, *args = sys.argv[1:]
    assert sep == "--", __doc__
    sampler = Sampler()
    thread = threading.Thread(
        target=sampler.run, args=(Path(out + ".mark"),), daemon=True, name="sampler"
    )
    started = time.monotonic()
    thread.start()
    from agent.__main__ import main as agent_main

    try:
        return agent_main(args)
    finally:
        sampler.stop()
        thread.join()
        doc = {
            "seconds": round(time.monotonic() - started, 1),
            **sampler.report(),
            "objects": objects(),
            "holders_mib": holders(),
        }
        Path(out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
