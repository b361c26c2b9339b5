"""Build etcd, kube-apiserver and kube-scheduler from the Go module proxy into a cache outside
the repository, once; later calls reuse the binaries.

k8s.io/kubernetes cannot be `go install`ed directly: its go.mod pins its staging modules at v0.0.0
with `replace => ./staging/...`, and replace directives of a dependency are ignored
(kubernetes/kubernetes#79384, golang/go#32776). So we write a small wrapper module that requires
k8s.io/kubernetes and carries one `replace k8s.io/<staging> => k8s.io/<staging> v0.<minor>.<patch>`
per staging module, read from k8s.io/kubernetes's own go.mod of that version, then `go build` the
commands. etcd gets a wrapper module of its own.

Builds are serialised across processes by a file lock and land atomically (temporary directory,
then rename), so a parallel or interrupted build never leaves a half-written binary in the cache.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agent import errors

Progress = Callable[[str], None]

_KUBE_COMMANDS = ("kube-apiserver", "kube-scheduler")


@dataclass(frozen=True, slots=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_scheduler: Path


def paths(cache_dir: Path, *, kube_version: str, etcd_version: str) -> Binaries:
    kube_bin = cache_dir / "k8s" / kube_version / "bin"
    return Binaries(
        etcd=cache_dir / "etcd" / etcd_version / "bin" / "etcd",
        kube_apiserver=kube_bin / "kube-apiserver",
        kube_scheduler=kube_bin / "kube-scheduler",
    )


def _present(b: Binaries) -> bool:
    return all(os.access(p, os.X_OK) for p in (b.etcd, b.kube_apiserver, b.kube_scheduler))


def ensure_built(
    cache_dir: Path, *, kube_version: str, etcd_version: str, progress: Progress
) -> Binaries:
    """Return the binaries, building what is missing. Raises DevClusterError with the Go output's
    tail when a build fails."""
    want = paths(cache_dir, kube_version=kube_version, etcd_version=etcd_version)
    if _present(want):
        return want
    if shutil.which("go") is None:
        raise errors.DevClusterError(
            "the Go toolchain is not on PATH: install Go >= 1.26 to build the local control plane"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / ".build.lock", progress):
        if not want.etcd.exists():
            _build_etcd(want.etcd.parent.parent, etcd_version, progress)
        if not (want.kube_apiserver.exists() and want.kube_scheduler.exists()):
            _build_kube(want.kube_apiserver.parent.parent, kube_version, progress)
    return want


@contextmanager
def _locked(path: Path, progress: Progress) -> Iterator[None]:
    with path.open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"another process is building the control plane; waiting for {path}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def staging_replaces(kube_gomod: str, kube_version: str) -> list[str]:
    """The `replace` lines for the wrapper module: every `k8s.io/X => ./staging/...` of
    k8s.io/kubernetes's go.mod, pointed at the published `k8s.io/X v0.<minor>.<patch>`."""
    staging_version = "v0." + kube_version.removeprefix("v").split(".", 1)[1]
    mods = re.findall(r"^\s*(k8s\.io/[\w.-]+)\s*=>\s*\./staging/", kube_gomod, flags=re.M)
    if not mods:
        raise errors.DevClusterError(
            f"found no staging replace directives in k8s.io/kubernetes@{kube_version}'s go.mod; "
            "the wrapper-module recipe no longer fits this version"
        )
    return [f"\t{m} => {m} {staging_version}" for m in sorted(set(mods))]


