"""A process as PID 1 of a PID namespace of its own, as in a container: `unshare --pid --fork`
runs the command as the namespace's init, so the kernel gives it no default action for SIGTERM
(an unhandled SIGTERM is ignored, from inside the namespace or from the host).

`unavailable()` says why this machine cannot (not root, no util-linux unshare).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.systemd.nspawn import children


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "a PID namespace (unshare --pid) needs root"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    return None


def namespace_pid(pid: int) -> int:
    """`pid`'s number in its innermost PID namespace (the last of /proc/<pid>/status NSpid)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise AssertionError(f"no NSpid in /proc/{pid}/status")


class Init:
    """`argv` as PID 1 of a new PID namespace; its output in `log`."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("wb") as out:
            self.unshare = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--kill-child", *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self.pid = self._child()

    def _child(self, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid in children(self.unshare.pid):
                with contextlib.suppress(OSError, AssertionError):
                    if namespace_pid(pid) == 1:
                        return pid
            if self.unshare.poll() is not None:
                raise AssertionError(f"exited at once: {self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"no PID 1 under unshare after {timeout} s: {self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM to PID 1 from the host; its exit status (a deadline of `timeout` seconds:
        past it the process is killed and the test fails — a hang, not a slow machine)."""
        os.kill(self.pid, signal.SIGTERM)
        try:
            return self.unshare.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"PID 1 still running {timeout} s after SIGTERM: {self.output()[-2000:]}"
            ) from None

    def kill(self) -> None:
        if self.unshare.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.unshare.pid, signal.SIGKILL)
            self.unshare.wait()

    def __enter__(self) -> Init:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


@contextlib.contextmanager
def as_init(argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Init]:
    with Init(argv, log, env) as init:
        yield init
