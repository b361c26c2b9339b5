"""Builds the runtime from settings and runs one command. The CLI calls in here; nothing here
parses argv or reads the environment (settings arrive fully validated)."""

from __future__ import annotations

import platform
import sys

from agent import KUBERNETES_VERSION, __version__, settings
from agent.devcluster import local


def version() -> int:
    print(f"cohdi-agent {__version__}")
    print(f"python {platform.python_version()} ({sys.implementation.name})")
    print(f"kubernetes {KUBERNETES_VERSION} (resource.k8s.io/v1, coordination.k8s.io/v1)")
    return 0


def dev_cluster(cfg: settings.Settings, action: str) -> int:
    state_dir = cfg.dev_state_dir
    if action == "build":
        b = local.binaries(cfg.cache_dir)
        print(
            f"etcd:           {b.etcd}\n"
            f"kube-apiserver: {b.kube_apiserver}\n"
            f"kube-scheduler: {b.kube_scheduler}"
        )
        return 0
    if action == "up":
        cp = local.up(cfg.cache_dir, state_dir, binding_timeout=cfg.dev.binding_timeout)
        print(f"dev cluster running: {cp.server}")
        print(f"  export KUBECONFIG={cp.kubeconfig}")
        print(f"  logs: {state_dir}/*.log   stop: cohdi-agent dev-cluster down")
        return 0
    state = local.read_state(state_dir)
    if action == "down":
        stopped = local.down(state_dir)
        print("stopped: " + ", ".join(stopped) if stopped else "no dev cluster was running")
        return 0
    alive = local.running(state) if state else {}
    if action == "env":
        if not state or "kube-apiserver" not in alive:
            print(
                "no dev cluster is running; start one with `cohdi-agent dev-cluster up`",
                file=sys.stderr,
            )
            return 1
        print(f"export KUBECONFIG={state['kubeconfig']}")
        return 0
    if not state:
        print("no dev cluster")
        return 1
    print(f"server: {state['server']}\nkubeconfig: {state['kubeconfig']}")
    for name in state["processes"]:
        print(f"{name}: {'running, pid ' + str(alive[name]) if name in alive else 'not running'}")
    return 0 if len(alive) == len(state["processes"]) else 1


async def demo(cfg: settings.Settings, *, keep: bool) -> int:
    from agent import demoing

    return await demoing.run(cfg, keep=keep)
