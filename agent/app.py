"""Builds the runtime from settings and runs one command. The CLI calls in here; nothing here
parses argv or reads the environment (settings arrive fully validated)."""

from __future__ import annotations

import asyncio
import os
import platform
import secrets
import sys
from pathlib import Path
from typing import Any

from agent import KUBERNETES_VERSION, __version__, errors, settings
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


def _emulator_config(cfg: settings.Settings) -> Any:
    from agent.fabric.emulator import config as emulator_config

    """The configured emulator config, or the embedded default with a password from
    $COHDI_FABRIC_PASSWORD or a generated one written to a 0600 file (never printed)."""
    em = cfg.emulator
    if em.config:
        return emulator_config.load(Path(em.config))
    password = os.environ.get("COHDI_FABRIC_PASSWORD") or secrets.token_urlsafe(18)
    if "COHDI_FABRIC_PASSWORD" not in os.environ:
        base = Path(em.tls_dir or cfg.cache_dir)
        base.mkdir(parents=True, exist_ok=True)
        secret = base / "emulator-password"
        secret.touch(mode=0o600)
        secret.write_text(password + "\n")
        print(f"user admin, password in {secret}", flush=True)
    return emulator_config.example(
        password=password, nodes=em.nodes, gpus=em.gpus, latency=em.latency
    )


async def fabric_emulator(cfg: settings.Settings) -> int:
    """Run the emulator until cancelled (Ctrl-C)."""
    from agent.fabric.emulator.server import EmulatorServer

    em = cfg.emulator
    server = EmulatorServer(
        _emulator_config(cfg),
        state_file=Path(em.state_file) if em.state_file else None,
        tls_dir=Path(em.tls_dir) if em.tls_dir else None,
        host=em.host,
        port=em.port,
    )
    url = await server.start()
    print(f"fabric emulator: {url}", flush=True)
    if server.ca_file:
        print(f"  CA: {server.ca_file}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()
    return 0


def manifests(cfg: settings.Settings, out: str) -> int:
    from agent.manifests import installing

    for path in installing.write(Path(out), cfg.cluster.driver):
        print(f"wrote {path}")
    return 0


async def install_crds(cfg: settings.Settings) -> int:
    from agent.kube.client import Kube
    from agent.manifests import installing

    async with await Kube.connect(
        kubeconfig=cfg.kube.kubeconfig, request_timeout=cfg.kube.kube_request_timeout
    ) as kube:
        await installing.install(kube, cfg.cluster.driver)
    print(f"CRDs ({crds_names()}) and DeviceClass gpu.{cfg.cluster.driver} installed")
    return 0


def crds_names() -> str:
    from agent.manifests import crds

    return ", ".join(c["metadata"]["name"] for c in crds.all_crds())


async def run(cfg: settings.Settings) -> int:
    """`cohdi-agent run`: the roles this process was given, until SIGTERM/Ctrl-C."""
    import signal

    from agent.kube.client import Kube

    roles = {r.strip() for r in cfg.cluster.roles.split(",") if r.strip()}
    unknown = roles - {"cluster", "node"}
    if unknown or not roles:
        raise errors.ConfigError("--roles", cfg.cluster.roles, "must name cluster and/or node")
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        async with (
            await Kube.connect(
                kubeconfig=cfg.kube.kubeconfig, request_timeout=cfg.kube.kube_request_timeout
            ) as kube,
            asyncio.TaskGroup() as tg,
        ):
            if "node" in roles:
                tg.create_task(_node_role(kube, cfg), name="node-role")
            if "cluster" in roles:
                tg.create_task(_cluster_role(kube, cfg), name="cluster-role")
    except asyncio.CancelledError:
        return 0
    except ExceptionGroup as group:  # one role failed: report its error, not the group
        first = group.exceptions[0]
        while isinstance(first, ExceptionGroup):
            first = first.exceptions[0]
        raise first from group
    return 0


async def _cluster_role(kube: Any, cfg: settings.Settings) -> None:
    """The cluster role under leader election; only the Lease holder acts."""
    from agent.controllers import running
    from agent.fabric.backends import open_fabric
    from agent.kube.leasing import LeaderElector

    fabric = open_fabric(cfg.fabric)
    elector = LeaderElector(
        kube,
        namespace=cfg.leader.namespace,
        name=cfg.leader.name,
        identity=cfg.identity,
        lease_duration=cfg.leader.duration,
        renew_deadline=cfg.leader.renew_deadline,
        retry_period=cfg.leader.retry_period,
    )
    metrics_server = await _serve_metrics(cfg.cluster.metrics_port)

    async def lead() -> None:
        await running.build(kube, fabric, cfg, identity=cfg.identity).run()

    try:
        await elector.run(lead)
    finally:
        if metrics_server is not None:
            await metrics_server.cleanup()
        await fabric.close()


async def _node_role(kube: Any, cfg: settings.Settings) -> None:
    """The node reporter (hot-plug, report, safe removal) and the DRA kubelet plugin."""
    import socket

    from agent.node.plugin import KubeletPlugin
    from agent.node.reporting import NodeReporter

    node = cfg.node.name or os.environ.get("NODE_NAME") or socket.gethostname()
    reporter = NodeReporter(kube, cfg.node, node=node)
    plugin = KubeletPlugin(
        kube,
        driver=cfg.cluster.driver,
        kubelet_dir=Path(cfg.node.kubelet_dir),
        cdi_dir=Path(cfg.node.cdi_dir),
        reporter=reporter,
    )
    await plugin.start()
    try:
        await reporter.run()
    finally:
        await plugin.stop()


async def _serve_metrics(port: int) -> Any:
    if not port:
        return None
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from agent.controllers.metrics import REGISTRY

    async def handler(_request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def demo(
    cfg: settings.Settings,
    *,
    keep: bool,
    pods: int,
    duration: float,
    nodes: int,
    gpus: int,
    latency: float,
) -> int:
    from agent.demo import running

    return await running.run(
        cfg, pods=pods, duration=duration, nodes=nodes, gpus=gpus, attach_latency=latency, keep=keep
    )
