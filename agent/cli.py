"""Command line: argparse over the settings tree, one flag and one environment twin per setting.

Each command's `--help` lists only the settings it uses (`SettingInfo.commands`), under its
group's heading, with what the value is (FILE, SECONDS, a|b...), its default and unit and its
environment twin. The global groups (logging, Kubernetes API: `settings.GLOBAL_GROUPS`) are
accepted before the command as well: `cohdi-agent --log-format json run`.

Precedence: flag > environment (COHDI_*) > default; a flag after the command wins over the same
flag before it. Settings are validated once, here, before anything starts; a bad value exits with
status 2 and a message naming the setting, the value and what is allowed — in the chosen log
format (`--log-format json` gives one JSON object), like every fatal error of a start.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from agent import errors, logs, settings

RunAsync = Callable[[Callable[[], Coroutine[Any, Any, int]]], int]

logger = logging.getLogger(__name__)

_EPILOG = """\
where to start:
  cohdi-agent demo                    everything on this machine: local control plane, emulated
                                      fabric, simulated GPU servers, a workload (about 30 s)
  cohdi-agent install-crds            once per cluster, as cluster-admin: CRDs and DeviceClass
  cohdi-agent manifests --out DIR     the same plus RBAC as YAML, for kubectl apply or a chart
  cohdi-agent run --roles cluster     one Deployment per cluster (leader-elected); needs
                  --fabric-url URL    the fabric manager's URL and credentials
  cohdi-agent run --roles node        on every GPU server (a DaemonSet or cohdi-agent.service)

The logging and Kubernetes API settings may come before the command or after it.
Every setting has an environment twin: --lease-duration is also COHDI_LEASE_DURATION.
A flag wins over the environment, which wins over the default. `cohdi-agent COMMAND --help`
lists the settings that command uses, with default and unit.
"""

#: How the fatal errors of this run are written ('text' or 'json'); set by `main` from argv and
#: the environment before anything is parsed.
_fatal_format = "text"


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors written in the chosen log format (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        if _fatal_format == "json":
            logs.fatal(f"{self.prog}: {message}", fmt="json", code=2, usage=True)
            sys.exit(2)
        super().error(message)


def _text(info: settings.SettingInfo) -> str:
    default = info.default if info.default != "" else "(empty)"
    unit = f" {info.unit}" if info.unit else ""
    return f"{info.help} Default: {default}{unit}. Env: {info.env}."


def _add_settings(parser: argparse.ArgumentParser, infos: Iterable[settings.SettingInfo]) -> None:
    """One argument group per settings group, in declaration order. Defaults are SUPPRESS, so a
    flag absent after the command does not undo the same flag given before it."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for info in infos:
        group = groups.get(info.group)
        if group is None:
            group = groups[info.group] = parser.add_argument_group(info.title)
        group.add_argument(
            info.flag,
            dest=info.flag,
            default=argparse.SUPPRESS,
            metavar=info.metavar,
            help=_text(info),
        )


def settings_of(command: str) -> list[settings.SettingInfo]:
    """The settings `command` uses, in declaration order."""
    return [i for i in settings.describe() if command in i.commands]


