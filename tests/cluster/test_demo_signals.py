"""The demo stops everything it started when it is told to stop.

Before: the demo had no SIGTERM handling; `kill -TERM` of the demo left its five agent children
and kube-apiserver running with parent pid 1.

Each case starts `cohdi-agent demo` as an operator would, sends a signal at a given moment, and
then looks for anything of it left: by pid (every process whose command line names the demo's
state directory, collected while it ran) and by command line (a scan of /proc afterwards)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.controlplane

ROOT = Path(__file__).resolve().parents[2]


def processes_naming(marker: str) -> dict[int, str]:
    """pid -> command line of every live (not zombie) process whose command line holds
    `marker`, this test's own process excepted."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        if marker in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z":
            found[int(entry.name)] = cmdline.strip()
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Output:
    """The demo's merged stdout and stderr, read on a thread, searchable as it comes."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(text in line for line in self.lines):
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = "\n".join(self.lines[-30:])
                    raise AssertionError(f"no {text!r} from the demo in {timeout} s:\n{tail}")
                self._cond.wait(left)

    def close(self) -> None:
        self._thread.join(timeout=10)

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


@pytest.mark.parametrize(
    ("sig", "moment"),
    [
        (signal.SIGTERM, "submitting"),  # mid-run: every agent process and the workload up
        (signal.SIGHUP, "kube-apiserver ready"),  # during start-up: the scheduler starting
    ],
)
def test_a_stop_signal_leaves_no_process_of_the_demo(sig: signal.Signals, moment: str) -> None:
    # short: each simulated node's plugin socket lives under it (unix socket paths < 108 bytes)
    state = Path(tempfile.mkdtemp(prefix="sig-", dir="/tmp"))
    marker = str(state)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "demo",
            "--pods",
            "4",
            "--duration",
            "30",
            "--nodes",
            "2",
            "--gpus",
            "4",
            "--dev-state-dir",
            str(state / "dev-cluster"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # as from a terminal of its own; our signal reaches it only
    )
    out = Output(proc)
    seen: dict[int, str] = {}
    try:
        out.wait_for(moment, timeout=240)
        if moment == "submitting":
            time.sleep(2.0)  # let pods reach the agents
        seen = processes_naming(marker)
        assert any("--roles" in c for c in seen.values()) or moment != "submitting", seen
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.close()
        assert proc.stdout is not None
        proc.stdout.close()
        shutil.rmtree(state, ignore_errors=True)
    left_by_pid = {pid: cmd for pid, cmd in seen.items() if alive(pid)}
    left_by_cmdline = processes_naming(marker)
    print(
        f"{sig.name} at {moment!r}: exit {code}; {len(seen)} processes of the demo seen "
        f"running before, {len(left_by_pid)} alive after by pid, "
        f"{len(left_by_cmdline)} by command line"
    )
    for cmd in sorted(seen.values()):
        print("  was running:", cmd[:150])
    assert code == 128 + sig, out.text()[-3000:]
    assert f"{sig.name}: stopping every process" in out.text()
    assert len(seen) >= 2, "the demo had started processes before the signal"
    assert left_by_pid == {}
    assert left_by_cmdline == {}
