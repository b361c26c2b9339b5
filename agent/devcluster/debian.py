"""Debian from its own archive, for the test bed's images and containers: the machine's Debian
mirror, tools unpacked from Debian's .debs into the cache, and root filesystems made by
`mmdebstrap` — no container registry involved.

- `mirror()`: the archive the machine's apt uses (so a site's mirror or proxy is honoured).
- `unpack(cache_dir, name, packages, probe)`: .debs fetched with `apt-get download` and unpacked
  with `dpkg -x` into `<cache>/debian/<name>/`, so nothing on the machine is installed or
  upgraded (its systemd in particular). When the machine's package lists are empty (a fresh
  image), `apt-get update` is run once and the download retried (root only).
- `mmdebstrap(cache_dir)`: the machine's mmdebstrap, else Debian's unpacked as above (it is one
  Perl script; the host's apt and dpkg do the work).
- `rootfs_tar(...)`: `mmdebstrap --variant=essential --include=...` of a suite into a tarball,
  documentation, manual pages and translations left out (about 45 s for a Python base here).

Raises DevClusterError naming the step and the tail of its output when a tool fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from agent import errors

SUITE: Final = "bookworm"
DEFAULT_MIRROR: Final = "http://deb.debian.org/debian"

#: dpkg path filters that keep a root filesystem small: no manuals, documentation (copyright
#: files kept, as Debian's policy asks), translations or info pages.
SLIM_DPKG_OPTIONS: Final = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
)


def mirror() -> str:
    """The Debian archive the machine's apt uses (deb822 or one-line sources; the first URI whose
    path is `.../debian`), else Debian's CDN. Other repositories (security, third parties) are
    not Debian's main archive and are skipped."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = line.split()
                if words[:1] not in (["URIs:"], ["deb"]):
                    continue
                for word in words[1:]:
                    if "://" in word and word.rstrip("/").endswith("/debian"):
                        return word
    return DEFAULT_MIRROR


def unpack(cache_dir: Path, name: str, packages: Sequence[str], probe: str) -> Path:
    """`<cache>/debian/<name>/`: `packages` fetched with `apt-get download` and unpacked with
    `dpkg -x`, once; `probe` (a path inside it, e.g. `usr/bin/mmdebstrap`) says it is complete.
    The caller holds a lock on the cache. Raises DevClusterError without apt-get/dpkg or when the
    download fails twice (the second time after `apt-get update`, as root)."""
    base = cache_dir / "debian"
    dest = base / name
    if (dest / probe).exists():
        return dest
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise errors.DevClusterError(f"no {tool}: cannot fetch {', '.join(packages)}")
    base.mkdir(parents=True, exist_ok=True)
    debs = Path(tempfile.mkdtemp(dir=base, prefix=".debs-"))
    staging = Path(tempfile.mkdtemp(dir=base, prefix=".unpack-"))
    try:
        download = ["apt-get", "download", *packages]
        try:
            run(download, what="apt-get download", cwd=debs)
        except errors.DevClusterError:
            if os.geteuid() != 0:
                raise
            run(["apt-get", "update"], what="apt-get update", timeout=600)
            run(download, what="apt-get download", cwd=debs)
        for deb in sorted(debs.glob("*.deb")):
            run(["dpkg", "-x", str(deb), str(staging)], what=f"dpkg -x {deb.name}")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    finally:
        shutil.rmtree(debs, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def mmdebstrap(cache_dir: Path) -> list[str]:
    """The argv prefix that runs mmdebstrap: the machine's, else Debian's unpacked into the cache
    (run with `perl`). The caller holds a lock on the cache."""
    found = shutil.which("mmdebstrap")
    if found:
        return [found]
    tools = unpack(cache_dir, "mmdebstrap", ["mmdebstrap"], "usr/bin/mmdebstrap")
    return ["perl", str(tools / "usr/bin/mmdebstrap")]


def rootfs_tar(
    cache_dir: Path,
    out: Path,
    packages: Sequence[str],
    *,
    suite: str = SUITE,
    dpkg_options: Sequence[str] = SLIM_DPKG_OPTIONS,
) -> float:
    """Write a Debian `suite` root filesystem with `packages` (and the Essential set) to the
    tarball `out`, atomically; the seconds it took. Needs root (mmdebstrap's root mode)."""
    argv = mmdebstrap(cache_dir)
    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial.tar")
    partial.unlink(missing_ok=True)
    env = dict(os.environ)
    if argv[0] == "perl":  # its helper mmtarfilter lies beside it
        env["PATH"] = f"{Path(argv[1]).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    try:
        run(
            [
                *argv,
                "--variant=essential",
                f"--include={','.join(packages)}",
                "--mode=root",
                "--format=tar",
                *(f"--dpkgopt={opt}" for opt in dpkg_options),
                suite,
                str(partial),
                mirror(),
            ],
            what="mmdebstrap",
            timeout=1800,
            env=env,
        )
        partial.rename(out)
    finally:
        partial.unlink(missing_ok=True)
    return time.monotonic() - started


def run(
    argv: Sequence[str],
    *,
    what: str,
    cwd: Path | None = None,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> str:
    """Run a tool; its standard output. Raises DevClusterError with `what` and the tail of its
    output when it fails, cannot start or runs past `timeout` seconds."""
    try:
        done = subprocess.run(
            list(argv),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise errors.DevClusterError(f"{what}: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip())[-3000:]
        raise errors.DevClusterError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout
