"""Make a TLS service that listens on loopback (the local API server, the fabric emulator)
reachable from pods on the real node, as kube-proxy would make the `kubernetes` Service
reachable: a `TlsBridge` listens on the node's address (`RealNode.node_ip`, which the pods on
its CNI bridge route to through their gateway), presents a certificate for that address signed
by a CA the pods trust, and forwards what it decrypts over a TLS connection of its own to the
loopback service, verifying that one with the service's CA.

The bridge terminates TLS rather than passing it through because the services' certificates
name loopback only; the HTTP inside — a ServiceAccount's bearer token, watches, TokenRequests —
passes unchanged (a client certificate would not: the bridge presents none upstream). Traffic
stays on this machine: the node's address is on an interface of its own.

Runs its own event loop on a thread, so a synchronous caller (a pytest fixture, a CLI command)
or an asyncio one can use it alike: `start()` returns once it listens, `stop()` closes it and
every connection it forwarded.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

from agent import errors
from agent import pki as certs


def serving_context(
    ca_cert: Path, ca_key: Path, directory: Path, stem: str, address: str
) -> tuple[ssl.SSLContext, Path]:
    """A server context with a new certificate for `address` (an IP or a DNS name) signed by
    the CA in `ca_cert`/`ca_key` (PEM files; the key EC or RSA as `agent.pki` writes them),
    written as `<directory>/<stem>.crt|.key`. Returns (context, certificate path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    key = serialization.load_pem_private_key(ca_key.read_bytes(), None)
    directory.mkdir(parents=True, exist_ok=True)
    pair = certs.issue(
        directory,
        stem,
        ca_key=key,  # type: ignore[arg-type]
        ca_cert=ca,
        cn=f"cohdi-bridge-{stem}",
        server_names=(address,),
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pair.cert), str(pair.key))
    return ctx, pair.cert


@dataclass
class TlsBridge:
    """`host`:`port` (0: a free one, read `port` after `start()`) with `server_ssl` -> TLS to
    `target_host`:`target_port` verified with `target_ca` (its certificate must name
    `target_host`)."""

    host: str
    server_ssl: ssl.SSLContext
    target_host: str
    target_port: int
    target_ca: Path
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _server: asyncio.Server | None = field(default=None, init=False)
    _conns: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    #: `stop()` has begun: a connection whose handler starts from now on is closed at once
    _closing: bool = field(default=False, init=False)

    @property
    def address(self) -> str:
        """`host:port` as a URL's authority."""
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Listen; raises DevClusterError when the address cannot be bound."""
        ready = threading.Event()
        failure: list[BaseException] = []
        self._closing = False

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                # plain TCP: the TLS handshake happens in the connection's own task
                # (`_handle`), so `stop()` ends a connection still handshaking too
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, self.host, self.port)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except OSError as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name=f"bridge-{self.host}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or failure:
            raise errors.DevClusterError(
                f"bridge on {self.host}:{self.port} to {self.target_host}:{self.target_port} "
                f"did not start: {failure[0] if failure else 'no answer'}"
            )

    def stop(self) -> None:
        """Close the listener and every connection, forwarded or still handshaking;
        idempotent."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    async def _close(self) -> None:
        """Stop accepting, end every connection, then close the listener. Connections being
        forwarded or handshaking have their tasks cancelled; asyncio accepts connections in
        bursts, each made into a transport and handed to `_handle` by tasks to come, which see
        `_closing` and close it. The listener closes only after those: a connection accepted
        before `Server.close()` whose transport is made after it is never closed (Python 3.11's
        `Server._attach` asserts the server still listens, and the accepted socket is left
        open). The loop is the bridge's own, so every other task on it is a connection's; this
        waits until none is left (at most 5 s)."""
        self._closing = True
        loop = asyncio.get_running_loop()
        server = self._server
        if server is not None:
            for sock in server.sockets:
                loop.remove_reader(sock.fileno())  # no more accepts; queued ones are reset below
        deadline = loop.time() + 5
        while True:
            for task in list(self._conns):
                task.cancel()
            others = asyncio.all_tasks() - {asyncio.current_task()}
            left = deadline - loop.time()
            if not others or left <= 0:
                break
            await asyncio.wait(others, timeout=left)
        if server is not None:
            server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:  # accepted just before `stop()`: its handler started after
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            await writer.start_tls(self.server_ssl, ssl_handshake_timeout=30)
            ctx = ssl.create_default_context(cafile=str(self.target_ca))
            up_reader, upstream = await asyncio.open_connection(
                self.target_host, self.target_port, ssl=ctx
            )
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except (
            OSError,
            ssl.SSLError,
            asyncio.IncompleteReadError,
            asyncio.CancelledError,
            TimeoutError,
        ):
            pass  # a peer went, or `stop()`: the connection ends either way
        finally:
            self._conns.discard(task)
            for w in (writer, upstream):
                if w is not None:
                    w.transport.abort()  # no TLS close_notify wait: the other side is gone


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy until `src` ends, then close `dst` (TLS has no half-close)."""
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    finally:
        dst.close()
