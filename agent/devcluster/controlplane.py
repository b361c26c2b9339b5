"""Start and stop etcd + kube-apiserver + kube-scheduler on 127.0.0.1.

Each cluster lives in one state directory: PKI, etcd data, configs, a kubeconfig for the admin
(group system:masters) and one for the scheduler (user system:kube-scheduler, so RBAC is real), and
one log file per process. Ports are picked free. `/readyz` of the apiserver and of the scheduler
(its informers synced) are polled before `start()` returns. `stop()` terminates every process we
started, by pid, and is safe to call twice; with `die_with_parent` the kernel also sends SIGTERM to
the processes if our process dies without cleaning up (PR_SET_PDEATHSIG).

NB: PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. Callers
run us from short-lived threads (`asyncio.to_thread`), so every child is forked from one spawner
thread that lives exactly as long as the ControlPlane.

This is synchronous code on purpose: callers on an event loop run it in a thread.
"""

from __future__ import annotations

import ctypes
import json
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from agent import errors
from agent import pki as certs
from agent.devcluster.building import Binaries

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


@dataclass
class Process:
    name: str
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def start(self, *, die_with_parent: bool) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Own session: Ctrl-C in a terminal reaches only us, and we stop them in order.
                start_new_session=True,
                preexec_fn=_die_with_parent if die_with_parent else None,
            )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.popen = None


