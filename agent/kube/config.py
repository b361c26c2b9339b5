"""Load API-server access without importing kubernetes-asyncio's client (all its generated API
and model modules cost a node agent ~40 MB of RSS): the in-cluster service account (token re-read
as the kubelet rotates it) and kubeconfig files with certificates, tokens or token files. Anything
else — exec credential plugins, OIDC/GCP auth providers — falls back to kubernetes-asyncio's
loader (`agent.kube.client.Kube.connect`)."""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent import errors

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")

Auth = Callable[[], Awaitable[str | None]]


@dataclass
class Access:
    host: str
    ssl: ssl.SSLContext
    auth: Auth
    server_hostname: str | None = None


def _bearer(token: str | None = None, token_file: str | None = None) -> Auth:
    async def header() -> str | None:
        value = token
        if token_file:
            try:
                value = Path(token_file).read_text().strip()  # noqa: ASYNC240 -- tiny, page-cached
            except OSError as exc:
                raise errors.KubeConfigError(
                    f"cannot read the token file {token_file}: {exc}"
                ) from exc
        return f"Bearer {value}" if value else None

    return header


def in_cluster() -> Access | None:
    host, port = (
        os.environ.get("KUBERNETES_SERVICE_HOST"),
        os.environ.get("KUBERNETES_SERVICE_PORT"),
    )
    token = SERVICE_ACCOUNT / "token"
    if not host or not port or not token.exists():
        return None
    if ":" in host:
        host = f"[{host}]"
    ctx = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
    return Access(f"https://{host}:{port}", ctx, _bearer(token_file=str(token)))


def _materialise(data: str, suffix: str) -> str:
    """Inline base64 PEM (…-data fields) into a 0600 temp file, as ssl wants paths."""
    fd, path = tempfile.mkstemp(prefix="cohdi-kube-", suffix=suffix)
    with os.fdopen(fd, "wb") as fh:
        fh.write(base64.b64decode(data))
    return path


def from_kubeconfig(path: str) -> Access | None:
    """Access from a kubeconfig's current context, or None when it needs a credential plugin
    or auth provider (the caller then uses kubernetes-asyncio)."""
    try:
        doc: dict[str, Any] = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise errors.KubeConfigError(f"cannot read kubeconfig {path}: {exc}") from exc
    base = Path(path).parent

    def named(kind: str, name: str) -> dict[str, Any]:
        for item in doc.get(kind) or []:
            if item.get("name") == name:
                return dict(item.get(kind[:-1]) or {})
        raise errors.KubeConfigError(f"kubeconfig {path}: no {kind[:-1]} named {name!r}")

    context = named("contexts", doc.get("current-context") or "")
    cluster = named("clusters", context.get("cluster", ""))
    user = named("users", context.get("user", "")) if context.get("user") else {}
    if user.get("exec") or user.get("auth-provider"):
        return None
    if cluster.get("insecure-skip-tls-verify"):
        raise errors.KubeConfigError(
            f"kubeconfig {path} sets insecure-skip-tls-verify; cohdi-agent always verifies the "
            "API server: give the cluster's certificate-authority instead"
        )

    def file_of(key: str, suffix: str) -> str | None:
        if user.get(f"{key}-data") or cluster.get(f"{key}-data"):
            return _materialise(user.get(f"{key}-data") or cluster[f"{key}-data"], suffix)
        value = user.get(key) or cluster.get(key)
        return str(base / value) if value else None

    ca = file_of("certificate-authority", ".crt")
    ctx = ssl.create_default_context(cafile=ca)
    cert, key = file_of("client-certificate", ".crt"), file_of("client-key", ".key")
    if cert and key:
        ctx.load_cert_chain(cert, key)
    server = cluster.get("server")
    if not server:
        raise errors.KubeConfigError(f"kubeconfig {path}: the cluster has no server URL")
    return Access(
        server,
        ctx,
        _bearer(token=user.get("token"), token_file=user.get("tokenFile")),
        cluster.get("tls-server-name"),
    )


def find(kubeconfig: str) -> tuple[str, Access | None]:
    """(kubeconfig path used, access or None for the kubernetes-asyncio fallback): the given
    file; else the in-cluster service account; else $KUBECONFIG, else ~/.kube/config."""
    if not kubeconfig:
        access = in_cluster()
        if access is not None:
            return "", access
    path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    path = path or os.path.expanduser("~/.kube/config")
    try:
        os.stat(path)
    except PermissionError as exc:
        # a directory on the way is not searchable by this user (a root-only /etc/... for a
        # process running as another user): saying "no kubeconfig" would send them looking
        raise errors.KubeConfigError(
            f"kubeconfig {path}: permission denied for uid {os.geteuid()} ({exc.strerror}); "
            "make it (and its directories) readable by the user cohdi-agent runs as"
        ) from exc
    except OSError:
        raise errors.KubeConfigError(
            f"no Kubernetes credentials: not in a pod with a service account, and no kubeconfig "
            f"at {path}; pass --kubeconfig"
        ) from None
    if not os.access(path, os.R_OK):
        raise errors.KubeConfigError(
            f"kubeconfig {path}: not readable by uid {os.geteuid()}; make it readable by the "
            "user cohdi-agent runs as (or run as its owner)"
        )
    return path, from_kubeconfig(path)
