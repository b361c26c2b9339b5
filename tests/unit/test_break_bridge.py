"""`agent.devcluster.bridge.TlsBridge` under attack: clients that connect and never speak, a
failed handshake, and `stop()` while connections are arriving and handshaking — every one of them
is closed by the bridge, none left open, and the bridge keeps serving the others meanwhile."""

from __future__ import annotations

import contextlib
import gc
import select
import socket
import ssl
import threading
import time
from pathlib import Path

from agent import pki
from agent.devcluster.bridge import TlsBridge, serving_context


def _bridge(tmp_path: Path, target_port: int = 9) -> tuple[TlsBridge, Path]:
    (tmp_path / "up").mkdir(exist_ok=True)
    ca, _, _ = pki.load_or_make_ca(tmp_path / "up", "upstream-ca")
    ctx, _ = serving_context(ca.cert, ca.key, tmp_path / "bridge", "b", "127.0.0.2")
    return TlsBridge("127.0.0.2", ctx, "127.0.0.1", target_port, ca.cert), ca.cert


def _left_open(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """The sockets whose peer has not closed them (EOF or reset) within `timeout` seconds. Each
    first sends a byte, as a client's ClientHello would: a connection the kernel dropped from the
    listener's queue at its close (half-open, the client never told) is reset by it; one the
    bridge still holds stays open."""
    for s in socks:
        with contextlib.suppress(OSError):
            s.send(b"\x16")
    waiting = set(socks)
    deadline = time.monotonic() + timeout
    while waiting and (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select(list(waiting), [], [], left)
        for s in readable:
            try:
                if s.recv(4096, socket.MSG_DONTWAIT):
                    continue  # data (the bridge sends none before a ClientHello): read on
            except (ConnectionResetError, BrokenPipeError):
                pass
            except BlockingIOError:
                continue
            waiting.discard(s)
    return [s for s in socks if s in waiting]


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """The peer closed (EOF or reset) within `timeout` seconds; False if it stays open."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def _connect_until_refused(port: int, socks: list[socket.socket], go: threading.Event) -> None:
    """Once `go` is set, connect to the bridge again and again (for at most 0.5 s), saying
    nothing, until it refuses (its listener closed)."""
    go.wait()
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        try:
            socks.append(socket.create_connection(("127.0.0.2", port), timeout=2))
        except OSError:
            return


def test_stop_while_connections_arrive_closes_every_one(tmp_path: Path) -> None:
    """Clients keep connecting (and never speak) while `stop()` runs. asyncio accepts up to 100
    connections at a time and hands each to the bridge's handler only a few loop turns later:
    `stop()` ended the handlers it knew of and stopped the loop, so a connection whose handler had
    not started yet stayed open (about 100 per run, until the garbage collector found them); and
    one accepted before the listener closed but made into a transport after it was never closed
    at all (Python 3.11's `Server._attach` asserts the server still listens)."""
    gc.disable()  # the collector must not close what the bridge left open
    try:
        for attempt in range(5):
            bridge, _ = _bridge(tmp_path)
            bridge.start()
            port = bridge.port
            socks: list[socket.socket] = []
            go = threading.Event()
            clients = [
                threading.Thread(target=_connect_until_refused, args=(port, socks, go))
                for _ in range(4)
            ]
            for t in clients:
                t.start()
            go.set()
            time.sleep(0.02 * (attempt + 1))
            bridge.stop()
            for t in clients:
                t.join()
            try:
                open_ = _left_open(socks, 3.0)
                assert open_ == [], f"{len(open_)} of {len(socks)} connections left open"
            finally:
                for s in socks:
                    s.close()
    finally:
        gc.enable()


def test_a_failed_handshake_and_a_silent_client_do_not_stop_the_others(tmp_path: Path) -> None:
    """A client that speaks no TLS (its handshake fails) is closed at once; one that never sends
    anything is left to its handshake timeout — neither stops the bridge from accepting and
    serving the next connection, and `stop()` closes the silent one."""
    bridge, ca_cert = _bridge(tmp_path)
    bridge.start()
    try:
        garbage = socket.create_connection(("127.0.0.2", bridge.port), timeout=5)
        garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _closed_by_peer(garbage, 5.0)
        garbage.close()
        silent = socket.create_connection(("127.0.0.2", bridge.port), timeout=5)
        # a real client: its handshake with the bridge succeeds (then the upstream is refused)
        client = ssl.create_default_context(cafile=str(ca_cert))
        with (
            socket.create_connection(("127.0.0.2", bridge.port), timeout=5) as raw,
            client.wrap_socket(raw, server_hostname="127.0.0.2") as tls,
        ):
            assert tls.version() is not None
        bridge.stop()
        assert _closed_by_peer(silent, 5.0)
        silent.close()
    finally:
        bridge.stop()
