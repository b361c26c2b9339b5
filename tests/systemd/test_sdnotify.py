"""agent.sdnotify against a socket of our own (tests/systemd/listener.py plays systemd): what
goes into a datagram, where it goes (path or abstract name), who systemd sees as sender, the
watchdog's period and owner, the keep-alive coroutine's READY/STATUS/WATCHDOG, and pings stopping
while the event loop is blocked. Also the fabric password as a systemd credential."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent import errors, sdnotify
from agent.fabric.credentials import load_secret
from tests.systemd.listener import Message, NotifyListener
from tests.waiting import until


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    sock = NotifyListener(tmp_path)
    try:
        yield sock
    finally:
        sock.close()


# --- the environment systemd passes --------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "period"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "3000000"}, 3.0),  # no WATCHDOG_PID: ours
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "4242"}, 3.0),  # our pid (4242)
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, None),  # a parent's: inherited
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "500"}, 0.0005),
    ],
)
def test_watchdog_period_is_ours_only(environ: dict[str, str], period: float | None) -> None:
    assert sdnotify.watchdog_period(environ, 4242) == period


def test_socket_addresses() -> None:
    assert sdnotify.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert sdnotify.socket_address("@/org/freedesktop/systemd1/notify/1") == (
        "\0/org/freedesktop/systemd1/notify/1"
    )
    assert sdnotify.socket_address("@") is None
    assert sdnotify.socket_address("relative/notify") is None
    assert sdnotify.socket_address("vsock:2:1234") is None


def test_no_notify_socket_means_no_notifier() -> None:
    assert sdnotify.Notifier.from_environ({}) is None
    assert sdnotify.Notifier.from_environ({"WATCHDOG_USEC": "1000000"}) is None
    assert sdnotify.Notifier.from_environ({"NOTIFY_SOCKET": "not/absolute"}) is None


# --- sending -------------------------------------------------------------------------------------


def test_a_message_is_one_datagram_from_our_pid(listener: NotifyListener) -> None:
    env = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "2000000"}
    notifier = sdnotify.Notifier.from_environ(env)
    assert notifier is not None
    assert notifier.watchdog == 2.0
    try:
        assert notifier.ready("node n1: 2 GPU(s)\nkubelet plugin serving")
        assert notifier.ping()
        assert notifier.stopping()
        assert not notifier.stopping(), "STOPPING=1 goes once"
    finally:
        notifier.close()
    got = until_sync(lambda: len(listener.messages) == 3)
    assert got
    ready, ping, stopping = listener.messages
    assert ready.fields == {
        "READY": "1",
        "STATUS": "node n1: 2 GPU(s); kubelet plugin serving",  # STATUS is one line
    }
    assert ping.fields == {"WATCHDOG": "1"}
    assert stopping.fields == {"STOPPING": "1", "STATUS": "stopping"}
    assert {m.pid for m in listener.messages} == {os.getpid()}, "systemd must see our own pid"


def test_abstract_namespace_socket() -> None:
    name = f"cohdi-test-{uuid.uuid4().hex}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(5)
    try:
        notifier = sdnotify.Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier is not None
        assert notifier.watchdog is None
        assert notifier.status("standby")
        notifier.close()
        assert server.recv(4096) == b"STATUS=standby"
    finally:
        server.close()


def test_a_field_must_be_one_key_value_line(tmp_path: Path) -> None:
    notifier = sdnotify.Notifier(str(tmp_path / "none.sock"))
    with pytest.raises(ValueError, match="KEY=VALUE"):
        notifier.send("READY=1\nSTATUS=two lines")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        notifier.send("READY")
    notifier.close()


def test_a_send_that_fails_never_raises_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, listener: NotifyListener
) -> None:
    notifier = sdnotify.Notifier(str(tmp_path / "gone.sock"))
    with caplog.at_level(logging.INFO, logger="agent.sdnotify"):
        assert not notifier.ping()
        assert not notifier.ping()
        notifier.address = str(listener.path)  # the socket is back (systemd re-executed)
        assert notifier.ping()
    notifier.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "gone.sock" in warnings[0].getMessage()
    assert any("works again" in r.getMessage() for r in caplog.records)


def test_a_full_queue_does_not_block_the_caller(tmp_path: Path) -> None:
    """A receiver that never reads (systemd hung): sends fail at once instead of blocking."""
    path = tmp_path / "stuck.sock"
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stuck.bind(str(path))
    notifier = sdnotify.Notifier(str(path))
    try:
        results = [notifier.send(f"STATUS={'x' * 1000}") for _ in range(2000)]
    finally:
        notifier.close()
        stuck.close()
    assert results[0]
    assert not all(results), "the receive queue filled up, and send() returned instead of waiting"


# --- the keep-alive coroutine on the event loop ---------------------------------------------------


async def test_keep_alive_pings_at_half_the_period_and_says_ready_once(
    listener: NotifyListener,
) -> None:
    period = 1.0  # systemd would kill at a 1 s gap; a loaded machine's loop may lag 0.5 s
    notifier = sdnotify.Notifier(str(listener.path), watchdog=period)
    state = {"ready": False, "status": "node: starting (first PCI scan not done)"}
    task = asyncio.create_task(
        sdnotify.keep_alive(
            notifier, ready=lambda: bool(state["ready"]), status=lambda: str(state["status"])
        )
    )
    try:
        await until(lambda: _count(listener, "WATCHDOG", 3), what="3 pings while not ready")
        assert listener.seen("READY") == [], "not ready yet"
        state["status"] = "node n1: 1 GPU(s), kubelet plugin serving"
        state["ready"] = True
        flipped = time.monotonic()
        ready = await until(lambda: _first(listener, "READY"), what="READY=1")
        assert ready.at >= flipped
        assert ready.fields["STATUS"] == "node n1: 1 GPU(s), kubelet plugin serving"
        state["status"] = "node n1: 2 GPU(s), kubelet plugin serving"
        await until(
            lambda: _has_status(listener, "node n1: 2 GPU(s), kubelet plugin serving"),
            what="the changed STATUS",
        )
        await until(lambda: _count(listener, "WATCHDOG", 9), what="9 pings")
    finally:
        task.cancel()
        notifier.close()
    assert len(listener.seen("READY")) == 1
    assert listener.statuses() == [
        "node: starting (first PCI scan not done)",
        "node n1: 1 GPU(s), kubelet plugin serving",
        "node n1: 2 GPU(s), kubelet plugin serving",
    ]
    pings = [m.at for m in listener.seen("WATCHDOG")]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    print(
        f"\nWATCHDOG_USEC={period * 1e6:.0f}: {len(pings)} pings, gap median "
        f"{statistics.median(gaps):.3f} s, max {max(gaps):.3f} s"
    )
    assert max(gaps) < period, "systemd would have killed us: a gap reached the period"
    assert period * 0.4 <= statistics.median(gaps) <= period * 0.6, "pings at half the period"


async def test_pings_stop_while_the_event_loop_is_blocked(listener: NotifyListener) -> None:
    notifier = sdnotify.Notifier(str(listener.path), watchdog=0.2)
    task = asyncio.create_task(sdnotify.keep_alive(notifier, ready=lambda: True, status=str))
    try:
        await until(lambda: _count(listener, "WATCHDOG", 3), what="pings")
        before = len(listener.seen("WATCHDOG"))
        blocked_at = time.monotonic()
        sdnotify.stall(1.0)  # on the loop's own thread: nothing else runs
        unblocked_at = time.monotonic()
        await until(lambda: _count(listener, "WATCHDOG", before + 3), what="pings again")
    finally:
        task.cancel()
        notifier.close()
    during = [m for m in listener.seen("WATCHDOG") if blocked_at < m.at < unblocked_at]
    assert during == [], "no ping may leave a blocked loop"
    pings = [m.at for m in listener.seen("WATCHDOG")]
    gap = max(b - a for a, b in itertools.pairwise(pings))
    blocked = unblocked_at - blocked_at
    print(f"\nloop blocked {blocked:.2f} s: longest gap between pings {gap:.2f} s")
    assert gap >= 1.0


# --- the fabric password as a systemd credential -------------------------------------------------


def test_a_systemd_credential_holds_the_password(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "fabric-password").write_text("from-credential\n")
    file = tmp_path / "pw"
    file.write_text("from-file\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds), "PW": "from-env"}

    def load(
        file: str = "", environ: dict[str, str] = env, credential: str = "fabric-password"
    ) -> str:
        return load_secret(
            file=file, env_var="PW", what="pw", credential=credential, environ=environ
        ).reveal()

    assert load() == "from-credential"
    assert load(file=str(file)) == "from-file", "an explicit file wins"
    assert load(credential="fabric-client-secret") == "from-env", "no such credential: env"
    assert load(environ={"PW": "from-env"}) == "from-env", "not under systemd: env"
    (creds / "fabric-password").unlink()
    (creds / "fabric-password").mkdir()  # there, but unreadable as a file
    with pytest.raises(errors.ConfigError, match="systemd credential 'fabric-password'"):
        load()


# --- helpers -------------------------------------------------------------------------------------


def until_sync(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


async def _count(listener: NotifyListener, key: str, n: int) -> bool:
    return len(listener.seen(key)) >= n


async def _first(listener: NotifyListener, key: str) -> Message | None:
    return listener.first(key)


async def _has_status(listener: NotifyListener, text: str) -> bool:
    return text in listener.statuses()
