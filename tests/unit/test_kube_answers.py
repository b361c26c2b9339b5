"""The Kubernetes client against a small HTTPS server on loopback that answers what a real API
server answers in bad moments: 429 with Retry-After (seconds or an HTTP-date), 401 for a token
that rotated (the client re-reads its token file, from a kubeconfig or the in-cluster service
account, so the retry succeeds), 403 for RBAC, and silence (a timeout that says how long)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email.utils
import gc
import socket
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from agent import errors, pki
from agent.controllers.queueing import KeyedQueue
from agent.kube import config
from agent.kube.client import Kube
from tests.waiting import until

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Server:
    url: str
    ca: Path
    #: The Authorization header of every request, in order.
    seen: list[str] = field(default_factory=list)


@pytest.fixture
def tls(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    ca, ca_key, ca_cert = pki.make_ca(tmp_path, "test-ca")
    leaf = pki.issue(
        tmp_path, "server", ca_key=ca_key, ca_cert=ca_cert, cn="api", server_names=("127.0.0.1",)
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(leaf.cert, leaf.key)
    return ca.cert, ctx


@pytest.fixture
async def serve(
    tls: tuple[Path, ssl.SSLContext],
) -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    """`server = await serve(handler)`: one HTTPS server on 127.0.0.1 answering every path."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> Server:
        app = web.Application()
        server = Server("", tls[0])

        async def recording(request: web.Request) -> web.StreamResponse:
            server.seen.append(request.headers.get("Authorization", ""))
            return await handler(request)

        app.router.add_route("*", "/{tail:.*}", recording)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock, ssl_context=tls[1]).start()
        server.url = f"https://127.0.0.1:{sock.getsockname()[1]}"
        return server

    yield start
    for runner in runners:
        await runner.cleanup()


def status(code: int, reason: str, message: str, **headers: str) -> web.Response:
    body = {"kind": "Status", "code": code, "reason": reason, "message": message}
    return web.json_response(body, status=code, headers=headers)


