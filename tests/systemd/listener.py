"""A stand-in for systemd's end of the notification protocol: a unix datagram socket in a
temporary directory that records every message with its arrival time (monotonic) and the
sender's pid (SO_PASSCRED, as systemd reads it)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Message:
    at: float  # time.monotonic() on arrival
    pid: int  # the sender's pid, from the kernel's credentials
    fields: dict[str, str]

    def has(self, key: str, value: str | None = None) -> bool:
        return key in self.fields and (value is None or self.fields[key] == value)


class NotifyListener:
    """Bind `<directory>/notify.sock`; `messages` fills in from a daemon thread until `close()`."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        creds = socket.CMSG_SPACE(struct.calcsize("3i"))
        while not self._closed.is_set():
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(4096, creds)
            except TimeoutError:
                continue
            except OSError:
                return
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[: struct.calcsize("3i")])[0]
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            with self._lock:
                self.messages.append(Message(time.monotonic(), pid, fields))

    def seen(self, key: str, value: str | None = None) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.has(key, value)]

    def first(self, key: str, value: str | None = None) -> Message | None:
        found = self.seen(key, value)
        return found[0] if found else None

    def statuses(self) -> list[str]:
        return [m.fields["STATUS"] for m in self.seen("STATUS")]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self.sock.close()
