"""Where the test session's Python processes keep their bytecode (a plugin of tests/conftest.py).

With PYTHONDONTWRITEBYTECODE set (it keeps `__pycache__` out of the source tree), every process
the suite starts compiles what it imports from source, every time: each of the four xdist workers
compiles and assertion-rewrites the ~140 test modules and the agent's modules, and every
`python -m agent ...` the tests start (a hundred or so: CLI, systemd, metrics, emulator, image
tests) compiles the agent again. That was about a third of the fast tier's CPU on 2 cores
(82 s of CPU, 61-64 s wall; with the bytecode kept: 58 s of CPU, 42 s wall).

So when it is set, this session and the processes it starts keep their bytecode under the cache
directory instead (`<cache dir>/pycache`, `PYTHONPYCACHEPREFIX`, outside the repository): the
tree stays clean, and compiled code is reused across processes and runs (a source file changed
since is compiled again, as always). Without PYTHONDONTWRITEBYTECODE nothing changes here."""

from __future__ import annotations

import compileall
import os
import sys
from pathlib import Path

import pytest

from agent import settings


def pytest_configure(config: pytest.Config) -> None:
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or os.environ.get("PYTHONPYCACHEPREFIX"):
        return
    prefix = settings.Settings().cache_dir / "pycache"
    prefix.mkdir(parents=True, exist_ok=True)
    os.environ.pop("PYTHONDONTWRITEBYTECODE")
    os.environ["PYTHONPYCACHEPREFIX"] = str(prefix)  # xdist workers and every child process
    sys.pycache_prefix = str(prefix)  # this process: the test modules it imports from now on
    sys.dont_write_bytecode = False
    # The agent's modules once, here, before the workers start, rather than in each of them at
    # once (they only read what is up to date; after a fresh clone nothing is).
    compileall.compile_dir(AGENT, quiet=2, workers=2)


#: the agent package's directory
AGENT = str(Path(__file__).resolve().parents[1] / "agent")
