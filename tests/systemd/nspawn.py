"""A real systemd as PID 1 for tests: a Debian rootfs booted with `systemd-nspawn --boot`.

Everything comes from Debian's archive and is cached outside the repository, like the Go builds
(`<cache dir>/systemd/`, the settings' cache dir, ~/.cache/cohdi-agent by default):

- `tools/`: `systemd-nspawn` (package systemd-container) and `mmdebstrap`, unpacked with
  `dpkg -x` from the .debs `apt-get download` fetches, so the machine's own packages (its
  systemd in particular) are never installed or upgraded. A tool already on PATH is used as is.
- `rootfs-<key>/`: Debian bookworm (its Python is 3.11, the version the wheelhouse is built for)
  with systemd-sysv, python3, python3-venv and libstdc++6 (grpcio needs it), made once by
  `mmdebstrap --variant=essential` (about 40 s here) and renamed into place when complete.
  Boots use `--volatile=overlay`, so the cached tree is never written to.

Booting needs root, a pty (nspawn prints nothing with `--console=pipe`; `script` gives it one),
`--keep-unit --register=no` (no systemd/machined on the host) and the host's network namespace
(the container reaches the test's API server and fabric emulator on 127.0.0.1). Commands run in
the container with `nsenter` into its PID 1's namespaces.

`unavailable()` says why a machine cannot do this (the caller skips with that reason).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.devcluster import debian

SUITE = "bookworm"
PACKAGES = ("systemd-sysv", "python3", "python3-venv", "libstdc++6")


@dataclass(frozen=True)
class Tools:
    nspawn: Path
    mmdebstrap: list[str]  # argv prefix


def unavailable() -> str | None:
    """Why systemd cannot be booted in a container here, or None when it can (probably)."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    for tool in ("script", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    if shutil.which("systemd-nspawn") is None or shutil.which("mmdebstrap") is None:
        for tool in ("apt-get", "dpkg"):
            if shutil.which(tool) is None:
                return f"no systemd-nspawn/mmdebstrap and no {tool} to fetch them from Debian"
    return None


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def tools(cache: Path) -> Tools:
    """systemd-nspawn and mmdebstrap: the machine's own, else unpacked from Debian's .debs."""
    base = cache / "systemd"
    found_nspawn, found_mm = shutil.which("systemd-nspawn"), shutil.which("mmdebstrap")
    if found_nspawn and found_mm:
        return Tools(Path(found_nspawn), [found_mm])
    unpacked = base / "tools"
    with _locked(base):
        if not (unpacked / "usr/bin/systemd-nspawn").exists():
            debs = Path(tempfile.mkdtemp(dir=base))
            try:
                _run(["apt-get", "download", "systemd-container", "mmdebstrap"], cwd=debs)
                staging = Path(tempfile.mkdtemp(dir=base))
                for deb in debs.glob("*.deb"):
                    _run(["dpkg", "-x", str(deb), str(staging)])
                shutil.rmtree(unpacked, ignore_errors=True)
                staging.rename(unpacked)
            finally:
                shutil.rmtree(debs, ignore_errors=True)
    nspawn = Path(found_nspawn) if found_nspawn else unpacked / "usr/bin/systemd-nspawn"
    mm = [found_mm] if found_mm else ["perl", str(unpacked / "usr/bin/mmdebstrap")]
    return Tools(nspawn, mm)


def mirror() -> str:
    """The Debian archive the machine's apt uses (`agent.devcluster.debian.mirror`, shared with
    the container image's base)."""
    return debian.mirror()