def _command(
    sub: Any, name: str, *, help: str, description: str = "", usage: str = ""
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        usage=f"%(prog)s [-h] [SETTING ...]{usage}",
        description=textwrap.dedent(description) if description else help[:1].upper() + help[1:],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_settings(parser, settings_of(name))
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cohdi-agent",
        description=(
            "Dynamic GPU provisioning for Kubernetes on composable disaggregated infrastructure: "
            "GPUs in a PCIe/CXL pool are attached to nodes on demand through Kubernetes DRA."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_settings(parser, (i for i in settings.describe() if i.group in settings.GLOBAL_GROUPS))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _command(sub, "version", help="print the version, Python and the Kubernetes version targeted")

    demo = _command(
        sub,
        "demo",
        help="run the main job on the embedded default (local control plane, emulated fabric)",
        description="""\
            Builds (first run only) and starts a local etcd + kube-apiserver + kube-scheduler
            (or uses --kubeconfig), the built-in fabric emulator with a pool of GPUs of two
            models, N simulated GPU servers each running the real node role (its own synthetic
            sysfs tree and stub NVML, fed by the emulator's hot-plug hook) and the cluster role.
            Then it submits pods with ResourceClaims in three bursts, shows pods and GPUs live,
            plays kubelet (NodePrepareResources over each server's plugin socket), lets pods
            finish, waits for idle GPUs to go back to the pool, prints per-pod latencies and
            writes a timeline plot. Ctrl-C, SIGTERM or SIGHUP stop every process it started.
            """,
    )
    own = demo.add_argument_group("the demo")
    own.add_argument("--keep", action="store_true", help="keep everything running until Ctrl-C")
    own.add_argument(
        "--pods", type=int, default=24, metavar="N", help="pods in the workload (default 24)"
    )
    own.add_argument(
        "--duration",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds over which the bursts arrive; pods live 15-35%% of it (default 30)",
    )
    own.add_argument(
        "--nodes", type=int, default=4, metavar="N", help="simulated GPU servers (default 4)"
    )
    own.add_argument(
        "--gpus", type=int, default=16, metavar="N", help="pooled GPUs, two models (default 16)"
    )
    own.add_argument(
        "--latency",
        type=float,
        default=0.2,
        metavar="SECONDS",
        help="the emulated fabric's attach/detach time in seconds (default 0.2)",
    )

    _command(
        sub,
        "run",
        help="run the agent: the cluster role (leader-elected) and/or the node role (--roles)",
        description="""\
            Runs the roles --roles names until SIGTERM or Ctrl-C (which stop it cleanly).

            cluster  one Deployment per cluster; only the replica holding the Lease acts. It
                     publishes the fabric's GPUs as DRA ResourceSlices, attaches a GPU to the
                     node the scheduler pinned a claim to, sets FabricDeviceReady once the node
                     reports it, and detaches idle GPUs. Needs --fabric-url (and credentials)
                     and the CRDs (`cohdi-agent install-crds`). Releases the Lease on exit.
            node     on every GPU server: the DRA kubelet plugin (prepare/unprepare, CDI),
                     hot-plug of attached GPUs, NodeReady/NodeReleased reports, safe removal
                     (no process, no open handle) before a detach.

            Without --roles the host decides, and the choice is logged at start: 'cluster'
            when --fabric-url is set, else 'node' when kubelet's plugin registry
            (<--node-kubelet-dir>/plugins_registry) exists, else exit status 2.
            With --metrics-port: /metrics, /healthz and /readyz for every role.
            """,
    )
    _command(
        sub,
        "install-crds",
        help="create or update the CRDs and the DeviceClass in the cluster (needs cluster-admin)",
        description="""\
            Creates or updates the two CRDs (composableresources, composabilityrequests in
            cro.hpsys.ibm.ie.com) and the DeviceClass of --driver, and waits until the CRDs are
            served. Needs cluster-admin (creating CustomResourceDefinitions and DeviceClasses is
            a cluster-wide right the agent itself never has); run it once per cluster and after
            each upgrade. `cohdi-agent manifests` writes the same objects (and RBAC) as YAML.
            """,
    )
    manifests = _command(
        sub,
        "manifests",
        help="write the CRDs, DeviceClass and RBAC as YAML (this is how packaging/ is made)",
        description="""\
            Writes crds.yaml, deviceclass.yaml and rbac.yaml into --out (default: packaging),
            or all of them as one multi-document YAML stream to standard output with --out -.
            Needs no cluster.
            """,
    )
    manifests_args = manifests.add_argument_group("the manifests")
    manifests_args.add_argument(
        "--out",
        default="packaging",
        metavar="DIR|-",
        help="directory to write, or - for standard output (default: packaging)",
    )
    manifests_args.add_argument(
        "--namespace",
        default="kube-system",
        metavar="NAMESPACE",
        help="namespace of the agent's ServiceAccounts and of the cluster role's Lease (give "
        "`run` the same Lease namespace; default: kube-system)",
    )

    _command(
        sub,
        "fabric-emulator",
        help="run the built-in fabric manager (Redfish + FTI) on loopback until Ctrl-C",
        description="""\
            Serves one emulated fabric over both wire protocols the agent speaks: DMTF Redfish
            composition under /redfish/v1 and the Fsas/FTI fabric-manager API under
            /fabric_manager/api/v1 (token at /id_manager/realms/<realm>/...). The admin API at
            /emulator/v1 reads the state and injects faults. Prints its URL (and CA) on start.
            """,
    )

    dev = _command(
        sub,
        "dev-cluster",
        help="build, start or stop the local control plane by hand",
        usage=" {build,up,down,env,status,image}",
        description="""\
            build  build etcd, kube-apiserver, kube-scheduler and helm into the cache (once;
                   needs Go >= 1.26 on PATH); as root on Linux also the test bed's real node:
                   kubelet, kube-controller-manager, containerd, runc, CNI plugins, pause image
            up     start a cluster in the background; prints how to use it
            down   stop the cluster `up` started (by pid)
            env    print `export KUBECONFIG=...` for the running cluster
            status show whether it runs, with pids and the API server URL
            image  build the agent's container image (no registry: a Debian base from
                   Debian's packages, buildah, runc) into the cache as an OCI archive;
                   prints its path and reference (`ctr images import` / `podman load` it);
                   needs root (installs buildah and runc with apt-get when missing)
            The cache is --dev-cache-dir (below); nothing is written into the repository.
            """,
    )
    dev.add_argument("action", choices=("build", "up", "down", "env", "status", "image"))
    return parser


def load_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> settings.Settings:
    raw: dict[str, str] = {}
    for info in settings.describe():
        if info.env in environ:
            raw[info.flag] = environ[info.env]
        value = getattr(args, info.flag, None)
        if value is not None:
            raw[info.flag] = value
    return settings.load(raw)


def resolve_roles(cfg: settings.Settings) -> settings.Settings:
    """`cfg` with --roles filled in from what this host implies (`settings.implied_roles`),
    logging the choice and why. Raises ConfigError when nothing implies a role."""
    roles, why = settings.implied_roles(cfg, is_dir=Path.is_dir)
    logger.info("roles: %s (%s)", ",".join(roles), why)
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, roles=",".join(roles)))


def main(argv: list[str], *, run_async: RunAsync) -> int:
    global _fatal_format
    fmt = _fatal_format = logs.wanted_format(argv, os.environ)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_settings(args, os.environ)
    except errors.ConfigError as exc:
        logs.fatal(str(exc), fault=exc.fault, fmt=fmt, code=2)
        return 2
    fmt = _fatal_format = cfg.logging.format
    logs.configure(level=cfg.logging.level, fmt=fmt)

    from agent import app

    try:
        if args.command == "version":
            return app.version()
        if args.command == "dev-cluster":
            return app.dev_cluster(cfg, args.action)
        if args.command == "run":
            running = resolve_roles(cfg)
            return run_async(lambda: app.run(running))
        if args.command == "install-crds":
            return run_async(lambda: app.install_crds(cfg))
        if args.command == "manifests":
            return app.manifests(cfg, args.out, args.namespace)
        if args.command == "fabric-emulator":
            return run_async(lambda: app.fabric_emulator(cfg))
        if args.command == "demo":
            return run_async(
                lambda: app.demo(
                    cfg,
                    keep=args.keep,
                    pods=args.pods,
                    duration=args.duration,
                    nodes=args.nodes,
                    gpus=args.gpus,
                    latency=args.latency,
                )
            )
    except errors.AgentError as exc:
        code = 2 if isinstance(exc, errors.ConfigError) else 1
        logs.fatal(str(exc), fault=exc.fault, fmt=fmt, code=code)
        return code
    except Exception:  # a bug: logged whole (traceback) in the chosen format, exit 1
        logger.critical("%s failed unexpectedly", args.command, exc_info=True)
        return 1
    parser.error(f"unknown command {args.command}")
