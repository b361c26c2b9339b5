"""Build tests/kubelet/main.go (kubelet's side of the plugin protocol, with kubelet's own
generated clients) into the cache, like the control plane: a wrapper module requiring
k8s.io/kubelet v0.36.3 from the Go module proxy, `go mod tidy`, `go build`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from agent import settings

MAIN = Path(__file__).with_name("main.go")


def build() -> Path:
    cache = settings.Settings().cache_dir
    digest = hashlib.sha256(MAIN.read_bytes()).hexdigest()[:12]
    out = cache / "kubelet-driver" / digest / "kubelet-driver"
    if out.exists():
        return out
    src = out.parent / "src"
    src.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MAIN, src / "main.go")
    (src / "go.mod").write_text(
        "module cohdi.local/kubelet-driver\n\ngo 1.26.0\n\nrequire k8s.io/kubelet v0.36.3\n"
    )
    env = {**os.environ, "GOFLAGS": "-mod=mod"}
    for args in (["go", "mod", "tidy"], ["go", "build", "-o", str(out), "."]):
        done = subprocess.run(args, cwd=src, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed in {src}:\n{done.stderr[-3000:]}")
    return out


MANAGER = Path(__file__).with_name("pluginmanager") / "main.go"
KUBERNETES = "v1.36.3"
#: the same program against kubelet 1.37's API (its calls and stream handler changed)
MANAGER_1_37 = Path(__file__).with_name("pluginmanager137") / "main.go"
KUBERNETES_1_37 = "v1.37.2"


def build_manager(kubernetes: str = KUBERNETES, main: Path = MANAGER) -> Path:
    """Build `main` (tests/kubelet/pluginmanager/main.go: kubelet's own DRA plugin manager from
    k8s.io/kubernetes `kubernetes`) into the cache: a wrapper module requiring k8s.io/kubernetes
    with its staging modules replaced by their published versions (as the control plane is
    built), `go mod tidy`, `go build`. Raises RuntimeError with the end of Go's stderr on
    failure."""
    from agent.devcluster.building import staging_replaces

    cache = settings.Settings().cache_dir
    digest = hashlib.sha256(main.read_bytes() + kubernetes.encode()).hexdigest()[:12]
    out = cache / "kubelet-dra-manager" / digest / "kubelet-dra-manager"
    if out.exists():
        return out
    src = out.parent / "src"
    src.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(main, src / "main.go")
    env = {**os.environ, "GOFLAGS": "-mod=mod"}

    def go(*args: str) -> str:
        done = subprocess.run(
            ["go", *args], cwd=src, env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"go {' '.join(args)} failed in {src}:\n{done.stderr[-3000:]}")
        return done.stdout

    (src / "go.mod").write_text("module cohdi.local/kubelet-dra-manager\n\ngo 1.26.0\n")
    info = json.loads(go("mod", "download", "-json", f"k8s.io/kubernetes@{kubernetes}"))
    replaces = staging_replaces(Path(info["GoMod"]).read_text(), kubernetes)
    (src / "go.mod").write_text(
        "module cohdi.local/kubelet-dra-manager\n\ngo 1.26.0\n\n"
        f"require k8s.io/kubernetes {kubernetes}\n\n"
        "replace (\n" + "\n".join(replaces) + "\n)\n"
    )
    tmp = out.with_name(".kubelet-dra-manager.tmp")
    go("mod", "tidy")
    go("build", "-o", str(tmp), ".")
    tmp.replace(out)
    return out
