"""A real Kubernetes node on this machine for the local control plane: containerd (CDI on, runc,
a CNI bridge), a kubelet registered as a Node, and kube-controller-manager (what creates the
pods of DaemonSets and Deployments and deallocates a ResourceClaim when its pod is gone).

Everything lives in one state directory (containerd's root and state, the kubelet's root dir,
certificates, configs, CNI config and IPAM data, one log file per process) under /tmp with a
short name, since the unix sockets a kubelet plugin serves under `<kubelet root>/plugins/...`
must fit in 107 bytes. The node's IP is on an interface of its own, a dummy one or, on kernels
without that driver, a bridge with no ports (the kubelet refuses a loopback node IP); the kubelet
and containerd's streaming server listen there or on loopback only. Pods get addresses from a
bridge of their own (Debian's CNI `bridge` + `host-local`), no masquerading.

Settings this machine kind needs (hybrid cgroup v1, no CAP_SYS_RESOURCE, PID 1 not systemd):
kubelet `failCgroupV1: false`, `cgroupDriver: cgroupfs`, `oomScoreAdj: 0`, `failSwapOn: false`,
loose eviction thresholds; containerd `restrict_oom_score_adj`, runc with `SystemdCgroup = false`.

`stop()` stops kube-controller-manager, asks the kubelet to stop the node's pods (deleting them in
the API), stops the kubelet, kills and removes what containerd still runs, stops containerd and
any shim of ours still alive (by pid, matched on our binary and our containerd socket), unmounts
what is mounted under the state directory, removes the kubelet's cgroups (a root of their own,
`cgroup_root`), deletes the interfaces and the Node object, and removes the state directory. Safe
to call twice. Several nodes may run on one machine, each with its own state, interfaces and
cgroups (containerd's shim sockets all go to /run/containerd/s, named by a hash of the socket).

Synchronous on purpose, like `controlplane`: callers on an event loop run it in a thread.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from agent import errors
from agent import pki as certs
from agent.devcluster.controlplane import ControlPlane, Process, free_port, tail
from agent.devcluster.nodebuild import PAUSE_IMAGE, NodeBinaries

#: kube-controller-manager's controllers a node bed needs: workload pods (DaemonSet, Deployment,
#: ReplicaSet), claims deallocated when their pod is gone, cascading deletion, namespaces,
#: ServiceAccounts and their tokens. Not the node lifecycle controller: it would taint every Node
#: the other tests create without a kubelet as unreachable (we lift our Node's `not-ready` taint
#: ourselves), nor the pod garbage collector (it deletes pods bound to such Nodes).
CONTROLLERS: Final = (
    "daemonset-controller",
    "deployment-controller",
    "replicaset-controller",
    "resourceclaim-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
)
NOT_READY_TAINT: Final = "node.kubernetes.io/not-ready"
#: A taint that keeps every pod off the node but those meant for it (`TOLERATION`): for a caller
#: whose session also schedules pods without a node selector that must not land here
#: (`RealNode(taints=[REAL_NODE_TAINT])`; not the default, so a chart's pods need no toleration).
REAL_NODE_TAINT: Final = {"key": "cohdi.io/real-node", "value": "true", "effect": "NoSchedule"}
TOLERATION: Final = {"key": "cohdi.io/real-node", "operator": "Exists", "effect": "NoSchedule"}
#: The Kubernetes namespace of containerd that the CRI (and so the kubelet) uses.
CRI_NAMESPACE: Final = "k8s.io"


@dataclass
class RealNode:
    """One node: `start()`, then use it, `stop()`. For a test or a chart on it: `name` (the Node;
    its `kubernetes.io/hostname` label), `node_ip`, `kubelet_root` (the kubelet's `--root-dir`,
    holding `plugins_registry/` and `plugins/`), `cdi` (the CDI spec directory containerd reads),
    `kubelet_log` / `log(process)`, `pod_logs`, `import_image(archive)` (an image for pods with
    `imagePullPolicy: Never`), `ctr(...)`, `pod_log(...)` (`kubectl logs`)."""

    binaries: NodeBinaries
    control_plane: ControlPlane
    name: str = "realnode-0"
    #: Where the CDI specs go that containerd reads (the node role's `--node-cdi-dir`).
    #: Default: `<state>/cdi`.
    cdi_dir: Path | None = None
    controllers: tuple[str, ...] = CONTROLLERS
    #: More labels for the Node (the kubelet's `--node-labels`).
    labels: dict[str, str] = field(default_factory=dict)
    #: The Node's taints at registration (the kubelet's `--register-with-taints`).
    taints: list[dict[str, str]] = field(default_factory=list)
    die_with_parent: bool = True
    #: Where `stop()` copies the processes' logs before it removes the state directory (None:
    #: they go with it).
    keep_logs: Path | None = None
    progress: Callable[[str], None] = lambda _msg: None

    state_dir: Path = field(default=Path(), init=False)
    node_ip: str = field(default="", init=False)
    pod_subnet: str = field(default="", init=False)
    kubelet_port: int = field(default=0, init=False)
    procs: dict[str, Process] = field(default_factory=dict, init=False)
    _links: list[str] = field(default_factory=list, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _spawner: ThreadPoolExecutor | None = field(default=None, init=False)

    # --- where things are ------------------------------------------------------------------------

    @property
    def kubelet_root(self) -> Path:
        """The kubelet's `--root-dir`: `plugins_registry/`, `plugins/` (the node role's
        `--node-kubelet-dir`)."""
        return self.state_dir / "kubelet"

    @property
    def plugins_registry(self) -> Path:
        return self.kubelet_root / "plugins_registry"

    @property
    def cdi(self) -> Path:
        return self.cdi_dir or self.state_dir / "cdi"

    @property
    def containerd_socket(self) -> Path:
        return self.state_dir / "containerd.sock"

    @property
    def pod_logs(self) -> Path:
        """The kubelet's `podLogsDir`: `<namespace>_<pod>_<uid>/<container>/<n>.log`."""
        return self.state_dir / "pod-logs"

    def log(self, process: str) -> Path:
        """The log file of `kubelet`, `containerd` or `kube-controller-manager`."""
        return self.state_dir / f"{process}.log"

    @property
    def cgroup_root(self) -> str:
        """The kubelet's `cgroupRoot` (relative to each hierarchy), ours alone: a kubelet removes
        the pod cgroups it does not know under its root, so two nodes on one machine must not
        share one."""
        return f"cohdi-{self.state_dir.name}"

    @property
    def kubelet_log(self) -> Path:
        return self.log("kubelet")

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> None:
        """Start containerd, import the pause image, start the kubelet and kube-controller-
        manager, wait until the Node is Ready, lift its `not-ready` taint. Raises DevClusterError
        with the failing process's log tail; what was started is stopped again."""
        if os.geteuid() != 0:
            raise errors.DevClusterError("a real node needs root (mounts, cgroups, interfaces)")
        self._stop.clear()
        self.state_dir = Path(tempfile.mkdtemp(prefix="rn-", dir="/tmp"))
        deadline = time.monotonic() + timeout
        try:
            self._network()
            self._start_containerd(deadline)
            self.import_image(self.binaries.pause_image)
            self._start_kubelet()
            self._start_kcm()
            self._wait_ready(deadline)
        except BaseException:
            self.stop()
            raise
        self.progress(f"node {self.name} ready ({self.node_ip}; state in {self.state_dir})")

    def stop(self) -> None:
        """Stop and remove everything `start` made (see the module docstring). Idempotent."""
        self._stop.set()
        if not self.state_dir.name:
            return
        kcm = self.procs.pop("kube-controller-manager", None)
        if kcm:  # first: its DaemonSet controller would recreate the pods we delete
            kcm.stop()
        kubelet = self.procs.get("kubelet")
        if kubelet is not None and kubelet.alive():
            with contextlib.suppress(errors.AgentError, OSError):
                self._drain(timeout=30)
        kubelet = self.procs.pop("kubelet", None)
        if kubelet:
            kubelet.stop()
        if "containerd" in self.procs:
            with contextlib.suppress(errors.AgentError, OSError):
                self._remove_tasks()
            self.procs.pop("containerd").stop()
        self._kill_shims()
        self._unmount_all()
        _remove_cgroups(self.cgroup_root)
        for link in reversed(self._links):
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
        self._links.clear()
        with contextlib.suppress(errors.AgentError, OSError):
            self._api("DELETE", f"/api/v1/nodes/{self.name}", missing_ok=True)
        if self._spawner is not None:
            self._spawner.shutdown()
            self._spawner = None
        if self.keep_logs is not None:
            self.keep_logs.mkdir(parents=True, exist_ok=True)
            for log in self.state_dir.glob("*.log"):
                shutil.copy(log, self.keep_logs / log.name)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.state_dir = Path()
        self.kubelet_port = 0

    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs.items() if p.pid is not None}

    # --- images ----------------------------------------------------------------------------------

    def import_image(self, archive: Path) -> str:
        """Load an OCI or Docker image archive into containerd's `k8s.io` namespace (what the
        kubelet's pods can use, with `imagePullPolicy: Never` or `IfNotPresent`); unpacked for the
        overlayfs snapshotter. Returns ctr's output (the names it imported). Raises
        DevClusterError with ctr's error."""
        return self.ctr(
            "images", "import", "--no-unpack=false", "--local", str(archive), timeout=300
        )

    def ctr(self, *args: str, timeout: float = 60) -> str:
        """`ctr --address <our containerd> -n k8s.io ARGS...`: stdout, or DevClusterError (also
        when it runs past `timeout` seconds)."""
        try:
            done = subprocess.run(
                [
                    str(self.binaries.ctr),
                    "--address",
                    str(self.containerd_socket),
                    "-n",
                    CRI_NAMESPACE,
                    *args,
                ],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise errors.DevClusterError(f"ctr {' '.join(args)}: no answer in {timeout} s") from exc
        if done.returncode != 0:
            raise errors.DevClusterError(
                f"ctr {' '.join(args)} failed (exit {done.returncode}): {done.stderr.strip()}"
            )
        return done.stdout

    def pod_log(self, namespace: str, pod: str, container: str = "") -> str:
        """A container's log as the API server serves it (`kubectl logs`): the API server asks
        this node's kubelet at its InternalIP. Raises DevClusterError with the HTTP status."""
        query = f"?container={urllib.parse.quote(container)}" if container else ""
        raw = self._request("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}/log{query}")
        return raw.decode(errors="replace")

    # --- network ---------------------------------------------------------------------------------

    def _network(self) -> None:
        """An interface of its own (dummy, else a port-less bridge) with the node's /32, unique
        among this machine's addresses; a pod subnet beside it."""
        taken = subprocess.run(
            ["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(50):
            n = random.randrange(1, 255)  # noqa: S311 - not a secret, a free subnet
            ip, subnet = f"10.213.{n}.1", f"10.214.{n}.0/24"
            if f" {ip}/" not in taken and f"10.214.{n}." not in taken:
                break
        else:
            raise errors.DevClusterError("found no free 10.213.x.1 for the node's address")
        self.node_ip, self.pod_subnet = ip, subnet
        link = f"rn{n}-{os.getpid() % 100000}"[:15]
        try:
            self._ip("link", "add", link, "type", "dummy")
        except errors.DevClusterError:
            # Kernels without the dummy driver (this machine kind's): a bridge with no ports
            # holds a local address just as well.
            self._ip("link", "add", link, "type", "bridge")
        self._links.append(link)
        self._ip("addr", "add", f"{ip}/32", "dev", link)
        self._ip("link", "set", link, "up")
        self._bridge = f"rnbr{n}-{os.getpid() % 10000}"[:15]
        # the CNI bridge plugin creates it at the first pod; we delete it at stop
        self._links.append(self._bridge)

    @staticmethod
    def _ip(*args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise errors.DevClusterError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def _write_cni(self) -> Path:
        conf_dir = self.state_dir / "cni-conf"
        conf_dir.mkdir()
        net = ipaddress.ip_network(self.pod_subnet)
        doc = {
            "cniVersion": "1.0.0",
            "name": "cohdi-realnode",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self._bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(net), "gateway": str(net[1])}]],
                        # the node's own address, through the bridge: what a pod uses to reach
                        # a service of the host (nothing beyond the node is routed)
                        "routes": [{"dst": f"{self.node_ip}/32"}],
                        "dataDir": str(self.state_dir / "cni-ipam"),
                    },
                }
            ],
        }
        (conf_dir / "10-cohdi.conflist").write_text(json.dumps(doc, indent=1))
        return conf_dir

    # --- containerd ------------------------------------------------------------------------------

    def _start_containerd(self, deadline: float) -> None:
        b = self.binaries
        root = self.state_dir / "containerd"
        self.cdi.mkdir(parents=True, exist_ok=True)
        runtime = "plugins.'io.containerd.cri.v1.runtime'"
        config = f"""\
version = 3
root = {_toml(root / "root")}
state = {_toml(root / "state")}

[grpc]
  address = {_toml(self.containerd_socket)}

[ttrpc]
  address = {_toml(self.state_dir / "containerd.sock.ttrpc")}

[debug]
  level = "info"

[plugins.'io.containerd.internal.v1.opt']
  path = {_toml(root / "opt")}

[plugins.'io.containerd.nri.v1.nri']
  disable = true

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = {_toml(PAUSE_IMAGE)}

[{runtime}]
  # no CAP_SYS_RESOURCE here: never lower a container's oom_score_adj below ours
  restrict_oom_score_adj = true
  # CDI is always on in containerd 2.x (`enable_cdi` is gone): the specs the node role writes
  cdi_spec_dirs = [{_toml(self.cdi)}]
  netns_mounts_under_state_dir = true
  # the same on every host: a profile of its own only where the host has AppArmor and its parser
  disable_apparmor = true

[{runtime}.containerd]
  default_runtime_name = "runc"

[{runtime}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
  runtime_path = {_toml(b.containerd_shim)}

[{runtime}.containerd.runtimes.runc.options]
  BinaryName = {_toml(b.runc)}
  Root = {_toml(root / "runc")}
  SystemdCgroup = false

[{runtime}.cni]
  bin_dirs = [{_toml(b.cni_bin_dir)}]
  conf_dir = {_toml(self._write_cni())}

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""
        path = self.state_dir / "containerd.toml"
        path.write_text(config)
        self._spawn("containerd", [str(b.containerd), "--config", str(path)])
        self._wait(self._containerd_ready, "containerd", deadline)

    def _containerd_ready(self) -> bool:
        if not self.containerd_socket.exists():
            return False
        try:
            self.ctr("version", timeout=10)
        except errors.DevClusterError:
            return False
        return True

    def _remove_tasks(self) -> None:
        """Kill and delete every task and container containerd still holds for the CRI."""
        for line in self.ctr("tasks", "ls", "-q").split():
            with contextlib.suppress(errors.DevClusterError):
                self.ctr("tasks", "kill", "-s", "SIGKILL", line)
        end = time.monotonic() + 10
        for task in self.ctr("tasks", "ls", "-q").split():
            while time.monotonic() < end:
                try:
                    self.ctr("tasks", "delete", "-f", task)
                    break
                except errors.DevClusterError:
                    time.sleep(0.2)
        for container in self.ctr("containers", "ls", "-q").split():
            with contextlib.suppress(errors.DevClusterError):
                self.ctr("containers", "delete", container)

    def _kill_shims(self) -> None:
        """SIGKILL any containerd-shim of ours still alive: its exe is our shim binary and its
        command line names our containerd socket."""
        shim = os.path.realpath(self.binaries.containerd_shim)
        address = str(self.containerd_socket)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "exe") != shim:
                    continue
                if address not in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    continue
                os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                continue

    def _unmount_all(self) -> None:
        """Lazily unmount every mount point under the state directory, deepest first."""
        prefix = str(self.state_dir) + "/"
        points: list[str] = []
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/mountinfo").read_text().splitlines():
                point = line.split()[4].replace("\\040", " ")
                if point.startswith(prefix):
                    points.append(point)
        for point in sorted(set(points), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)

    # --- kubelet ---------------------------------------------------------------------------------

    def _issue(self, stem: str, cn: str, org: str | None = None) -> certs.KeyPair:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        pki = self.control_plane.pki_dir
        ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
        out = self.state_dir / "pki"
        out.mkdir(exist_ok=True)
        return certs.issue(out, stem, ca_key=ca_key, ca_cert=ca_cert, cn=cn, org=org)  # type: ignore[arg-type]

    def _kubeconfig(self, path: Path, user: certs.KeyPair) -> Path:
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "local",
                    "cluster": {
                        "server": self.control_plane.server,
                        "certificate-authority": str(self.control_plane.pki_dir / "ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": "user",
                    "user": {"client-certificate": str(user.cert), "client-key": str(user.key)},
                }
            ],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "user"}}],
            "current-context": "local",
        }
        path.write_text(yaml.safe_dump(doc))
        path.chmod(0o600)
        return path

    def _start_kubelet(self) -> None:
        # The Node authorizer knows the kubelet by its certificate: system:node:<name>.
        user = self._issue("kubelet", f"system:node:{self.name}", "system:nodes")
        kubeconfig = self._kubeconfig(self.state_dir / "kubelet.kubeconfig", user)
        self.kubelet_port = free_port()
        loose = "1%"
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.node_ip,
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.control_plane.pki_dir / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            # this machine kind: hybrid cgroup v1 (1.35+ refuses v1 unless told), no systemd
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self.cgroup_root}",
            # no CAP_SYS_RESOURCE: the kubelet may not lower its own oom_score_adj
            "oomScoreAdj": 0,
            "failSwapOn": False,
            "evictionHard": {
                "memory.available": "50Mi",
                "nodefs.available": loose,
                "nodefs.inodesFree": loose,
                "imagefs.available": loose,
                "imagefs.inodesFree": loose,
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "podLogsDir": str(self.pod_logs),
            "volumePluginDir": str(self.state_dir / "volume-plugins"),
            "resolvConf": "/etc/resolv.conf",
            "registerNode": True,
            "serializeImagePulls": False,
        }
        path = self.state_dir / "kubelet.yaml"
        path.write_text(yaml.safe_dump(config))
        _make_cgroups(self.cgroup_root)  # the kubelet wants its root to exist
        labels = ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        taints = ",".join(f"{t['key']}={t.get('value', '')}:{t['effect']}" for t in self.taints)
        self._spawn(
            "kubelet",
            [
                str(self.binaries.kubelet),
                f"--config={path}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={self.kubelet_root}",
                f"--cert-dir={self.state_dir / 'kubelet-pki'}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.node_ip}",
                *([f"--node-labels={labels}"] if labels else []),
                *([f"--register-with-taints={taints}"] if taints else []),
                "--v=2",
                # the DRA plugin calls (NodePrepareResources/NodeUnprepareResources with their
                # claims) and registrations, which --v=2 does not log
                "--vmodule=dra_plugin=4,dra_plugin_manager=4",
            ],
        )

    def _start_kcm(self) -> None:
        user = self._issue("kcm", "cohdi-realnode-kcm", "system:masters")
        kubeconfig = self._kubeconfig(self.state_dir / "kcm.kubeconfig", user)
        pki = self.control_plane.pki_dir
        self._spawn(
            "kube-controller-manager",
            [
                str(self.binaries.kube_controller_manager),
                f"--kubeconfig={kubeconfig}",
                f"--controllers={','.join(self.controllers)}",
                "--leader-elect=false",
                "--use-service-account-credentials=false",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                f"--cert-dir={self.state_dir / 'kcm-pki'}",
                "--v=2",
            ],
        )

    # --- readiness -------------------------------------------------------------------------------

    def _wait_ready(self, deadline: float) -> None:
        """Until the Node is registered with Ready=True; then lift the `not-ready` taint the
        TaintNodesByCondition admission plugin gave it (the node lifecycle controller, which
        would, is not run: see CONTROLLERS)."""

        def ready() -> bool:
            node = self._api("GET", f"/api/v1/nodes/{self.name}", missing_ok=True)
            if not node:
                return False
            conds = node.get("status", {}).get("conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

        self._wait(ready, "kubelet", deadline)
        node = self._api("GET", f"/api/v1/nodes/{self.name}")
        taints = [t for t in node["spec"].get("taints") or [] if t["key"] != NOT_READY_TAINT]
        self._api(
            "PATCH",
            f"/api/v1/nodes/{self.name}",
            {"spec": {"taints": taints or None}},
        )

    def _drain(self, timeout: float) -> None:
        """Delete the node's pods in the API and wait until containerd runs no task: the kubelet
        stops each (containers, sandbox, CNI) the proper way."""
        selector = urllib.parse.quote(f"spec.nodeName={self.name}")
        pods = self._api("GET", f"/api/v1/pods?fieldSelector={selector}")
        for pod in pods.get("items", []):
            meta = pod["metadata"]
            self._api(
                "DELETE",
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                {"gracePeriodSeconds": 0},
                missing_ok=True,
            )
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.ctr("tasks", "ls", "-q").split():
            time.sleep(0.5)

    def _wait(self, ready: Callable[[], bool], name: str, deadline: float) -> None:
        started = time.monotonic()
        while True:
            try:
                if ready():
                    break
            except (errors.AgentError, OSError):
                pass
            proc = self.procs.get(name)
            if proc is not None and not proc.alive():
                raise errors.DevClusterError(
                    f"{name} exited during start-up; last lines of {proc.log}:\n{tail(proc.log)}"
                )
            if time.monotonic() > deadline:
                raise errors.DevClusterError(
                    f"{name} was not ready in time; last lines of {self.log(name)}:\n"
                    + tail(self.log(name))
                )
            if self._stop.wait(0.5):
                raise errors.DevClusterError(f"stopped while waiting for {name}")
        self.progress(f"{name} ready in {time.monotonic() - started:.1f} s")

    def _api(
        self, method: str, path: str, body: object = None, *, missing_ok: bool = False
    ) -> dict[str, Any]:
        """One admin request to the API server, JSON in and out; {} for a 404 when
        `missing_ok`."""
        try:
            raw = self._request(method, path, body)
        except _NotFound:
            if missing_ok:
                return {}
            raise errors.DevClusterError(f"{method} {path}: HTTP 404") from None
        doc: dict[str, Any] = json.loads(raw or b"{}")
        return doc

    def _request(self, method: str, path: str, body: object = None) -> bytes:
        pki = self.control_plane.pki_dir
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        data = json.dumps(body).encode() if body is not None else None
        headers = {
            "Content-Type": "application/merge-patch+json"
            if method == "PATCH"
            else "application/json"
        }
        req = urllib.request.Request(  # noqa: S310 - our API server's https URL
            self.control_plane.server + path, data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:  # noqa: S310
                answer: bytes = resp.read()
                return answer
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise _NotFound from exc
            detail = exc.read()[:500].decode(errors="replace")
            raise errors.DevClusterError(f"{method} {path}: HTTP {exc.code} {detail}") from exc

    # --- processes -------------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> None:
        """Start `name` from one long-lived thread (PR_SET_PDEATHSIG fires when the forking
        thread ends, see `controlplane`)."""
        proc = Process(name, args, self.log(name))
        if self._spawner is None:
            self._spawner = ThreadPoolExecutor(1, thread_name_prefix="realnode-spawner")
        self._spawner.submit(proc.start, die_with_parent=self.die_with_parent).result()
        self.procs[name] = proc


def _hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy: the v1 controllers' and the unified one (hybrid), or the
    unified one alone."""
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.procs").exists():
        return [base]
    return [h for h in sorted(base.iterdir()) if (h / "cgroup.procs").exists()]


def _make_cgroups(name: str) -> None:
    """`<hierarchy>/<name>` in every hierarchy; a v1 cpuset one gets its parent's CPUs and
    memory nodes (a new v1 cpuset has none, and no task could join it)."""
    for hierarchy in _hierarchies():
        cgroup = hierarchy / name
        cgroup.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            mine = cgroup / knob
            v1 = (hierarchy / "cgroup.clone_children").exists()
            if v1 and mine.exists() and not mine.read_text().strip():
                mine.write_text((hierarchy / knob).read_text())


def _remove_cgroups(name: str) -> None:
    """Remove the cgroup tree `name` from every hierarchy, leaves first; a cgroup that still has
    processes stays (rmdir refuses)."""
    for tree in (h / name for h in _hierarchies()):
        if not tree.is_dir():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(tree), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


class _NotFound(Exception):
    pass


def _toml(value: object) -> str:
    """A TOML basic string (JSON's escaping is a subset TOML accepts)."""
    return json.dumps(str(value))