def kubeconfig(tmp_path: Path, server: Server, user: dict[str, Any]) -> Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "c",
        "clusters": [
            {
                "name": "k",
                "cluster": {
                    "server": server.url,
                    "certificate-authority-data": base64.b64encode(server.ca.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    return path


def only_token(token: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {token}":
            return status(401, "Unauthorized", "Unauthorized")
        return web.json_response({"kind": "Namespace", "metadata": {"name": "default"}})

    return handler


async def test_429_carries_the_servers_retry_after_and_headers(
    serve: Callable[[Handler], Awaitable[Server]], tmp_path: Path
) -> None:
    answers = [
        status(
            429,
            "TooManyRequests",
            "too many requests, please try again later",
            **{"Retry-After": "3"},
        ),
        status(
            503,
            "ServiceUnavailable",
            "the server is shutting down",
            **{
                "Retry-After": email.utils.format_datetime(
                    dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60), usegmt=True
                )
            },
        ),
    ]

    async def handler(request: web.Request) -> web.StreamResponse:
        return answers.pop(0)

    server = await serve(handler)
    async with await Kube.connect(
        kubeconfig=str(kubeconfig(tmp_path, server, {"token": "t"}))
    ) as kube:
        with pytest.raises(errors.KubeUnavailable) as first:
            await kube.get("/api/v1/namespaces/default")
        assert first.value.transient
        assert first.value.retry_after == 3.0
        assert first.value.headers["retry-after"] == "3"  # case-insensitive, as HTTP has it
        assert "retry after 3 s" in str(first.value)
        with pytest.raises(errors.KubeUnavailable) as second:
            await kube.get("/api/v1/namespaces/default")
    assert second.value.retry_after is not None
    assert 55 <= second.value.retry_after <= 60


async def test_401_is_transient_and_the_rotated_token_file_is_read_on_the_retry(
    serve: Callable[[Handler], Awaitable[Server]], tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("old\n")
    server = await serve(only_token("new"))
    path = kubeconfig(tmp_path, server, {"tokenFile": str(token)})
    async with await Kube.connect(kubeconfig=str(path)) as kube:
        with pytest.raises(errors.KubeUnauthorized) as info:
            await kube.get("/api/v1/namespaces/default")
        assert info.value.transient
        assert info.value.status == 401
        token.write_text("new\n")  # the kubelet rotated it
        assert (await kube.get("/api/v1/namespaces/default"))["metadata"]["name"] == "default"
    assert server.seen == ["Bearer old", "Bearer new"]


async def test_an_exec_plugins_credential_is_fetched_again_after_a_401(
    serve: Callable[[Handler], Awaitable[Server]], tmp_path: Path
) -> None:
    """Kubeconfigs with a credential plugin go through kubernetes-asyncio's loader; the token it
    returns is sent, and after a 401 the plugin is run again for a new one."""
    token = tmp_path / "token"
    token.write_text("old")
    plugin = (
        "import json, sys; print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1', "
        "'kind': 'ExecCredential', 'status': {'token': open(sys.argv[1]).read().strip()}}))"
    )
    exec_user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": sys.executable,
            "args": ["-c", plugin, str(token)],
            "interactiveMode": "Never",
        }
    }
    server = await serve(only_token("new"))
    async with await Kube.connect(kubeconfig=str(kubeconfig(tmp_path, server, exec_user))) as kube:
        with pytest.raises(errors.KubeUnauthorized):
            await kube.get("/api/v1/namespaces/default")
        token.write_text("new")
        assert (await kube.get("/api/v1/namespaces/default"))["metadata"]["name"] == "default"
    assert server.seen == ["Bearer old", "Bearer new"]


async def test_403_stays_permanent(
    serve: Callable[[Handler], Awaitable[Server]], tmp_path: Path
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return status(403, "Forbidden", 'leases is forbidden: User "x" cannot list resource')

    server = await serve(handler)
    async with await Kube.connect(
        kubeconfig=str(kubeconfig(tmp_path, server, {"token": "t"}))
    ) as kube:
        with pytest.raises(errors.KubeForbidden) as info:
            await kube.get("/apis/coordination.k8s.io/v1/leases")
    assert not info.value.transient
    assert "cannot list resource" in str(info.value)


async def test_in_cluster_token_rotation_is_retried_by_a_work_queue(
    serve: Callable[[Handler], Awaitable[Server]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In a pod: the projected service-account token expires and the kubelet writes a new one.
    The request that carried the old one gets 401; the queue retries the key (transient) and the
    retry reads the new token from the file."""
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("expired")
    server = await serve(only_token("fresh"))
    (account / "ca.crt").write_bytes(server.ca.read_bytes())
    monkeypatch.setattr(config, "SERVICE_ACCOUNT", account)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", server.url.rsplit(":", 1)[1])
    done: list[str] = []
    async with await Kube.connect() as kube:

        async def handle(key: str) -> None:
            try:
                done.append((await kube.get(f"/api/v1/namespaces/{key}"))["metadata"]["name"])
            except errors.KubeUnauthorized:
                (account / "token").write_text("fresh")  # the kubelet's rotation, just late
                raise

        queue: KeyedQueue[str] = KeyedQueue("t", handle, workers=1)
        runner = asyncio.create_task(queue.run())
        try:
            queue.enqueue("default")
            await until(lambda: _async(done), what="the retried request")
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
    assert done == ["default"]
    assert server.seen == ["Bearer expired", "Bearer fresh"]
    assert queue.retries == 1


async def test_a_silent_server_times_out_with_a_reason(
    serve: Callable[[Handler], Awaitable[Server]], tmp_path: Path
) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.json_response({})

    server = await serve(handler)
    path = kubeconfig(tmp_path, server, {"token": "t"})
    try:
        async with await Kube.connect(kubeconfig=str(path), request_timeout=0.2) as kube:
            with pytest.raises(errors.KubeUnavailable, match=r"no answer .* within 0\.2 s"):
                await kube.get("/api/v1/namespaces/default")
    finally:
        release.set()


async def _async(value: object) -> object:
    return value


def test_a_cancelled_watch_leaves_no_socket_behind(tls: tuple[Path, ssl.SSLContext]) -> None:
    """A watch cancelled mid-stream (a role restarting, the process stopping) closes its TLS
    connection before the TLS shutdown completes; on Python < 3.12.8 asyncio then leaks the
    socket under it (fixed by CPython PR 118960) unless the pool aborts it
    (`agent.connections`). Here the server streams and then reads nothing more, so it never
    answers the client's close_notify (a busy API server may answer after the client's loop has
    ended); the client runs on a loop of its own that ends right after, as a process's does. A
    full collection then finds no unclosed socket or transport. (The control-plane tier saw two
    such sockets of a test's cancelled informers, reported by the garbage collector in a later
    test.)"""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    served: list[socket.socket] = []
    stop = threading.Event()

    def server() -> None:
        listener.settimeout(5)
        for _ in range(2):
            conn = tls[1].wrap_socket(listener.accept()[0], server_side=True)
            served.append(conn)
            while b"\r\n\r\n" not in conn.recv(65536):
                pass
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n15\r\n"
                b'{"type": "BOOKMARK"}\n\r\n'
            )
        stop.wait(10)  # and read nothing: the client's close_notify is never answered

    thread = threading.Thread(target=server, daemon=True)
    thread.start()
    ca = ssl.create_default_context(cafile=str(tls[0]))

    async def token() -> str | None:
        return None

    async def client() -> None:
        kube = Kube(host=f"https://127.0.0.1:{port}", ssl_context=ca, auth=token, request_timeout=5)

        async def watch() -> None:
            async with kube.stream("/w", params={}, read_timeout=10) as body:
                while await body.readline():
                    pass

        tasks = [asyncio.create_task(watch()) for _ in range(2)]
        await asyncio.wait(tasks, timeout=1)  # both streaming (and neither ended)
        for t in tasks:
            assert not t.done(), t.exception()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await kube.close()

    found: list[str] = []
    previous, sys.unraisablehook = sys.unraisablehook, lambda u: found.append(repr(u.exc_value))
    try:
        asyncio.run(client())
        gc.collect()
    finally:
        sys.unraisablehook = previous
        stop.set()
        thread.join(5)
        for conn in served:
            conn.close()
        listener.close()
    assert found == []
