"""Build tests/kubelet/main.go (kubelet's side of the plugin protocol, with kubelet's own
generated clients) into the cache, like the control plane: a wrapper module requiring
k8s.io/kubelet v0.36.3 from the Go module proxy, `go mod tidy`, `go build`."""

from __future__ import annotations

import hashlib
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
