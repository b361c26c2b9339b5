"""Loading API-server access without kubernetes-asyncio's client: kubeconfigs with files, inline
data, tokens and token files; plugins fall back; insecure kubeconfigs are refused."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
import yaml

from agent import errors, pki
from agent.kube import config


def kubeconfig(tmp_path: Path, user: dict, cluster_extra: dict | None = None) -> Path:  # type: ignore[type-arg]
    ca, _, _ = pki.make_ca(tmp_path, "test-ca")
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "c",
        "clusters": [
            {
                "name": "k",
                "cluster": {
                    "server": "https://127.0.0.1:6443",
                    "certificate-authority-data": base64.b64encode(ca.cert.read_bytes()).decode(),
                    **(cluster_extra or {}),
                },
            }
        ],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_token_and_token_file(tmp_path: Path) -> None:
    access = config.from_kubeconfig(str(kubeconfig(tmp_path, {"token": "abc"})))
    assert access is not None
    assert access.host == "https://127.0.0.1:6443"
    assert asyncio.run(access.auth()) == "Bearer abc"
    token = tmp_path / "token"
    token.write_text("first\n")
    access = config.from_kubeconfig(str(kubeconfig(tmp_path, {"tokenFile": str(token)})))
    assert access is not None
    assert asyncio.run(access.auth()) == "Bearer first"
    token.write_text("rotated\n")
    assert asyncio.run(access.auth()) == "Bearer rotated"  # re-read: kubelet rotates it


def test_plugins_fall_back_and_insecure_is_refused(tmp_path: Path) -> None:
    assert config.from_kubeconfig(str(kubeconfig(tmp_path, {"exec": {"command": "x"}}))) is None
    with pytest.raises(errors.KubeConfigError, match="insecure-skip-tls-verify"):
        config.from_kubeconfig(
            str(kubeconfig(tmp_path, {"token": "t"}, {"insecure-skip-tls-verify": True}))
        )


def test_missing_kubeconfig_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(errors.KubeConfigError, match="pass --kubeconfig"):
        config.find(str(tmp_path / "nope"))


def test_unreadable_kubeconfig_says_permission_not_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kubeconfig root keeps to itself, read by the image's user 65532: in a 0700 directory
    (stat fails with EACCES) or mode 0600 (stat works, reading does not). The error names the
    permission and the uid, not a missing file. The kernel's answers to a non-root user are
    stood in for (the suite runs as root, which reads anything)."""
    import os

    path = tmp_path / "kubeconfig"
    path.write_text("apiVersion: v1\n")
    real_stat = os.stat

    def denied(p: object, *a: object, **k: object) -> os.stat_result:
        if str(p) == str(path):
            raise PermissionError(13, "Permission denied", str(p))
        return real_stat(p, *a, **k)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        m.setattr(os, "stat", denied)
        with pytest.raises(errors.KubeConfigError, match="permission denied for uid") as info:
            config.find(str(path))
    assert "pass --kubeconfig" not in str(info.value)
    monkeypatch.setattr(os, "access", lambda p, mode: str(p) != str(path))
    with pytest.raises(errors.KubeConfigError, match="not readable by uid"):
        config.find(str(path))
