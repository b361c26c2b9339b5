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

from agent import KUBERNETES_VERSION, __version__, errors, health, sdnotify, settings, supervision
from agent.devcluster import local

if TYPE_CHECKING:  # imported where used: `version` and `manifests` start without them
    from agent.controllers.cohdiconfig import CohdiSource
    from agent.controllers.running import ClusterRole
    from agent.fabric.protocol import FabricManager
    from agent.kube.client import Kube
    from agent.kube.leasing import LeaderElector
    from agent.model.cohdi import PoolAttributes
    from agent.node.plugin import KubeletPlugin
    from agent.node.reporting import NodeReporter


def version() -> int:
    print(f"cohdi-agent {__version__}")
    print(f"python {platform.python_version()} ({sys.implementation.name})")
    print(f"kubernetes {KUBERNETES_VERSION} (resource.k8s.io/v1, coordination.k8s.io/v1)")
    return 0


def dev_cluster(cfg: settings.Settings, action: str) -> int:
    state_dir = cfg.dev_state_dir
    if action == "build":
        from agent.devcluster import helm

        b = local.binaries(cfg.cache_dir, cfg.dev.kube_version)
        helm_bin = helm.ensure_built(cfg.cache_dir, progress=local.progress)
        print(
            f"etcd:           {b.etcd}\n"
            f"kube-apiserver: {b.kube_apiserver}\n"
            f"kube-scheduler: {b.kube_scheduler}\n"
            f"helm:           {helm_bin}"
        )
        print(_build_real_node(cfg.cache_dir, cfg.dev.kube_version))
        return 0
    if action == "image":
        from agent.devcluster import image

        built = image.ensure_image(cfg.cache_dir, progress=local.progress)
        print(f"archive:   {built.archive}\nreference: {built.reference}")
        return 0
    if action == "up":
        cp = local.up(
            cfg.cache_dir,
            state_dir,
            binding_timeout=cfg.dev.binding_timeout,
            kube_version=cfg.dev.kube_version,
        )
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


def _build_real_node(cache_dir: Path, kube_version: str) -> str:
    """Build what the test bed's real node runs (kubelet, kube-controller-manager, containerd,
    runc, CNI plugins, the pause image: `agent.devcluster.nodebuild`) where one can run (Linux,
    root); the lines to print, or why nothing was built."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "real node:      not built (a kubelet + containerd node needs Linux and root)"
    from agent.devcluster import nodebuild

    n = nodebuild.ensure_built(cache_dir, kube_version=kube_version, progress=local.progress)
    return (
        f"kubelet:        {n.kubelet}\n"
        f"kube-controller-manager: {n.kube_controller_manager}\n"
        f"containerd:     {n.containerd}\n"
        f"runc:           {n.runc}\n"
        f"cni plugins:    {n.cni_bin_dir}\n"
        f"pause image:    {n.pause_image}"
    )


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
    from agent.fabric.emulator import cm_api

    server = EmulatorServer(
        _emulator_config(cfg),
        state_file=Path(em.state_file) if em.state_file else None,
        tls_dir=Path(em.tls_dir) if em.tls_dir else None,
        host=em.host,
        port=em.port,
        cluster_manager=cm_api.from_file(Path(em.config)) if em.config else None,
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


def manifests(cfg: settings.Settings, out: str, namespace: str = "kube-system") -> int:
    """Write the manifests into the directory `out`, or to standard output when it is "-";
    the ServiceAccounts and the Lease's Role in `namespace`."""
    from agent.manifests import installing

    if out == "-":
        sys.stdout.write(installing.stream(cfg.cluster.driver, namespace=namespace))
        return 0
    for path in installing.write(Path(out), cfg.cluster.driver, namespace=namespace):
        print(f"wrote {path}")
    return 0


