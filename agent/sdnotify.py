"""systemd's service notification protocol (sd_notify(3)) for a `Type=notify` unit, and the
watchdog fed by the event loop.

The protocol: each message is one datagram of newline-separated `KEY=VALUE` fields sent to the
unix datagram socket named by `$NOTIFY_SOCKET` (a path, or an abstract-namespace name when it
starts with `@`). systemd learns the sender's pid from the socket's credentials (SO_PASSCRED), so
with the default `NotifyAccess=main` only the main process may send. The fields used here:

- `READY=1`      start-up finished: systemd marks the unit started (`active`).
- `STATUS=...`   one line of free text, shown by `systemctl status`.
- `STOPPING=1`   shut-down began.
- `WATCHDOG=1`   keep-alive; systemd kills the service (SIGABRT, then the `Restart=` policy) when
  none arrives within `WatchdogSec=`. systemd passes that period as `$WATCHDOG_USEC`
  (microseconds) and the pid it expects the pings from as `$WATCHDOG_PID`; a process whose pid
  differs (a child that inherited the environment) must not ping (sd_watchdog_enabled(3)).

Why our own module and no library: the protocol is one `sendto()`. `cysystemd` (kept, but a C
extension against libsystemd) and `systemd-python` (needs libsystemd headers to build) would add
a native dependency to every install, including containers where systemd never runs; `sdnotify`
(pure Python) has not been released since 2017. None of them runs the watchdog from the event
loop, which is the part that matters here.

Sending never blocks: the socket is non-blocking and a message that cannot be sent (the queue
full, the socket gone) is dropped with one warning, so the event loop is never held up by systemd.

`keep_alive()` is the coroutine that runs on the event loop for the process's lifetime: it pings
the watchdog at half the period systemd asked for, sends `READY=1` the first time its `ready()`
predicate holds, and a `STATUS=` line whenever `status()` changes. Because the pings come from
the loop itself, a loop that stalls (a blocking call, a deadlock, a CPU-bound handler) stops them
and systemd restarts the process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)

#: How often `keep_alive` re-evaluates status once ready, and readiness before, when the watchdog
#: asks for nothing more frequent (seconds).
TICK = 1.0
READY_TICK = 0.2


def watchdog_period(environ: Mapping[str, str], pid: int) -> float | None:
    """The watchdog period systemd asked this process for, in seconds; None when there is none.

    None when `$WATCHDOG_USEC` is unset, not a positive integer, or `$WATCHDOG_PID` is set and
    names another process (then the variables were inherited from a parent and are not ours).
    """
    raw = environ.get("WATCHDOG_USEC", "")
    if not raw:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            logger.warning("ignoring WATCHDOG_PID=%r: not a process id", owner)
            return None
    try:
        usec = int(raw)
    except ValueError:
        usec = 0
    if usec <= 0:
        logger.warning("ignoring WATCHDOG_USEC=%r: not a positive number of microseconds", raw)
        return None
    return usec / 1_000_000


def socket_address(value: str) -> str | None:
    """The address to `sendto()` for a `$NOTIFY_SOCKET` value: an absolute path as is, `@name`
    as the abstract name `\\0name`. None (with a warning) for anything else (systemd ≥ 254's
    `vsock:` addresses are not supported)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    logger.warning("ignoring NOTIFY_SOCKET=%r: not an absolute path or an @abstract name", value)
    return None


class Notifier:
    """Sends notifications to one socket. Build it with `from_environ`; tests may build it with
    their own socket path."""

    def __init__(self, address: str, *, watchdog: float | None = None) -> None:
        """`address`: what `socket_address` returns; `watchdog`: the period in seconds."""
        self.address = address
        #: The watchdog period systemd asked for (seconds), None when there is no watchdog.
        self.watchdog = watchdog
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        self._failing = False
        self.stopping_sent = False

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None
    ) -> Notifier | None:
        """The notifier systemd asked for through `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and
        `$WATCHDOG_PID`; None when the process does not run under a `Type=notify` unit."""
        env = os.environ if environ is None else environ
        address = socket_address(env.get("NOTIFY_SOCKET", "")) if env.get("NOTIFY_SOCKET") else None
        if address is None:
            return None
        period = watchdog_period(env, os.getpid() if pid is None else pid)
        return cls(address, watchdog=period)

    def send(self, *fields: str) -> bool:
        """Send one message of `fields` ("KEY=VALUE", no newline inside). True when sent. Never
        blocks and never raises: a failure is logged once (WARNING) until a send works again."""
        for f in fields:
            if "=" not in f or "\n" in f:
                raise ValueError(f"a notification field is KEY=VALUE on one line, not {f!r}")
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:  # BlockingIOError (queue full), ENOENT, ECONNREFUSED, ...
            if not self._failing:
                logger.warning("cannot notify systemd at %r: %s", self.address, exc)
            self._failing = True
            return False
        if self._failing:
            logger.info("notifying systemd works again")
        self._failing = False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={one_line(text)}")

    def stopping(self, status: str = "stopping") -> bool:
        """`STOPPING=1` (once; later calls do nothing and return False)."""
        if self.stopping_sent:
            return False
        self.stopping_sent = True
        return self.send("STOPPING=1", f"STATUS={one_line(status)}")

    def ping(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        self._sock.close()


def one_line(text: str) -> str:
    """`text` as one STATUS line (newlines become '; ')."""
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


async def keep_alive(
    notifier: Notifier,
    *,
    ready: Callable[[], bool],
    status: Callable[[], str],
    tick: float = TICK,
) -> None:
    """Until cancelled, on the event loop: `WATCHDOG=1` every half watchdog period (the first at
    once), `READY=1` the first time `ready()` is true (checked every READY_TICK seconds),
    `STATUS=` whenever `status()` changes (checked every `tick` seconds once ready). `ready` and
    `status` only read state (no I/O); an exception from either is a bug and ends the coroutine.
    """
    next_ping = time.monotonic()
    is_ready = False
    last_status = ""
    while True:
        now = time.monotonic()
        if notifier.watchdog is not None and now >= next_ping:
            notifier.ping()
            next_ping = now + notifier.watchdog / 2
        text = status()
        if not is_ready and ready():
            is_ready = True
            last_status = text
            notifier.ready(text)
            logger.info("ready: told systemd (%s)", text)
        elif text != last_status:
            last_status = text
            notifier.status(text)
        wait = tick if is_ready else min(tick, READY_TICK)
        if notifier.watchdog is not None:
            wait = min(wait, max(0.0, next_ping - time.monotonic()))
        await asyncio.sleep(wait)


def stall(seconds: float) -> None:
    """Block the calling thread — the event loop's, when called from a signal handler the loop
    runs — for `seconds`: the fault the watchdog exists for. Only reached through the
    `--stall-on-sigusr2` setting, which tests of the watchdog set."""
    logger.warning("SIGUSR2: blocking the event loop for %.1f s (--stall-on-sigusr2)", seconds)
    time.sleep(seconds)  # blocking the loop is the point
