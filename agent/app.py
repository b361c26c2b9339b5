"""Builds the runtime from settings and runs one command. The CLI calls in here; nothing here
parses argv or reads the environment (settings arrive fully validated)."""

from __future__ import annotations

import asyncio
import os
import platform
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent import KUBERNETES_VERSION, __version__, errors, health, settings, supervision
from agent.devcluster import local

if TYPE_CHECKING:  # imported where used: `version` and `manifests` start without them
    from agent.controllers.running import ClusterRole
    from agent.fabric.protocol import FabricManager
    from agent.kube.client import Kube
    from agent.node.reporting import NodeReporter


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
    """`cohdi-agent run`: the roles this process was given, until SIGTERM/Ctrl-C.

    Each role is a supervised unit (agent.supervision): a role that fails is logged, counted
    (`cohdi_role_restarts_total{role}`, `cohdi_role_up{role}`), shown in `/readyz` and restarted
    with backoff, and the other role goes on. Settings that are wrong exit before anything starts
    (ConfigError, exit status 2). SIGTERM cancels everything: the cluster role releases its Lease,
    the node role removes its plugin sockets."""
    import signal

    from agent.fabric.backends import open_fabric
    from agent.kube.client import Kube

    roles = {r.strip() for r in cfg.cluster.roles.split(",") if r.strip()}
    unknown = roles - {"cluster", "node"}
    if unknown or not roles:
        raise errors.ConfigError("--roles", cfg.cluster.roles, "must name cluster and/or node")
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    fabric = open_fabric(cfg.fabric) if "cluster" in roles else None  # bad settings exit here
    board = health.Health()
    try:
        async with await Kube.connect(
            kubeconfig=cfg.kube.kubeconfig, request_timeout=cfg.kube.kube_request_timeout
        ) as kube:
            units: dict[str, _Role] = {}
            if "node" in roles:
                units["node"] = _NodeRole(kube, cfg)
            if fabric is not None:
                units["cluster"] = _ClusterRole(kube, cfg, fabric)
            await run_roles(units, board, cfg)
    except asyncio.CancelledError:
        return 0
    finally:
        if fabric is not None:
            await fabric.close()
    return 0


class _Role(Protocol):
    async def run(self) -> None: ...

    def not_ready(self) -> list[str]:
        """Why the role is not ready while it runs, one reason a line; empty when ready."""
        ...


#: How a failed role is restarted: fast at first (a crash in a role is a bug or an unmapped
#: error), slowly for a permanent error (a corrupt checkpoint, RBAC) an operator has to fix.
ROLE_POLICY = supervision.Policy(
    first=1.0, ceiling=60.0, permanent_first=30.0, permanent_ceiling=300.0, settle=30.0
)


async def run_roles(
    units: dict[str, _Role],
    board: health.Health,
    cfg: settings.Settings,
    *,
    policy: supervision.Policy = ROLE_POLICY,
) -> None:
    """Run each role as a supervised unit until cancelled, with a readiness check per role on
    `board` and the health endpoints served when --metrics-port is set. Returns only when
    cancelled (as CancelledError)."""
    supervisor = supervision.Supervisor("role", policy=policy)

    def check(name: str, unit: _Role) -> health.Check:
        def reasons() -> list[str]:
            problem = supervisor.problems().get(name)
            if problem is not None:
                return [problem]
            state = supervisor.units.get(name)
            if state is None or not state.running:
                return ["not started"]
            return unit.not_ready()

        return reasons

    for name, unit in units.items():
        board.add(name, check(name, unit))
    server = None
    if cfg.cluster.metrics_port:
        address = cfg.cluster.metrics_address
        try:
            server = await health.serve(board, address=address, port=cfg.cluster.metrics_port)
        except OSError as exc:
            raise errors.ConfigError(
                "--metrics-address/--metrics-port",
                f"{address}:{cfg.cluster.metrics_port}",
                f"cannot be listened on: {exc}",
            ) from exc
    try:
        await supervisor.run({name: unit.run for name, unit in units.items()})
    finally:
        if server is not None:
            await server.cleanup()


class _ClusterRole:
    """The cluster role under leader election; only the Lease holder acts. Ready while its
    campaign runs: a standby replica always, the leader once its informers have synced and the
    fabric manager answers (and no loop of it is failing)."""

    def __init__(self, kube: Kube, cfg: settings.Settings, fabric: FabricManager) -> None:
        self.kube = kube
        self.cfg = cfg
        self.fabric = fabric
        self.campaigning = False
        self.term: ClusterRole | None = None

    async def run(self) -> None:
        from agent.controllers import running
        from agent.kube.leasing import LeaderElector

        cfg = self.cfg
        elector = LeaderElector(
            self.kube,
            namespace=cfg.leader.namespace,
            name=cfg.leader.name,
            identity=cfg.identity,
            lease_duration=cfg.leader.duration,
            renew_deadline=cfg.leader.renew_deadline,
            retry_period=cfg.leader.retry_period,
        )

        async def lead() -> None:
            self.term = term = running.build(self.kube, self.fabric, cfg, identity=cfg.identity)
            try:
                await term.run()
            finally:
                self.term = None

        self.campaigning = True
        try:
            await elector.run(lead)
        finally:
            self.campaigning = False

    def not_ready(self) -> list[str]:
        if not self.campaigning:
            return ["Lease campaign not running"]
        return [] if self.term is None else self.term.not_ready()


class _NodeRole:
    """The node reporter (hot-plug, report, safe removal) and the DRA kubelet plugin. Ready once
    the plugin serves its sockets and the first PCI scan has finished."""

    def __init__(self, kube: Kube, cfg: settings.Settings) -> None:
        self.kube = kube
        self.cfg = cfg
        self.reporter: NodeReporter | None = None
        self.serving = False

    async def run(self) -> None:
        import socket

        from agent.node.plugin import KubeletPlugin
        from agent.node.reporting import NodeReporter

        cfg = self.cfg
        node = cfg.node.name or os.environ.get("NODE_NAME") or socket.gethostname()
        self.reporter = reporter = NodeReporter(self.kube, cfg.node, node=node)
        plugin = KubeletPlugin(
            self.kube,
            driver=cfg.cluster.driver,
            kubelet_dir=Path(cfg.node.kubelet_dir),
            cdi_dir=Path(cfg.node.cdi_dir),
            reporter=reporter,
        )
        try:
            await plugin.start()
            self.serving = True
            await reporter.run()
        finally:  # also after a failed start: whatever socket it made goes
            self.serving = False
            await plugin.stop()

    def not_ready(self) -> list[str]:
        reasons = [] if self.serving else ["kubelet plugin not serving"]
        if self.reporter is None or not self.reporter.scanned.is_set():
            reasons.append("first PCI scan not done")
        return reasons


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