def rootfs(cache: Path, t: Tools) -> tuple[Path, float]:
    """(the cached rootfs, seconds spent building it now: 0 when it was cached)."""
    key = hashlib.sha256(f"{SUITE} {' '.join(PACKAGES)} v1".encode()).hexdigest()[:12]
    base = cache / "systemd"
    root = base / f"rootfs-{key}"
    with _locked(base):
        if (root / "usr/lib/systemd/systemd").exists():
            return root, 0.0
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(dir=base, prefix=".rootfs-"))
        try:
            _run(
                [
                    *t.mmdebstrap,
                    "--variant=essential",
                    f"--include={','.join(PACKAGES)}",
                    "--mode=root",
                    SUITE,
                    str(staging),
                    mirror(),
                ],
                timeout=1200,
            )
            shutil.rmtree(root, ignore_errors=True)
            staging.rename(root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return root, time.monotonic() - started


def run_in(t: Tools, root: Path, binds: list[str], argv: list[str], timeout: float = 600) -> str:
    """Run one command in a throw-away container of `root` (no boot); its output."""
    return _run(
        [
            str(t.nspawn),
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--volatile=overlay",
            "--console=pipe",
            f"--directory={root}",
            *binds,
            "--",
            *argv,
        ],
        timeout=timeout,
    )


class Machine:
    """A booted container; `sh()` runs a command in it. Use as a context manager (poweroff)."""

    def __init__(self, t: Tools, root: Path, binds: list[str], console: Path) -> None:
        cmd = " ".join(
            [
                str(t.nspawn),
                "--register=no",
                "--keep-unit",
                "--volatile=overlay",
                f"--directory={root}",
                "--boot",
                *binds,
            ]
        )
        self.console = console
        self.proc = subprocess.Popen(
            ["script", "--quiet", "--flush", "--command", cmd, str(console)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.init = 0

    def wait_booted(self, timeout: float = 120) -> str:
        """Wait for PID 1 of the container and `systemctl is-system-running` to settle."""
        deadline = time.monotonic() + timeout
        state = "no systemd in a PID namespace of its own among the descendants of `script`"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the container exited: {self.console_tail()}")
            # Looked up again on every pass until it answers: nspawn briefly has two children
            # (its outer child, which exits, and the container's PID 1), and a pid taken too
            # early would name a process that is gone.
            self.init = _container_init(self.proc.pid)
            if self.init:
                done = self.sh("systemctl is-system-running", check=False)
                state = done.stdout.strip() or done.stderr.strip()[-200:]
                if done.stdout.strip() in ("running", "degraded"):
                    return done.stdout.strip()
            time.sleep(0.5)
        raise AssertionError(f"not booted after {timeout} s ({state!r}): {self.console_tail()}")

    @property
    def _enter(self) -> list[str]:
        return ["nsenter", f"--target={self.init}", "--mount", "--uts", "--ipc", "--net", "--pid"]

    def sh(
        self, command: str, *, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self._enter, "--", "/bin/sh", "-c", command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{command!r} in the container: exit {done.returncode}\n{done.stdout}{done.stderr}"
            )
        return done

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show --property={','.join(props)} {unit}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def console_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.console.read_bytes()[-n:].decode(errors="replace")
        return ""

    def poweroff(self, timeout: float = 60) -> None:
        if self.proc.poll() is None and self.init:
            self.sh("systemctl poweroff --no-block", check=False)
        try:
            self.proc.wait(timeout if self.init else 1)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.poweroff()


def _container_init(script_pid: int) -> int:
    """PID 1 of the container: the descendant of `script` that runs systemd in a PID namespace
    of its own; 0 while there is none yet. Searched through all descendants, not a fixed depth:
    `script` runs its command through $SHELL, or /bin/sh when SHELL is unset (as under CI), and
    dash forks nspawn where bash execs it. nspawn's outer child, also a child of nspawn for a
    moment before it exits, is in our PID namespace and so is not it."""
    ours = _pid_namespace(os.getpid())
    todo, seen = [script_pid], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        with contextlib.suppress(OSError):
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            if pid != script_pid and comm == "systemd" and _pid_namespace(pid) != ours:
                return pid
        todo.extend(children(pid))
    return 0


def _pid_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/pid")


def children(pid: int) -> list[int]:
    """The children of `pid`: /proc's children list where the kernel has one
    (CONFIG_PROC_CHILDREN), else every process whose parent (field 4 of /proc/<pid>/stat) it is."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        pass
    except OSError:
        return []
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                    kids.append(int(entry.name))
    return kids


def _run(argv: list[str], cwd: Path | None = None, timeout: float = 600) -> str:
    done = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout
