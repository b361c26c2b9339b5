"""Command line: argparse over the settings tree, one flag and one environment twin per setting.

Precedence: flag > environment (COHDI_*) > default. Settings are validated once, here, before
anything starts; a bad value exits with status 2 and a message naming the setting, the value and
what is allowed.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from agent import errors, logs, settings

RunAsync = Callable[[Callable[[], Coroutine[Any, Any, int]]], int]

_EPILOG = """\
Every setting has an environment twin: --lease-duration is also COHDI_LEASE_DURATION.
A flag wins over the environment, which wins over the default. `cohdi-agent COMMAND --help`
lists every setting with its default and unit.
"""


def _settings_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for info in settings.describe():
        group = groups.get(info.group)
        if group is None:
            title = {
                "logging": "logging",
                "kube": "Kubernetes API",
                "leader": "leader election (cluster role)",
                "cluster": "roles and the cluster role",
                "node": "node role",
                "fabric": "fabric manager",
                "emulator": "fabric emulator",
                "dev": "local control plane (tests, demo, benchmarks)",
            }[info.group]
            group = groups[info.group] = parent.add_argument_group(title)
        default = info.default if info.default != "" else "(empty)"
        unit = f" {info.unit}" if info.unit else ""
        text = f"{info.help} Default: {default}{unit}. Env: {info.env}."
        metavar = "|".join(info.choices) if info.choices else (info.unit.upper() or "VALUE")
        if info.unit == "s":
            metavar = "SECONDS"
        group.add_argument(info.flag, dest=info.flag, default=None, metavar=metavar, help=text)
    return parent


def build_parser() -> argparse.ArgumentParser:
    common = _settings_parent()
    parser = argparse.ArgumentParser(
        prog="cohdi-agent",
        description=(
            "Dynamic GPU provisioning for Kubernetes on composable disaggregated infrastructure: "
            "GPUs in a PCIe/CXL pool are attached to nodes on demand through Kubernetes DRA."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser(
        "version",
        parents=[common],
        help="print the version, Python and the Kubernetes version targeted",
    )

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="run the main job on the embedded default (local control plane, emulated fabric)",
        description=textwrap.dedent(
            """\
            Builds (first run only) and starts a local etcd + kube-apiserver + kube-scheduler
            (or uses --kubeconfig), the built-in fabric emulator with a pool of GPUs of two
            models, N simulated GPU servers each running the real node role (its own synthetic
            sysfs tree and stub NVML, fed by the emulator's hot-plug hook) and the cluster role.
            Then it submits pods with ResourceClaims in three bursts, shows pods and GPUs live,
            plays kubelet (NodePrepareResources over each server's plugin socket), lets pods
            finish, waits for idle GPUs to go back to the pool, prints per-pod latencies and
            writes a timeline plot. Ctrl-C stops every process.
            """
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--keep", action="store_true", help="keep everything running until Ctrl-C")
    demo.add_argument("--pods", type=int, default=24, help="pods in the workload (default 24)")
    demo.add_argument(
        "--duration",
        type=float,
        default=30.0,
        help="seconds over which the bursts arrive; pods live 15-35%% of it (default 30)",
    )
    demo.add_argument("--nodes", type=int, default=4, help="simulated GPU servers (default 4)")
    demo.add_argument("--gpus", type=int, default=16, help="pooled GPUs, two models (default 16)")
    demo.add_argument(
        "--latency",
        type=float,
        default=0.2,
        help="the emulated fabric's attach/detach time in seconds (default 0.2)",
    )

    sub.add_parser(
        "run",
        parents=[common],
        help="run the agent: the cluster role (leader-elected) and/or the node role (--roles)",
        description=textwrap.dedent(
            """\
            The cluster role publishes the fabric's GPUs as DRA ResourceSlices, attaches a GPU to
            the node the scheduler pinned a claim to, sets FabricDeviceReady once the node reports
            it, and detaches idle GPUs. Only the replica holding the Lease acts; the others wait.
            Needs --fabric-url (and credentials) and the CRDs (`cohdi-agent install-crds`).
            SIGTERM or Ctrl-C stop it cleanly and release the Lease.
            """
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_parser(
        "install-crds",
        parents=[common],
        help="create or update the CRDs and the DeviceClass in the cluster, wait until served",
    )
    manifests = sub.add_parser(
        "manifests",
        parents=[common],
        help="write the CRDs, DeviceClass and RBAC as YAML (this is how packaging/ is made)",
    )
    manifests.add_argument(
        "--out", default="packaging", help="directory to write (default: packaging)"
    )

    sub.add_parser(
        "fabric-emulator",
        parents=[common],
        help="run the built-in fabric manager (Redfish + FTI) on loopback until Ctrl-C",
        description=textwrap.dedent(
            """\
            Serves one emulated fabric over both wire protocols the agent speaks: DMTF Redfish
            composition under /redfish/v1 and the Fsas/FTI fabric-manager API under
            /fabric_manager/api/v1 (token at /id_manager/realms/<realm>/...). The admin API at
            /emulator/v1 reads the state and injects faults. Prints its URL (and CA) on start.
            """
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    dev = sub.add_parser(
        "dev-cluster",
        parents=[common],
        help="build, start or stop the local control plane by hand",
        description=textwrap.dedent(
            """\
            build  build etcd, kube-apiserver and kube-scheduler into the cache (once)
            up     start a cluster in the background; prints how to use it
            down   stop the cluster `up` started (by pid)
            env    print `export KUBECONFIG=...` for the running cluster
            status show whether it runs, with pids and the API server URL
            """
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dev.add_argument("action", choices=("build", "up", "down", "env", "status"))
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


def main(argv: list[str], *, run_async: RunAsync) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_settings(args, os.environ)
    except errors.ConfigError as exc:
        print(f"cohdi-agent: error: {exc}", file=sys.stderr)
        return 2
    logs.configure(level=cfg.logging.level, fmt=cfg.logging.format)

    from agent import app

    try:
        if args.command == "version":
            return app.version()
        if args.command == "dev-cluster":
            return app.dev_cluster(cfg, args.action)
        if args.command == "run":
            return run_async(lambda: app.run(cfg))
        if args.command == "install-crds":
            return run_async(lambda: app.install_crds(cfg))
        if args.command == "manifests":
            return app.manifests(cfg, args.out)
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
        print(f"cohdi-agent: {exc.fault} error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, errors.ConfigError) else 1
    parser.error(f"unknown command {args.command}")
    return 2