@dataclass
class ControlPlane:
    """One local cluster. `start()` then use `kubeconfig`; `stop()` when done."""

    binaries: Binaries
    state_dir: Path
    binding_timeout_s: float = 600.0
    #: kube-scheduler's own API client limiter (KubeSchedulerConfiguration clientConnection.qps
    #: and .burst). None: the scheduler's defaults, qps 50 and burst 100. Every allocation and
    #: every binding is a write through this limiter, so it, not the driver, paces a burst: at
    #: the defaults a burst of 200 claims is allocated over about 10 s.
    scheduler_qps: float | None = None
    scheduler_burst: int | None = None
    die_with_parent: bool = True
    apiserver_extra_args: list[str] = field(default_factory=list)
    #: Start kube-scheduler too (tests of the API server alone may leave it out).
    with_scheduler: bool = True
    progress: Callable[[str], None] = lambda _msg: None

    etcd_port: int = 0
    apiserver_port: int = 0
    scheduler_port: int = 0
    procs: dict[str, Process] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _spawner: ThreadPoolExecutor | None = None

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "admin.kubeconfig"

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def audit_log(self) -> Path:
        """kube-apiserver's audit log (JSON lines, level Metadata: user, verb, resource, the
        authorization decision, the response code) of requests by ServiceAccounts only, so a
        test can see every call a role's token made and every refusal; the admin's are not
        logged."""
        return self.state_dir / "audit.log"

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        pki = certs.make_pki(self.pki_dir)
        self.etcd_port, self.apiserver_port, self.scheduler_port = (free_port() for _ in range(3))
        self._write_kubeconfig(self.kubeconfig, pki.admin)
        self._write_kubeconfig(self.state_dir / "scheduler.kubeconfig", pki.scheduler)
        self._write_scheduler_config()
        scheduler_serving = self._scheduler_serving_cert()
        deadline = time.monotonic() + timeout
        try:
            self._start_etcd()
            self._wait(self._etcd_ready, "etcd", deadline)
            self._start_apiserver(pki)
            self._wait(lambda: self._readyz(self.apiserver_port), "kube-apiserver", deadline)
            if self.with_scheduler:
                self._start_scheduler(scheduler_serving)
                self._wait(lambda: self._readyz(self.scheduler_port), "kube-scheduler", deadline)
        except BaseException:
            self.stop()
            raise
        self.progress(f"control plane ready: {self.server} (kubeconfig {self.kubeconfig})")

    def stop(self) -> None:
        """Stop every process we started, newest first. Idempotent."""
        self._stop.set()
        for name in ("kube-scheduler", "kube-apiserver", "etcd"):
            proc = self.procs.pop(name, None)
            if proc:
                proc.stop()
        if self._spawner is not None:
            self._spawner.shutdown()
            self._spawner = None

    def restart_apiserver(self, timeout: float = 60.0) -> None:
        """Stop and start kube-apiserver on the same port: its watch cache starts afresh, so a
        watch from an older resourceVersion gets 410 Gone."""
        self.procs.pop("kube-apiserver").stop()
        self._start_apiserver(certs_of(self.pki_dir))
        self._wait(
            lambda: self._readyz(self.apiserver_port), "kube-apiserver", time.monotonic() + timeout
        )

    def scheduler_config(self, timeout: float = 30.0) -> dict[str, object]:
        """The configuration kube-scheduler runs with, as it reports it (GET /configz on its
        secure port with the admin identity): {"componentconfig": KubeSchedulerConfiguration}.
        Just after start the scheduler may still refuse (403: its delegated authorization asks
        the API server, whose RBAC bootstrap can lag its /readyz), so refusals and connection
        errors are retried for `timeout` seconds; then DevClusterError."""
        url = f"https://127.0.0.1:{self.scheduler_port}/configz"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url, context=self._ssl(), timeout=5) as resp:
                    doc: dict[str, object] = json.loads(resp.read())
                    return doc
            except (urllib.error.URLError, OSError, ValueError) as exc:
                if time.monotonic() > deadline:
                    raise errors.DevClusterError(f"kube-scheduler's {url}: {exc}") from exc
            if self._stop.wait(0.5):
                raise errors.DevClusterError(f"stopped while reading kube-scheduler's {url}")

    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs.items() if p.pid is not None}

    # --- processes -------------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> None:
        proc = Process(name, args, self.state_dir / f"{name}.log")
        if self._spawner is None:
            self._spawner = ThreadPoolExecutor(1, thread_name_prefix="controlplane-spawner")
        self._spawner.submit(proc.start, die_with_parent=self.die_with_parent).result()
        self.procs[name] = proc

    def _start_etcd(self) -> None:
        peer = f"http://127.0.0.1:{free_port()}"
        self._spawn(
            "etcd",
            [
                str(self.binaries.etcd),
                "--name=default",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--unsafe-no-fsync=true",  # test data; fsync makes etcd the bottleneck on CI disks
                "--log-level=warn",
            ],
        )

    def _start_apiserver(self, pki: certs.Pki) -> None:
        self._spawn(
            "kube-apiserver",
            [
                str(self.binaries.kube_apiserver),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                # The `kubernetes` Service's endpoints may not be a loopback address (Endpoints
                # validation), so the default lease reconciler could never write them, and
                # 1.37 refuses to start with it on one: no reconciler. Nothing here reaches the
                # API server through that Service.
                "--endpoint-reconciler-type=none",
                f"--secure-port={self.apiserver_port}",
                f"--cert-dir={self.state_dir / 'apiserver-certs'}",
                f"--tls-cert-file={pki.serving.cert}",
                f"--tls-private-key-file={pki.serving.key}",
                f"--client-ca-file={pki.ca.cert}",
                "--service-cluster-ip-range=10.0.0.0/24",
                f"--service-account-issuer=https://127.0.0.1:{self.apiserver_port}",
                f"--service-account-key-file={pki.sa_public}",
                f"--service-account-signing-key-file={pki.sa_private}",
                f"--audit-policy-file={self._write_audit_policy()}",
                f"--audit-log-path={self.audit_log}",
                "--authorization-mode=Node,RBAC",
                # No controller-manager runs, so nothing would mint service-account tokens.
                "--disable-admission-plugins=ServiceAccount",
                "--allow-privileged=true",
                # A real node's kubelet (agent.devcluster.realnode: pod logs, exec) is reached at
                # its InternalIP and authenticates us by the admin's client certificate.
                f"--kubelet-client-certificate={pki.admin.cert}",
                f"--kubelet-client-key={pki.admin.key}",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                # The aggregation-layer CA: without it every delegating component (the scheduler)
                # logs "missing content for CA bundle" forever.
                f"--requestheader-client-ca-file={pki.ca.cert}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                *self.apiserver_extra_args,
            ],
        )

    def _start_scheduler(self, serving: certs.KeyPair) -> None:
        kubeconfig = self.state_dir / "scheduler.kubeconfig"
        self._spawn(
            "kube-scheduler",
            [
                str(self.binaries.kube_scheduler),
                f"--config={self.state_dir / 'scheduler.yaml'}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.scheduler_port}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--v=2",
            ],
        )

    # --- configuration files ---------------------------------------------------------------------

    def _write_kubeconfig(self, path: Path, user: certs.KeyPair) -> None:
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "cohdi-dev",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority": str(self.pki_dir / "ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": "user",
                    "user": {"client-certificate": str(user.cert), "client-key": str(user.key)},
                }
            ],
            "contexts": [
                {"name": "cohdi-dev", "context": {"cluster": "cohdi-dev", "user": "user"}}
            ],
            "current-context": "cohdi-dev",
        }
        path.write_text(yaml.safe_dump(doc))
        path.chmod(0o600)

    def _write_scheduler_config(self) -> None:
        client: dict[str, object] = {"kubeconfig": str(self.state_dir / "scheduler.kubeconfig")}
        if self.scheduler_qps is not None:
            client["qps"] = self.scheduler_qps
        if self.scheduler_burst is not None:
            client["burst"] = self.scheduler_burst
        doc = {
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "clientConnection": client,
            "leaderElection": {"leaderElect": False},
            "profiles": [
                {
                    "schedulerName": "default-scheduler",
                    "pluginConfig": [
                        {
                            "name": "DynamicResources",
                            "args": {
                                "apiVersion": "kubescheduler.config.k8s.io/v1",
                                "kind": "DynamicResourcesArgs",
                                "bindingTimeout": f"{self.binding_timeout_s:g}s",
                            },
                        }
                    ],
                }
            ],
        }
        (self.state_dir / "scheduler.yaml").write_text(yaml.safe_dump(doc))

    def _write_audit_policy(self) -> Path:
        path = self.state_dir / "audit-policy.yaml"
        doc = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived"],
            "rules": [
                {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
                {"level": "None"},
            ],
        }
        path.write_text(yaml.safe_dump(doc))
        return path

    def _scheduler_serving_cert(self) -> certs.KeyPair:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        ca_cert = x509.load_pem_x509_certificate((self.pki_dir / "ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key((self.pki_dir / "ca.key").read_bytes(), None)
        return certs.issue(
            self.pki_dir,
            "scheduler-serving",
            ca_key=ca_key,  # type: ignore[arg-type]
            ca_cert=ca_cert,
            cn="kube-scheduler",
            server_names=("127.0.0.1", "localhost"),
        )

    # --- readiness -------------------------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki_dir / "ca.crt"))
        ctx.load_cert_chain(str(self.pki_dir / "admin.crt"), str(self.pki_dir / "admin.key"))
        return ctx

    def _readyz(self, port: int) -> bool:
        try:
            with urllib.request.urlopen(
                f"https://127.0.0.1:{port}/readyz", context=self._ssl(), timeout=2
            ) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _etcd_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as resp:  # noqa: S310
                return bool(json.loads(resp.read()).get("health") == "true")
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _wait(self, ready: Callable[[], bool], name: str, deadline: float) -> None:
        started = time.monotonic()
        while not ready():
            proc = self.procs.get(name)
            if proc is not None and not proc.alive():
                raise errors.DevClusterError(
                    f"{name} exited during start-up; last lines of {proc.log}:\n{tail(proc.log)}"
                )
            if time.monotonic() > deadline:
                log = self.state_dir / f"{name}.log"
                raise errors.DevClusterError(
                    f"{name} was not ready in time; last lines of {log}:\n{tail(log)}"
                )
            if self._stop.wait(0.1):
                raise errors.DevClusterError(f"stopped while waiting for {name}")
        self.progress(f"{name} ready in {time.monotonic() - started:.1f} s")


def certs_of(pki_dir: Path) -> certs.Pki:
    """The PKI an earlier `make_pki` wrote into `pki_dir`."""

    def pair(stem: str) -> certs.KeyPair:
        return certs.KeyPair(pki_dir / f"{stem}.crt", pki_dir / f"{stem}.key")

    return certs.Pki(
        pair("ca"),
        pair("apiserver"),
        pair("admin"),
        pair("scheduler"),
        pki_dir / "sa.key",
        pki_dir / "sa.pub",
    )
