"""Build `helm` from the Go module proxy into the cache outside the repository, once, the way the
local control plane is built (`agent.devcluster.building`): a wrapper module requiring
`helm.sh/helm/v3` at `HELM_VERSION`, `go mod tidy`, `go build`, serialised across processes by
the same file lock and landed atomically.

Built with the ldflags of Helm's own release Makefile: the version stamp, and the default
Kubernetes version Helm assumes without a cluster (`helm template`, `helm lint`), which the
Makefile reads from the k8s.io/client-go that Helm requires (client-go v0.37.0 -> 1.37). A plain
`go install` leaves that default at v1.20, and `helm template` of a chart with a `kubeVersion`
constraint then fails.

A cold build (empty Go build and module caches) takes minutes and ~1 GB of memory; later calls
return the cached binary at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Final

from agent import errors
from agent.devcluster import building

#: The Helm release built (`go list -m -versions helm.sh/helm/v3` on the Go module proxy).
HELM_VERSION: Final = "v3.22.0"
_MODULE: Final = "helm.sh/helm/v3"
_COMMAND: Final = f"{_MODULE}/cmd/helm"


def path(cache_dir: Path, version: str = HELM_VERSION) -> Path:
    """Where the binary of `version` lives in the cache: `<cache>/helm/<version>/bin/helm`."""
    return cache_dir / "helm" / version / "bin" / "helm"


def ensure_built(
    cache_dir: Path, *, version: str = HELM_VERSION, progress: building.Progress
) -> Path:
    """The helm binary, built when missing. Raises DevClusterError when Go is missing or a step
    of the build fails (with the tail of Go's output)."""
    want = path(cache_dir, version)
    if os.access(want, os.X_OK):
        return want
    if shutil.which("go") is None:
        raise errors.DevClusterError(
            f"the Go toolchain is not on PATH: install Go >= 1.26 to build helm {version}"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    with building._locked(cache_dir / ".build.lock", progress):
        if not want.exists():  # another process may have built it while we waited
            _build(want.parent.parent, version, progress)
    return want


def release_ldflags(version: str, helm_gomod: str) -> str:
    """The `-ldflags` of Helm's release build (its Makefile): version stamp, and the default
    Kubernetes version 1.<minor of the client-go Helm requires>. Raises DevClusterError when the
    go.mod names no k8s.io/client-go."""
    found = re.search(r"^\s*k8s\.io/client-go\s+v0\.(\d+)\.", helm_gomod, flags=re.M)
    if found is None:
        raise errors.DevClusterError(
            f"helm {version}'s go.mod requires no k8s.io/client-go; cannot stamp its Kubernetes "
            "version"
        )
    minor = found.group(1)
    flags = [
        "-s",
        "-w",
        f"-X {_MODULE}/internal/version.version={version}",
        f"-X {_MODULE}/internal/version.gitTreeState=clean",
    ]
    for pkg in ("pkg/lint/rules", "pkg/chartutil"):
        flags += [
            f"-X {_MODULE}/{pkg}.k8sVersionMajor=1",
            f"-X {_MODULE}/{pkg}.k8sVersionMinor={minor}",
        ]
    return " ".join(flags)


def _build(root: Path, version: str, progress: building.Progress) -> None:
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    progress(f"building helm {version} (first run only; ~6-10 min)")
    info = json.loads(_download(version, src))
    gomod = Path(info["GoMod"]).read_text()
    go_line = re.search(r"^go (\S+)", gomod, flags=re.M)
    (src / "go.mod").write_text(
        "module cohdi.local/helm-build\n\n"
        f"go {go_line.group(1) if go_line else '1.26.0'}\n\n"
        f"require {_MODULE} {version}\n"
    )
    building._write_tools(src, [_COMMAND])
    building._go(["mod", "tidy"], src, progress)
    building._build_into(
        root / "bin", src, [_COMMAND], progress, ldflags=release_ldflags(version, gomod)
    )


def _download(version: str, cwd: Path) -> str:
    """`go mod download -json helm.sh/helm/v3@version`: the module's paths as JSON. Raises
    DevClusterError when the proxy does not serve it."""
    done = subprocess.run(
        ["go", "mod", "download", "-json", f"{_MODULE}@{version}"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        info = json.loads(done.stdout)
    except ValueError:
        info = {"Error": done.stderr.strip() or f"exit {done.returncode}"}
    if "Error" in info:
        raise errors.DevClusterError(f"go could not fetch {_MODULE}@{version}: {info['Error']}")
    return done.stdout
