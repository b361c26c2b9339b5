"""One frozen settings object, in groups, validated once at start.

Every field carries its documentation (help, unit, default) in its metadata; `agent.cli` turns each
field into a command-line flag and an environment twin (`--lease-duration` / `COHDI_LEASE_DURATION`)
and `load()` converts and validates the raw strings. A bad value raises `ConfigError` naming the
setting, the value and what is allowed; the CLI turns that into exit status 2.

This module must not read the environment or argv itself: it only converts what it is given, so
tests build settings with plain keyword arguments.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, TypeVar

from agent import KUBERNETES_VERSION, errors

T = TypeVar("T")

#: The Kubernetes releases the local control plane is built at (`--dev-kube-version`) and the test
#: suite runs against: the first, the release this version targets, is the default; `./dev test`
#: runs the tests marked `all_kube_versions` again on each of the others.
KUBE_VERSIONS: Final = (KUBERNETES_VERSION, "v1.37.2")


#: Every command of the CLI, in the order `cohdi-agent --help` lists them. A group's `COMMANDS`
#: (or a setting's own `commands=`) names the ones that use it; each command's `--help` shows
#: exactly those settings.
COMMANDS: Final = (
    "version",
    "demo",
    "run",
    "install-crds",
    "manifests",
    "fabric-emulator",
    "dev-cluster",
)

#: Groups whose flags every command accepts before its name too (`cohdi-agent --log-format json
#: run`), so a wrapper can put them first whatever the command.
GLOBAL_GROUPS: Final = ("logging", "kube")


def setting(
    default: T,
    help: str,
    *,
    unit: str = "",
    choices: tuple[str, ...] = (),
    minimum: float | None = None,
    maximum: float | None = None,
    metavar: str = "",
    commands: tuple[str, ...] = (),
) -> T:
    """A dataclass field with the documentation and limits the CLI and `load()` need.

    `metavar` is what the value is (FILE, DIR, URL...; derived for numbers and choices: SECONDS,
    N, a|b); `commands` narrows the group's `COMMANDS` for this one setting."""
    meta = {
        "help": help,
        "unit": unit,
        "choices": choices,
        "min": minimum,
        "max": maximum,
        "metavar": metavar,
        "commands": commands,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    """How the agent logs. Flags: --log-*."""

    PREFIX: ClassVar[str] = "log-"
    TITLE: ClassVar[str] = "logging"
    COMMANDS: ClassVar[tuple[str, ...]] = COMMANDS
    level: str = setting(
        "info",
        "Lowest level logged.",
        choices=("debug", "info", "warning", "error"),
    )
    format: str = setting(
        "text",
        "'text' for a terminal, 'json' (one object a line) for a log collector.",
        choices=("text", "json"),
    )


@dataclass(frozen=True, slots=True)
class KubeSettings:
    """How the agent reaches the Kubernetes API server. Flags: --kube-*, --kubeconfig."""

    PREFIX: ClassVar[str] = ""
    TITLE: ClassVar[str] = "Kubernetes API"
    COMMANDS: ClassVar[tuple[str, ...]] = ("run", "install-crds", "demo")
    kubeconfig: str = setting(
        "",
        "Path of a kubeconfig file. Empty: the in-cluster service account when running in a pod, "
        "else $KUBECONFIG, else ~/.kube/config.",
        metavar="FILE",
    )
    kube_request_timeout: float = setting(
        30.0,
        "Limit on one ordinary API request (not watches).",
        unit="s",
        minimum=0.1,
        commands=("run", "install-crds"),
    )
    kube_watch_timeout: float = setting(
        300.0,
        "Server-side timeout of one watch request; the watch then resumes from the last "
        "resourceVersion seen. Shorter means more reconnects, longer means slower detection of a "
        "silently dead connection (bookmarks arrive about once a minute).",
        unit="s",
        minimum=1,
        maximum=3600,
        commands=("run",),
    )
    kube_backoff_max: float = setting(
        30.0,
        "Ceiling of the exponential backoff after API errors (it starts at 0.2 s).",
        unit="s",
        minimum=0.2,
        commands=("run",),
    )


@dataclass(frozen=True, slots=True)
class LeaderSettings:
    """Leader election of the cluster role on a coordination.k8s.io/v1 Lease. Flags: --lease-*."""

    PREFIX: ClassVar[str] = "lease-"
    TITLE: ClassVar[str] = "leader election (cluster role)"
    COMMANDS: ClassVar[tuple[str, ...]] = ("run",)
    namespace: str = setting("kube-system", "Namespace of the Lease.", metavar="NAMESPACE")
    name: str = setting(
        "cohdi-agent", "Name of the Lease; one per cluster and driver.", metavar="NAME"
    )
    identity: str = setting(
        "",
        "This replica's identity in the Lease. Empty: <hostname>_<pid>.",
        metavar="NAME",
    )
    duration: float = setting(
        15.0,
        "How long a Lease stays valid after its last renewal. A candidate takes over only after "
        "seeing no renewal for this long; so this bounds fail-over time after a crash.",
        unit="s",
        minimum=1,
    )
    renew_deadline: float = setting(
        10.0,
        "The leader stops acting if it could not renew for this long. Must be below the lease "
        "duration, so the old leader has stopped before anyone else may start.",
        unit="s",
        minimum=0.5,
    )
    retry_period: float = setting(
        2.0,
        "Interval between renewals by the leader and acquisition attempts by candidates.",
        unit="s",
        minimum=0.05,
    )


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """What `cohdi-agent run` does. Flags: --driver, --roles, --claim-deadline, ..."""

    PREFIX: ClassVar[str] = ""
    TITLE: ClassVar[str] = "roles, the cluster role, metrics"
    COMMANDS: ClassVar[tuple[str, ...]] = ("run",)
    roles: str = setting(
        "",
        "Comma-separated roles this process runs: 'cluster' (leader-elected publisher, scaler, "
        "composer; one Deployment per cluster) and/or 'node' (kubelet plugin, hot-plug, safe "
        "removal; on every GPU server). Empty: what this host implies, logged at start: "
        "'cluster' when --fabric-url is set (only the cluster role talks to the fabric manager), "
        "else 'node' when kubelet's plugin registry <--node-kubelet-dir>/plugins_registry exists; "
        "neither exits with status 2. Both roles in one process need 'cluster,node'.",
        metavar="ROLE[,ROLE]",
    )
    driver: str = setting(
        "composable.cohdi.io",
        "DRA driver name of the pool slices and the kubelet plugin (a DNS subdomain you own).",
        metavar="NAME",
        commands=("run", "install-crds", "manifests", "demo"),
    )
    vendor_driver: str = setting(
        "",
        "Vendor-driver mode (CoHDI's): publish the pool under this vendor DRA driver's name (e.g. "
        "gpu.nvidia.com) with CoHDI's conditions and attributes, and once an attached GPU shows "
        "in the vendor's node-local slices (matched by its uuid attribute) set "
        "FabricDeviceReschedule on the claim, so the scheduler reallocates it onto the vendor's "
        "device; the node role then runs without its kubelet plugin. Empty: off.",
        metavar="NAME",
        commands=("run",),
    )
    claim_deadline: float = setting(
        480.0,
        "How long after allocation a claim may wait for its device before FabricDeviceFailed is "
        "set; keep it well below the scheduler's bindingTimeout (600 s by default).",
        unit="s",
        minimum=1,
    )
    idle_grace: float = setting(
        300.0,
        "How long an attached device may sit unallocated before it is detached (scale-down).",
        unit="s",
        minimum=0,
    )
    scale_down_settle: float = setting(
        5.0,
        "Before an idle device is detached it is withheld from the slices for this long, and "
        "only detached if no claim took it meanwhile (the scheduler's view of the slices and its "
        "in-flight allocations lag our writes by this much at most).",
        unit="s",
        minimum=0,
    )
    warm_devices: int = setting(
        0,
        "Idle GPUs of each model kept attached on every node wired to a fabric (warm capacity: a "
        "pod lands on one at once, with no attach and no binding-condition wait); a node's "
        "cohdi.io/warm-devices label overrides it; 0 turns it off.",
        minimum=0,
        maximum=64,
        commands=("run", "demo"),
    )
    health_grace: float = setting(
        60.0,
        "An unhealthy GPU's device taint (cohdi.io/unhealthy) lifts once the node and the fabric "
        "have both reported it healthy for this long (a flapping link does not flap the slices).",
        unit="s",
        minimum=0,
    )
    health_fatal_effect: str = setting(
        "NoSchedule",
        "Effect of the taint on a GPU the node reported a fatal error for (Xid, double-bit ECC, "
        "fallen off the bus): 'NoSchedule' keeps new pods off it; 'NoExecute' also lets "
        "kube-controller-manager evict the pods using it. Fabric-reported health is always "
        "NoSchedule.",
        choices=("NoSchedule", "NoExecute"),
    )
    node_gone_grace: float = setting(
        60.0,
        "A resource whose Node object is gone is detached without the node's NodeReleased after "
        "this long, with a Warning Event (the node cannot answer any more).",
        unit="s",
        minimum=0,
    )
    metrics_port: int = setting(
        0,
        "Serve /metrics (Prometheus), /healthz and /readyz on <--metrics-address>:<port>, for "
        "every role this process runs; 0 turns them off.",
        minimum=0,
        maximum=65535,
        metavar="PORT",
    )
    metrics_address: str = setting(
        "127.0.0.1",
        "Address the metrics and health endpoints listen on: the pod IP (or 0.0.0.0) lets "
        "Prometheus and kubelet's probes reach them.",
        metavar="ADDRESS",
    )
    workers: int = setting(
        64, "Claims (and resources) worked on in parallel.", minimum=1, maximum=4096
    )
    request_max_size: int = setting(
        64,
        "Largest spec.resource.size a ComposabilityRequest may ask for. A larger request is "
        "refused (condition Refused=True reason TooLarge, a Warning Event) and nothing is "
        "created for it. The CRD itself rejects sizes above 1024.",
        minimum=0,
        maximum=1024,
    )
    machine_provider_schemes: str = setting(
        "fsas-cdi",
        "Comma-separated spec.providerID schemes that name a Node's fabric machine: "
        "<scheme>://.../<machine id> (CoHDI's fsas-cdi://<machine uuid>). Nodes are matched to "
        "machines by providerID, then by --machine-keys, then by name.",
        metavar="SCHEME[,SCHEME]",
    )
    machine_keys: str = setting(
        "cohdi.io/machine",
        "Comma-separated Node label or annotation keys whose value is the node's fabric machine "
        "id (used when the providerID names none).",
        metavar="KEY[,KEY]",
    )
    cohdi_config_namespace: str = setting(
        "",
        "Read CoHDI's own configuration from this namespace (usually composable-dra) and watch "
        "it: ConfigMap composable-dra-dds (device-info: the models; label-prefix) and Secret "
        "composable-dra-secret (username, password, realm, client_id, client_secret, "
        "certificate). It implies --fabric-backend fti; the fabric URL, tenant and cluster come "
        "from CoHDI's variables CDI_ENDPOINT, TENANT_ID, CLUSTER_ID and USE_CM when the "
        "--fabric-* settings do not give them. Empty: not used.",
        metavar="NAMESPACE",
    )
    stall_on_sigusr2: float = setting(
        0.0,
        "Testing only: on SIGUSR2, block the event loop for this long (a synchronous sleep), so "
        "that systemd's watchdog (WatchdogSec=) sees the pings stop and restarts the process. "
        "0: SIGUSR2 is not handled.",
        unit="s",
        minimum=0,
        maximum=3600,
    )


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """The node role (`--roles node`, on every GPU server). Flags: --node-*."""

    PREFIX: ClassVar[str] = "node-"
    TITLE: ClassVar[str] = "node role"
    COMMANDS: ClassVar[tuple[str, ...]] = ("run",)
    name: str = setting(
        "",
        "This node's Kubernetes name. Empty: $NODE_NAME (downward API), else the host name.",
        metavar="NODE",
    )
    sysfs_root: str = setting(
        "/sys",
        "Where the PCI tree is read. Another path runs the same code over a synthetic tree "
        "(tests, the demo's simulated nodes): hot-plug then comes from inotify, not netlink.",
        metavar="DIR",
    )
    nvml_path: str = setting(
        "libnvidia-ml.so.1",
        "NVML library to dlopen. Missing: the node runs without NVML (no UUIDs, no process "
        "checks before a detach).",
        metavar="LIBRARY",
    )
    rescan: str = setting(
        "auto",
        "Write bus/pci/rescan after the fabric reports an attach: 'always', 'never', or 'auto' "
        "(when the device has not appeared by itself within --node-rescan-after).",
        choices=("auto", "always", "never"),
    )
    rescan_after: float = setting(
        0.5,
        "How long 'auto' waits for a hot-plug interrupt before rescanning.",
        unit="s",
        minimum=0,
    )
    resync: float = setting(
        300.0,
        "Safety interval of a full rescan of the PCI tree (events are the normal path).",
        unit="s",
        minimum=1,
    )
    kubelet_dir: str = setting(
        "/var/lib/kubelet",
        "Kubelet's directory: the plugin's sockets go in <dir>/plugins_registry/<driver>-<id>-"
        "reg.sock and <dir>/plugins/<driver>/dra-<id>.sock (<id>: the process's), its checkpoint "
        "beside the latter.",
        metavar="DIR",
    )
    ready_after_registration: bool = setting(
        False,
        "Count the node role ready (/readyz) only once kubelet has registered this process's "
        "plugin (kubelet's NotifyRegistrationStatus call). Under a DaemonSet's rolling update "
        "the old pod then stops only after kubelet knows the new one, so the driver is never "
        "unregistered in between (the Helm chart turns it on). systemd's READY=1 and the "
        "plugin's gRPC health never wait for kubelet.",
    )
    cdi_dir: str = setting(
        "/var/run/cdi",
        "Where CDI spec files of prepared claims are written (the runtime's dynamic CDI dir).",
        metavar="DIR",
    )
    fatal_xids: str = setting(
        "48,62,63,64,74,79,95,119,120,140",
        "Xids (NVML critical-error events) that make a GPU unhealthy, comma-separated. Default: "
        "those whose immediate action in NVIDIA's Xid catalogue is a GPU reset or more (DBE, "
        "micro-controller halt, row remapping pending/failed, NVLink, fallen off the bus, "
        "uncontained ECC, GSP timeout/error, unrecovered ECC); application Xids (13, 31, 43, "
        "45...) and contained ECC (94) are not. Double-bit ECC, fatal poison, DRAM retirement "
        "failure and GPU-unavailable events count whatever this says.",
        metavar="N,N...",
    )
    health_hold: float = setting(
        300.0,
        "A GPU's fault clears (DeviceHealthy=True again) once it has answered NVML this long "
        "with no new fatal event; a GPU reset or re-attach is what normally gets it there.",
        unit="s",
        minimum=0,
    )


@dataclass(frozen=True, slots=True)
class FabricSettings:
    """How the agent reaches the fabric manager. Flags: --fabric-*. Secrets never go on the
    command line: the password comes from --fabric-password-file, the systemd credential
    `fabric-password` ($CREDENTIALS_DIRECTORY, a unit's LoadCredential=) or $COHDI_FABRIC_PASSWORD
    (and the FTI client secret from --fabric-client-secret-file, the credential
    `fabric-client-secret` or $COHDI_FABRIC_CLIENT_SECRET)."""

    PREFIX: ClassVar[str] = "fabric-"
    TITLE: ClassVar[str] = "fabric manager (cluster role)"
    COMMANDS: ClassVar[tuple[str, ...]] = ("run",)
    backend: str = setting(
        "redfish",
        "Wire protocol of the fabric manager: DMTF Redfish composition, or the Fsas/FTI "
        "fabric-manager API that CoHDI speaks.",
        choices=("redfish", "fti"),
        commands=("run", "demo"),
    )
    url: str = setting(
        "",
        "Base URL of the fabric manager, e.g. https://fm.example:443. Empty: the embedded "
        "emulator (demo) or none.",
        metavar="URL",
    )
    user: str = setting("", "User name for the fabric manager.", metavar="NAME")
    password_file: str = setting(
        "",
        "File holding the fabric manager password (first line). Empty: the systemd credential "
        "'fabric-password' if the unit passes one, else $COHDI_FABRIC_PASSWORD.",
        metavar="FILE",
    )
    ca_bundle: str = setting(
        "",
        "PEM file of CAs to trust for the fabric manager's TLS certificate. Empty: the system "
        "trust store. Verification is never switched off.",
        metavar="FILE",
    )
    timeout: float = setting(
        30.0,
        "Limit on one HTTP call to the fabric manager.",
        unit="s",
        minimum=0.1,
    )
    operation_timeout: float = setting(
        300.0,
        "Limit on one attach or detach, following the fabric's task or synchronous answer; the "
        "scaler's deadline sits below the scheduler's binding timeout.",
        unit="s",
        minimum=1,
    )
    concurrency: int = setting(
        32,
        "Attach/detach operations in flight at once, across devices (one at a time per device).",
        minimum=1,
        maximum=1024,
    )
    retries: int = setting(
        5,
        "Attempts for a call that failed transiently (5xx, timeout, garbage), with exponential "
        "backoff from 0.1 s; permanent errors are never retried.",
        minimum=1,
        maximum=50,
    )
    poll_interval: float = setting(
        2.0,
        "How often to poll the fabric for changes when it has no push channel (conditional "
        "GET with ETag: an unchanged fabric costs one 304).",
        unit="s",
        minimum=0.05,
    )
    tenant: str = setting("", "FTI tenant_uuid.", metavar="UUID")
    realm: str = setting(
        "cdi", "FTI identity-manager realm for the token endpoint.", metavar="NAME"
    )
    client_id: str = setting("cohdi-agent", "FTI OpenID client_id.", metavar="NAME")
    client_secret_file: str = setting(
        "",
        "File holding the FTI OpenID client secret. Empty: the systemd credential "
        "'fabric-client-secret' if the unit passes one, else $COHDI_FABRIC_CLIENT_SECRET, or none.",
        metavar="FILE",
    )
    models: str = setting(
        "",
        "FTI only: comma-separated models whose free count to ask the fabric for (the FTI API "
        "lists no free device, only counts per model).",
        metavar="MODEL[,MODEL]",
    )
    cm_cluster: str = setting(
        "",
        "FTI only: the cluster-manager cluster uuid (CoHDI's CLUSTER_ID with USE_CM): per-node "
        "minimum and maximum device counts per model are read from the cluster manager's node "
        "groups and written as the nodes' cohdi.io/min-devices and cohdi.io/max-devices labels "
        "(the models' sums). Empty: the cluster manager is not used.",
        metavar="UUID",
    )
    processor_types: str = setting(
        "GPU,Accelerator",
        "Redfish only: comma-separated DMTF ProcessorTypes (GPU, Accelerator, FPGA, ...) whose "
        "ResourceBlocks (ResourceBlockType Processor) are pooled; other blocks are not offered.",
        metavar="TYPE[,TYPE]",
    )


@dataclass(frozen=True, slots=True)
class EmulatorSettings:
    """`cohdi-agent fabric-emulator`: the built-in fabric manager. Flags: --emulator-*."""

    PREFIX: ClassVar[str] = "emulator-"
    TITLE: ClassVar[str] = "fabric emulator"
    COMMANDS: ClassVar[tuple[str, ...]] = ("fabric-emulator",)
    config: str = setting(
        "",
        "YAML/JSON file with machines, devices and users (see agent/fabric/emulator/config.py). "
        "Empty: the embedded default (--emulator-nodes machines, --emulator-gpus GPUs of two "
        "models, user 'admin' whose password is $COHDI_FABRIC_PASSWORD or generated).",
        metavar="FILE",
    )
    state_file: str = setting(
        "",
        "Where attachments are persisted (atomically) so a restart keeps them. Empty: in memory.",
        metavar="FILE",
    )
    host: str = setting("127.0.0.1", "Address to listen on.", metavar="ADDRESS")
    port: int = setting(
        0,
        "Port to listen on; 0 picks a free one (printed).",
        minimum=0,
        maximum=65535,
        metavar="PORT",
    )
    tls_dir: str = setting(
        "",
        "Serve HTTPS with a CA and certificate generated into this directory (clients trust "
        "<dir>/ca.crt). Empty: plain HTTP.",
        metavar="DIR",
    )
    nodes: int = setting(4, "Machines in the embedded default.", minimum=1, maximum=10000)
    gpus: int = setting(16, "GPUs in the embedded default.", minimum=0, maximum=100000)
    latency: float = setting(
        0.0, "Attach and detach latency of every GPU in the embedded default.", unit="s", minimum=0
    )


@dataclass(frozen=True, slots=True)
class DevClusterSettings:
    """The local control plane (etcd + kube-apiserver + kube-scheduler) for tests and the demo.
    Flags: --dev-*."""

    PREFIX: ClassVar[str] = "dev-"
    TITLE: ClassVar[str] = "local control plane (tests, demo, benchmarks)"
    COMMANDS: ClassVar[tuple[str, ...]] = ("dev-cluster", "demo")
    cache_dir: str = setting(
        "",
        "Where the Go builds of etcd, kube-apiserver and kube-scheduler are kept (outside the "
        "repository). Empty: $XDG_CACHE_HOME/cohdi-agent, else ~/.cache/cohdi-agent.",
        metavar="DIR",
        commands=("dev-cluster", "demo", "fabric-emulator"),
    )
    state_dir: str = setting(
        "",
        "Where `dev-cluster up` keeps certificates, etcd data, logs and its pid file. "
        "Empty: <cache dir>/dev-cluster.",
        metavar="DIR",
    )
    kube_version: str = setting(
        KUBE_VERSIONS[0],
        "The Kubernetes release of the local control plane (each is built once and cached).",
        choices=KUBE_VERSIONS,
    )
    binding_timeout: float = setting(
        600.0,
        "The scheduler's DRA bindingTimeout (DynamicResourcesArgs): how long a pod waits in "
        "PreBind for binding conditions before the allocation is dropped.",
        unit="s",
        minimum=1,
    )


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable, in groups. Build with `load()` or with keyword arguments."""

    logging: LoggingSettings = field(default_factory=LoggingSettings)
    kube: KubeSettings = field(default_factory=KubeSettings)
    leader: LeaderSettings = field(default_factory=LeaderSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    node: NodeSettings = field(default_factory=NodeSettings)
    fabric: FabricSettings = field(default_factory=FabricSettings)
    emulator: EmulatorSettings = field(default_factory=EmulatorSettings)
    dev: DevClusterSettings = field(default_factory=DevClusterSettings)

    def __post_init__(self) -> None:
        fab = self.fabric
        if fab.cm_cluster and fab.backend != "fti" and not self.cluster.cohdi_config_namespace:
            raise errors.ConfigError(
                flag_of("fabric", "cm_cluster"),
                fab.cm_cluster,
                "the cluster manager is an FTI API: it needs --fabric-backend fti",
            )
        ld = self.leader
        if not ld.renew_deadline < ld.duration:
            raise errors.ConfigError(
                flag_of("leader", "renew_deadline"),
                ld.renew_deadline,
                f"must be below --lease-duration ({ld.duration} s)",
            )
        if not ld.retry_period < ld.renew_deadline:
            raise errors.ConfigError(
                flag_of("leader", "retry_period"),
                ld.retry_period,
                f"must be below --lease-renew-deadline ({ld.renew_deadline} s)",
            )

    @property
    def identity(self) -> str:
        return self.leader.identity or f"{socket.gethostname()}_{os.getpid()}"

    @property
    def cache_dir(self) -> Path:
        if self.dev.cache_dir:
            return Path(self.dev.cache_dir).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "cohdi-agent"

    @property
    def dev_state_dir(self) -> Path:
        return (
            Path(self.dev.state_dir).expanduser()
            if self.dev.state_dir
            else self.cache_dir / "dev-cluster"
        )


ROLES: Final = ("cluster", "node")


def implied_roles(cfg: Settings, *, is_dir: Callable[[Path], bool]) -> tuple[tuple[str, ...], str]:
    """The roles `run` runs and why, for the log line at start: ``(("node",), "...")``.

    --roles given: those (in `ROLES` order), "from --roles". Empty: 'cluster' when --fabric-url
    is set, else 'node' when `is_dir(<--node-kubelet-dir>/plugins_registry)` (kubelet's plugin
    registry: a kubelet runs here). Raises `ConfigError` naming --roles for an unknown role, or
    when it is empty and nothing implies one (a GPU server never silently runs no node role)."""
    flag = flag_of("cluster", "roles")
    where = f"{flag} (COHDI_ROLES)"
    given = {r.strip() for r in cfg.cluster.roles.split(",") if r.strip()}
    if given:
        unknown = given - set(ROLES)
        if unknown:
            raise errors.ConfigError(where, cfg.cluster.roles, "must name cluster and/or node")
        return tuple(r for r in ROLES if r in given), f"from {flag}"
    if cfg.fabric.url:
        return ("cluster",), f"{flag} not given; {flag_of('fabric', 'url')} is set"
    if cfg.cluster.cohdi_config_namespace:
        cohdi = flag_of("cluster", "cohdi_config_namespace")
        return ("cluster",), f"{flag} not given; {cohdi} is set"
    registry = Path(cfg.node.kubelet_dir) / "plugins_registry"
    if is_dir(registry):
        return ("node",), f"{flag} not given; kubelet's plugin registry {registry} exists"
    raise errors.ConfigError(
        where,
        cfg.cluster.roles,
        f"is required here: nothing implies a role ({flag_of('fabric', 'url')} is empty and "
        f"{registry} does not exist); say 'cluster', 'node' or 'cluster,node'",
    )


@dataclass(frozen=True, slots=True)
class SettingInfo:
    """One setting as the CLI shows it: `title` is its group's heading, `metavar` what its value
    is, `commands` the commands that use it."""

    group: str
    name: str
    flag: str
    env: str
    default: Any
    type: type
    help: str
    unit: str
    choices: tuple[str, ...]
    minimum: float | None
    maximum: float | None
    title: str
    metavar: str
    commands: tuple[str, ...]


def flag_of(group: str, name: str) -> str:
    prefix: str = _GROUPS[group].PREFIX
    return "--" + (prefix + name).replace("_", "-")


def describe() -> Iterator[SettingInfo]:
    """Every setting, in declaration order, with its flag and environment variable."""
    for group, cls in _GROUPS.items():
        for f in dataclasses.fields(cls):
            flag = flag_of(group, f.name)
            yield SettingInfo(
                group=group,
                name=f.name,
                flag=flag,
                env="COHDI_" + flag[2:].replace("-", "_").upper(),
                default=f.default,
                type=type(f.default),
                help=f.metadata["help"],
                unit=f.metadata["unit"],
                choices=f.metadata["choices"],
                minimum=f.metadata["min"],
                maximum=f.metadata["max"],
                title=cls.TITLE,
                metavar=_metavar(f.default, f.metadata),
                commands=f.metadata["commands"] or cls.COMMANDS,
            )


def _metavar(default: Any, meta: Mapping[str, Any]) -> str:
    """What a value is, for the help: the setting's own word (FILE, URL...), else one derived
    from its kind: the choices (a|b), SECONDS, N or NUMBER; TEXT when nothing says more."""
    if meta["metavar"]:
        return str(meta["metavar"])
    if meta["choices"]:
        return "|".join(meta["choices"])
    if meta["unit"] == "s":
        return "SECONDS"
    if isinstance(default, bool):
        return "true|false"
    if isinstance(default, int):
        return "N"
    if isinstance(default, float):
        return "NUMBER"
    return "TEXT"


def load(raw: Mapping[str, str]) -> Settings:
    """Convert and validate raw strings keyed by flag (e.g. ``{"--lease-duration": "20"}``).

    Keys not given keep their defaults. Raises `ConfigError` for the first bad value.
    """
    groups: dict[str, dict[str, Any]] = {g: {} for g in _GROUPS}
    for info in describe():
        if info.flag in raw:
            value = _convert(info, raw[info.flag])
            if info.name == "driver" or (info.name == "vendor_driver" and value):
                _check_driver(f"{info.flag} ({info.env})", value)
            if info.name == "fatal_xids":
                _check_xids(f"{info.flag} ({info.env})", value)
            groups[info.group][info.name] = value
    return Settings(**{g: _GROUPS[g](**values) for g, values in groups.items()})


#: A DRA driver name the API server takes (a lower-case DNS subdomain of at most 63 characters:
#: resource.k8s.io validation) that is also a CDI vendor the container runtimes take (it starts
#: with a letter: container-device-interface pkg/parser), since the kubelet plugin's CDI kind is
#: `<driver>/gpu`.
_DRIVER = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _check_xids(where: str, value: str) -> None:
    """--node-fatal-xids: comma-separated decimal numbers (ASCII digits) that fit NVML's 64-bit
    event data (the node role parses them with `agent.node.health.parse_xids`)."""
    for part in value.split(","):
        part = part.strip()
        if part and not (part.isascii() and part.isdigit() and int(part) < 2**64):
            raise errors.ConfigError(where, value, "comma-separated Xid numbers, e.g. 48,79")


def _check_driver(where: str, value: str) -> None:
    if len(value) > 63 or not _DRIVER.match(value):
        raise errors.ConfigError(
            where,
            value,
            "must be a lower-case DNS subdomain of at most 63 characters starting with a letter "
            "(a DRA driver name that is also a CDI vendor), e.g. gpu.example.com",
        )


def _convert(info: SettingInfo, text: str) -> Any:
    where = f"{info.flag} ({info.env})"
    value: Any
    if info.type is bool:
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise errors.ConfigError(where, text, "must be true or false")
        value = lowered in ("true", "1", "yes")
    elif info.type in (int, float):
        try:
            value = info.type(text)
        except ValueError:
            kind = "an integer" if info.type is int else "a number"
            raise errors.ConfigError(where, text, f"must be {kind}{_unit(info)}") from None
        if value != value or value in (float("inf"), float("-inf")):  # NaN / inf
            raise errors.ConfigError(where, text, "must be a finite number")
        if info.minimum is not None and value < info.minimum:
            raise errors.ConfigError(where, text, f"must be >= {info.minimum}{_unit(info)}")
        if info.maximum is not None and value > info.maximum:
            raise errors.ConfigError(where, text, f"must be <= {info.maximum}{_unit(info)}")
    else:
        value = text
        if info.choices and value not in info.choices:
            raise errors.ConfigError(where, text, "must be one of " + ", ".join(info.choices))
    return value


def _unit(info: SettingInfo) -> str:
    return f" ({info.unit})" if info.unit else ""


_GROUPS: Final[dict[str, Any]] = {
    "logging": LoggingSettings,
    "kube": KubeSettings,
    "leader": LeaderSettings,
    "cluster": ClusterSettings,
    "node": NodeSettings,
    "fabric": FabricSettings,
    "emulator": EmulatorSettings,
    "dev": DevClusterSettings,
}
