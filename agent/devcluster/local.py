"""`cohdi-agent dev-cluster up|down|env|status`: one background cluster per state directory,
remembered in a small JSON file (pids and the binary each pid runs), so `down` stops exactly the
processes `up` started and never a stranger that reused a pid."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import ETCD_VERSION, KUBERNETES_VERSION, errors
from agent.devcluster import building

if TYPE_CHECKING:  # imported in up(): it needs the `demo` extra, `cohdi-agent run` imports us
    from agent.devcluster.controlplane import ControlPlane


def progress(message: str) -> None:
    print(f"[dev-cluster] {message}", file=sys.stderr, flush=True)


def binaries(cache_dir: Path, kube_version: str = KUBERNETES_VERSION) -> building.Binaries:
    """The control plane's binaries at `kube_version` (one of `settings.KUBE_VERSIONS`), built on
    first use into `cache_dir`."""
    return building.ensure_built(
        cache_dir, kube_version=kube_version, etcd_version=ETCD_VERSION, progress=progress
    )


def _state_file(state_dir: Path) -> Path:
    return state_dir / "state.json"


def _pid_runs(pid: int, exe: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/exe") == exe
    except OSError:
        return False


def read_state(state_dir: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(_state_file(state_dir).read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise errors.DevClusterError(
            f"{_state_file(state_dir)} is corrupt ({exc}); stop the processes by hand and remove it"
        ) from exc
    return state


def running(state: dict[str, Any]) -> dict[str, int]:
    return {
        name: proc["pid"]
        for name, proc in state["processes"].items()
        if _pid_runs(proc["pid"], proc["exe"])
    }


def up(
    cache_dir: Path,
    state_dir: Path,
    *,
    binding_timeout: float,
    scheduler_qps: float | None = None,
    scheduler_burst: int | None = None,
    kube_version: str = KUBERNETES_VERSION,
) -> ControlPlane:
    """Start a background cluster in `state_dir` (wiped first). `scheduler_qps`/`_burst`: the
    scheduler's API client limiter (None: its defaults, qps 50 / burst 100); `kube_version`: the
    Kubernetes release it runs."""
    from agent.devcluster.controlplane import ControlPlane  # before any build: MissingExtra first

    state = read_state(state_dir)
    if state and running(state):
        raise errors.DevClusterError(
            f"a dev cluster already runs from {state_dir} (pids {running(state)}); "
            "run `cohdi-agent dev-cluster down` first"
        )
    if state_dir.exists():
        shutil.rmtree(state_dir)
    cp = ControlPlane(
        binaries=binaries(cache_dir, kube_version),
        state_dir=state_dir,
        binding_timeout_s=binding_timeout,
        scheduler_qps=scheduler_qps,
        scheduler_burst=scheduler_burst,
        die_with_parent=False,  # it must outlive this command
        progress=progress,
    )
    cp.start()
    doc = {
        "server": cp.server,
        "kubeconfig": str(cp.kubeconfig),
        "processes": {
            name: {"pid": p.pid, "exe": os.path.realpath(p.args[0])} for name, p in cp.procs.items()
        },
    }
    tmp = _state_file(state_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(_state_file(state_dir))
    return cp


def down(state_dir: Path) -> list[str]:
    state = read_state(state_dir)
    if state is None:
        return []
    stopped = []
    alive = running(state)
    for name in ("kube-scheduler", "kube-apiserver", "etcd"):
        pid = alive.get(name)
        if pid is None:
            continue
        _terminate(pid)
        stopped.append(f"{name} (pid {pid})")
    _state_file(state_dir).unlink(missing_ok=True)
    return stopped


def _terminate(pid: int, grace: float = 10.0) -> None:
    """SIGTERM, wait up to `grace` seconds for the exit (a pidfd becomes readable), then SIGKILL."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        readable, _, _ = select.select([fd], [], [], grace)
        if not readable:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)