def _build_kube(root: Path, version: str, progress: Progress) -> None:
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    progress(f"building kube-apiserver and kube-scheduler {version} (first run only; ~6-15 min)")
    info = json.loads(
        _go(["mod", "download", "-json", f"k8s.io/kubernetes@{version}"], src, progress)
    )
    if "Error" in info:
        raise errors.DevClusterError(
            f"go could not fetch k8s.io/kubernetes@{version}: {info['Error']}"
        )
    replaces = staging_replaces(Path(info["GoMod"]).read_text(), version)
    go_line = re.search(r"^go (\S+)", Path(info["GoMod"]).read_text(), flags=re.M)
    (src / "go.mod").write_text(
        "module cohdi.local/kube-build\n\n"
        f"go {go_line.group(1) if go_line else '1.26.0'}\n\n"
        f"require k8s.io/kubernetes {version}\n\n"
        "replace (\n" + "\n".join(replaces) + "\n)\n"
    )
    _write_tools(src, [f"k8s.io/kubernetes/cmd/{c}" for c in _KUBE_COMMANDS])
    _go(["mod", "tidy"], src, progress)
    _build_into(
        root / "bin",
        src,
        [f"k8s.io/kubernetes/cmd/{c}" for c in _KUBE_COMMANDS],
        progress,
        # Same version stamp a release build carries, so `kube-apiserver --version` and the
        # server's /version report the real release rather than v0.0.0.
        ldflags=_version_ldflags(version),
    )


def _version_ldflags(version: str) -> str:
    major, minor = version.removeprefix("v").split(".")[:2]
    pkgs = ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
    flags = ["-s", "-w"]
    for pkg in pkgs:
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return " ".join(flags)


def _build_etcd(root: Path, version: str, progress: Progress) -> None:
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    progress(f"building etcd {version} (first run only; ~2 min)")
    (src / "go.mod").write_text(
        f"module cohdi.local/etcd-build\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 {version}\n"
    )
    _write_tools(src, ["go.etcd.io/etcd/server/v3"])
    _go(["mod", "tidy"], src, progress)
    _build_into(
        root / "bin", src, ["go.etcd.io/etcd/server/v3"], progress, ldflags="-s -w", name="etcd"
    )


def _write_tools(src: Path, packages: list[str]) -> None:
    imports = "\n".join(f'\t_ "{p}"' for p in packages)
    (src / "tools.go").write_text(
        "//go:build tools\n\n"
        "// Pins the commands we build, so `go mod tidy` keeps their dependencies.\n"
        f"package tools\n\nimport (\n{imports}\n)\n"
    )


def _build_into(
    bindir: Path,
    src: Path,
    packages: list[str],
    progress: Progress,
    *,
    ldflags: str,
    name: str = "",
) -> None:
    """`go build` into a temporary directory, then move the binaries into `bindir`. `name` names
    the binary of a single package (Go would call go.etcd.io/etcd/server/v3 `server`)."""
    tmp = Path(tempfile.mkdtemp(prefix=".bin-", dir=bindir.parent))
    out = f"{tmp}/{name}" if name else f"{tmp}/"
    try:
        _go(
            ["build", "-v", "-trimpath", f"-ldflags={ldflags}", "-o", out, *packages], src, progress
        )
        bindir.mkdir(exist_ok=True)
        for exe in tmp.iterdir():
            exe.replace(bindir / exe.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _go(args: list[str], cwd: Path, progress: Progress) -> str:
    """Run one go command; stream a package counter as progress; return stdout."""
    env = dict(os.environ, GOFLAGS="-mod=mod", GO111MODULE="on")
    started = time.monotonic()
    progress(f"$ go {' '.join(a for a in args if not a.startswith('-ldflags'))}")
    proc = subprocess.Popen(
        ["go", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    assert proc.stdout is not None
    tail: list[str] = []
    last = started
    for count, line in enumerate(proc.stderr, start=1):
        tail = [*tail[-39:], line.rstrip()]
        now = time.monotonic()
        if now - last >= 15:
            progress(f"  ... {count} lines of go output, {now - started:.0f} s")
            last = now
    out = proc.stdout.read()
    if proc.wait() != 0:
        raise errors.DevClusterError(
            f"`go {args[0]}` failed in {cwd} (exit {proc.returncode}); last lines:\n"
            + "\n".join(tail)
        )
    progress(f"  done in {time.monotonic() - started:.0f} s")
    return out