async def install_crds(cfg: settings.Settings) -> int:
    from agent.kube.client import Kube
    from agent.manifests import installing

    async with await Kube.connect(
        kubeconfig=cfg.kube.kubeconfig, request_timeout=cfg.kube.kube_request_timeout
    ) as kube:
        await installing.install(kube, cfg.cluster.driver)
    from agent.manifests.cluster import device_class_name

    print(
        f"CRDs ({crds_names()}) and DeviceClass {device_class_name(cfg.cluster.driver)} installed"
    )
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
    the node role removes its plugin sockets.

    Under a `Type=notify` systemd unit ($NOTIFY_SOCKET set) it tells systemd READY=1 once every
    role serves, a STATUS= line as it changes, STOPPING=1 on SIGTERM, and feeds the watchdog
    ($WATCHDOG_USEC) from the event loop (agent.sdnotify)."""
    import signal

    from agent.fabric.backends import open_fabric
    from agent.kube.client import Kube

    roles = {r.strip() for r in cfg.cluster.roles.split(",") if r.strip()}
    unknown = roles - {"cluster", "node"}
    if unknown or not roles:
        raise errors.ConfigError("--roles", cfg.cluster.roles, "must name cluster and/or node")
    main = asyncio.current_task()
    assert main is not None
    notifier = sdnotify.Notifier.from_environ()

    def terminate() -> None:
        if notifier is not None:
            notifier.stopping()
        main.cancel()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, terminate)
    if cfg.cluster.stall_on_sigusr2:
        loop.add_signal_handler(signal.SIGUSR2, sdnotify.stall, cfg.cluster.stall_on_sigusr2)
    cohdi_ns = cfg.cluster.cohdi_config_namespace if "cluster" in roles else ""
    # bad settings exit here (with CoHDI's configuration: once it has been read, below)
    fabric = open_fabric(cfg.fabric) if "cluster" in roles and not cohdi_ns else None
    board = health.Health()
    try:
        async with await Kube.connect(
            kubeconfig=cfg.kube.kubeconfig, request_timeout=cfg.kube.kube_request_timeout
        ) as kube:
            units: dict[str, _Role] = {}
            source: CohdiSource | None = None
            if cohdi_ns:
                cfg, fabric, source = await _cohdi_source(kube, cfg, cohdi_ns)
                units["cohdi-config"] = source
            if "node" in roles:
                units["node"] = _NodeRole(kube, cfg)
            if fabric is not None:
                cluster = _ClusterRole(kube, cfg, fabric)
                cluster.pool_attributes = source.pool_attributes if source else None
                units["cluster"] = cluster
            await run_roles(units, board, cfg, notifier=notifier)
    except asyncio.CancelledError:
        return 0
    finally:
        if fabric is not None:
            await fabric.close()
        if notifier is not None:
            notifier.stopping()  # also when a setting or Ctrl-C ended the run
            notifier.close()
    return 0


async def _cohdi_source(
    kube: Kube, cfg: settings.Settings, namespace: str
) -> tuple[settings.Settings, FabricManager, CohdiSource]:
    """--cohdi-config-namespace: CoHDI's ConfigMap and Secret read (ConfigError when missing or
    invalid), the settings and the fabric client they give, and the unit that watches them."""
    from agent.controllers.cohdiconfig import CohdiSource

    source = CohdiSource(kube, namespace, environ=os.environ)
    await source.load()
    cfg = source.settings_for(cfg)
    return cfg, source.open_fabric(cfg.fabric), source


class _Role(Protocol):
    async def run(self) -> None: ...

    def not_ready(self) -> list[str]:
        """Why the role is not ready while it runs, one reason a line; empty when ready."""
        ...

    def serving(self) -> bool:
        """Start-up is over (systemd's READY=1): weaker than ready, which also needs what the
        role depends on (the fabric manager) to answer."""
        ...

    def status(self) -> str:
        """What the role is doing, one short line (systemd's STATUS=)."""
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
    notifier: sdnotify.Notifier | None = None,
) -> None:
    """Run each role as a supervised unit until cancelled, with a readiness check per role on
    `board` and the health endpoints served when --metrics-port is set; with a `notifier`, tell
    systemd when every role serves and what each does, and feed its watchdog. Returns only when
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
        async with asyncio.TaskGroup() as tg:
            if notifier is not None:
                tg.create_task(_keep_systemd(notifier, units, supervisor), name="sd-notify")
            await supervisor.run({name: unit.run for name, unit in units.items()})
    finally:
        if server is not None:
            await server.cleanup()


async def _keep_systemd(
    notifier: sdnotify.Notifier, units: dict[str, _Role], supervisor: supervision.Supervisor
) -> None:
    """READY=1 once every role serves, STATUS= (each role's line, or why it is restarting) and
    the watchdog's pings, from this event loop until cancelled."""

    def line(name: str, unit: _Role) -> str:
        state = supervisor.units.get(name)
        if state is None or state.starts == 0:
            return f"{name}: starting"
        if not state.running:  # no countdown in it: STATUS= changes only when the state does
            return f"{name}: failed {state.restarts}x, restarting: {state.error}"
        return unit.status() + (f" (restarted {state.restarts}x)" if state.error else "")

    def status() -> str:
        return "; ".join(line(name, unit) for name, unit in units.items())

    await sdnotify.keep_alive(
        notifier, ready=lambda: all(u.serving() for u in units.values()), status=status
    )


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
        self.elector: LeaderElector | None = None
        #: CoHDI's per-model dra-attributes (--cohdi-config-namespace), for vendor mode's pool
        self.pool_attributes: PoolAttributes | None = None

    async def run(self) -> None:
        from agent.controllers import running
        from agent.kube.leasing import LeaderElector

        cfg = self.cfg
        self.elector = elector = LeaderElector(
            self.kube,
            namespace=cfg.leader.namespace,
            name=cfg.leader.name,
            identity=cfg.identity,
            lease_duration=cfg.leader.duration,
            renew_deadline=cfg.leader.renew_deadline,
            retry_period=cfg.leader.retry_period,
        )

        async def lead() -> None:
            self.term = term = running.build(
                self.kube,
                self.fabric,
                cfg,
                identity=cfg.identity,
                pool_attributes=self.pool_attributes,
            )
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
        elector = self.elector
        if elector is not None and elector.holder is None:
            # no answer naming a holder yet: the API server is away, or the Lease cannot be read
            # or written (wrong namespace, RBAC) — no replica may act, so none is ready
            return ["Lease campaign has had no answer naming a holder yet"]
        return [] if self.term is None else self.term.not_ready()

    def serving(self) -> bool:
        """The campaign has had an answer: another replica holds the Lease, or we hold it and
        the term's informers have synced."""
        elector = self.elector
        if not self.campaigning or elector is None or elector.holder is None:
            return False
        if not elector.is_leader:
            return True
        return self.term is not None and all(i.synced.is_set() for i in self.term.informers)

    def status(self) -> str:
        elector = self.elector
        if not self.campaigning or elector is None:
            return "cluster: starting"
        if elector.holder is None:
            return "cluster: campaigning, no answer from the API server yet"
        if not elector.is_leader:
            return f"cluster: standby, Lease held by {elector.holder or 'nobody'}"
        if self.term is None or not self.serving():
            return "cluster: leader, informers syncing"
        problems = self.term.not_ready()
        if not problems:
            return "cluster: leader, fabric manager reachable"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"cluster: leader, not ready: {problems[0]}{more}"


class _NodeRole:
    """The node reporter (hot-plug, report, safe removal) and the DRA kubelet plugin. Ready once
    the plugin serves its sockets and the first PCI scan has finished. In vendor-driver mode
    (--vendor-driver) the vendor's kubelet plugin prepares the GPUs: ours does not run, and the
    role is hot-plug, identification and safe removal only."""

    def __init__(self, kube: Kube, cfg: settings.Settings) -> None:
        self.kube = kube
        self.cfg = cfg
        self.reporter: NodeReporter | None = None
        self.plugin: KubeletPlugin | None = None
        self.plugin_serving = False

    async def run(self) -> None:
        import socket

        from agent.node.plugin import KubeletPlugin
        from agent.node.reporting import NodeReporter

        cfg = self.cfg
        node = cfg.node.name or os.environ.get("NODE_NAME") or socket.gethostname()
        self.reporter = reporter = NodeReporter(self.kube, cfg.node, node=node)
        if cfg.cluster.vendor_driver:
            await reporter.run()
            return
        plugin = KubeletPlugin(
            self.kube,
            driver=cfg.cluster.driver,
            kubelet_dir=Path(cfg.node.kubelet_dir),
            cdi_dir=Path(cfg.node.cdi_dir),
            reporter=reporter,
            # its gRPC health service follows the role's readiness (not kubelet's registration,
            # which kubelet gives only to a plugin it can reach)
            not_ready=self._started_not_ready,
        )
        self.plugin = plugin
        try:
            await plugin.start()
            self.plugin_serving = True
            await reporter.run()
        finally:  # also after a failed start: whatever socket it made goes
            self.plugin_serving = False
            await plugin.stop()

    def not_ready(self) -> list[str]:
        """Why the role is not ready: not started (`_started_not_ready`) or, with
        --node-ready-after-registration, kubelet has not registered this process's plugin."""
        reasons = self._started_not_ready()
        plugin = self.plugin
        if (
            self.cfg.node.ready_after_registration
            and plugin is not None
            and self.plugin_serving
            and not plugin.registration.registered.is_set()
        ):
            if plugin.registration.refused:
                reasons.append(f"kubelet refused the plugin: {plugin.registration.refused}")
            else:
                reasons.append(
                    f"kubelet has not registered the plugin yet ({plugin.reg_socket}: is "
                    f"--node-kubelet-dir kubelet's root directory, and kubelet running?)"
                )
        return reasons

    def _started_not_ready(self) -> list[str]:
        wanted = not self.cfg.cluster.vendor_driver
        reasons = [] if self.plugin_serving or not wanted else ["kubelet plugin not serving"]
        if self.reporter is None or not self.reporter.scanned.is_set():
            reasons.append("first PCI scan not done")
        preparer = self.plugin.preparer if self.plugin is not None else None
        if preparer is not None and preparer.checkpoint_error:
            if preparer.checkpoint.path.exists():
                reasons.append(
                    f"kubelet plugin checkpoint unreadable (every prepare fails): "
                    f"{preparer.checkpoint_error}"
                )
            else:
                preparer.checkpoint_error = ""  # moved away: the next prepare starts afresh
        return reasons

    def serving(self) -> bool:
        return not self._started_not_ready()

    def status(self) -> str:
        reporter = self.reporter
        if reporter is None or not self.serving():
            return "node: starting (" + ", ".join(self._started_not_ready()) + ")"
        gpus = sum(1 for f in reporter.functions.values() if f.is_gpu)
        if self.cfg.cluster.vendor_driver:
            return f"node {reporter.node}: {gpus} GPU(s), {self.cfg.cluster.vendor_driver} prepares"
        plugin = self.plugin
        if plugin is not None and plugin.registration.registered.is_set():
            return f"node {reporter.node}: {gpus} GPU(s), kubelet plugin registered"
        return f"node {reporter.node}: {gpus} GPU(s), kubelet plugin serving"


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
