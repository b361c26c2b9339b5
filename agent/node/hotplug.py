"""PCI hot-plug events, from the kernel or from a synthetic sysfs tree, as one stream.

- `KernelPciMonitor`: pyudev's `kernel` netlink source (works without udevd, inside a pod's own
  network namespace too), filtered to the `pci` subsystem, its fd on the event loop with
  `add_reader`: no thread, no polling; an event reaches the callback within a loop iteration.
- `TreePciWatcher`: inotify on `<root>/bus/pci/devices` of a synthetic tree (tests, the demo's
  simulated nodes), turning a function directory that appears or disappears into add/remove.

Both deliver `PciEvent`s; after a gap (a netlink overflow, a restart) the node role rescans the
whole tree, because a level-triggered reconcile beats trusting every edge.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from agent import errors
from agent.model.pci import PciAddress

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PciEvent:
    action: str  # add, remove, change, bind, unbind
    address: PciAddress
    properties: Mapping[str, str] = field(default_factory=dict)
    #: time.monotonic() when the event reached us
    received: float = 0.0


Handler = Callable[[PciEvent], None]


class KernelPciMonitor:
    def __init__(self, on_event: Handler) -> None:
        self.on_event = on_event
        self._monitor: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        import pyudev

        try:
            monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
            monitor.filter_by("pci")
            try:
                monitor.set_receive_buffer_size(4 * 2**20)  # bursts; needs CAP_NET_ADMIN
            except (OSError, ValueError):
                logger.debug("could not enlarge the netlink buffer; a burst may overflow it")
            monitor.start()
        except (OSError, ImportError) as exc:
            raise errors.SysfsError(f"cannot open the kernel uevent netlink socket: {exc}") from exc
        self._monitor = monitor
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(monitor.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                device = self._monitor.poll(timeout=0)
            except OSError as exc:  # ENOBUFS: the kernel dropped events; the caller rescans
                logger.warning("uevent socket: %s; a rescan will catch up", exc)
                self.on_event(PciEvent("overflow", PciAddress(""), {}, time.monotonic()))
                return
            if device is None:
                return
            self.on_event(
                PciEvent(
                    device.action or "",
                    PciAddress(device.sys_name),
                    dict(device.properties),
                    time.monotonic(),
                )
            )

    def stop(self) -> None:
        if self._monitor is not None and self._loop is not None:
            self._loop.remove_reader(self._monitor.fileno())
            self._monitor = None


# inotify(7)
_IN_CREATE: Final = 0x100
_IN_DELETE: Final = 0x200
_IN_MOVED_FROM: Final = 0x40
_IN_MOVED_TO: Final = 0x80
_IN_NONBLOCK: Final = os.O_NONBLOCK
_IN_CLOEXEC: Final = os.O_CLOEXEC
_EVENT: Final = struct.Struct("iIII")


class TreePciWatcher:
    """inotify on a synthetic `<root>/bus/pci/devices`: a function directory moved or created in
    is an add, one deleted or moved out is a remove."""

    def __init__(self, sysfs_root: str, on_event: Handler) -> None:
        self.devices = os.path.join(sysfs_root, "bus", "pci", "devices")
        self.on_event = on_event
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise errors.SysfsError(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        os.makedirs(self.devices, exist_ok=True)
        mask = _IN_CREATE | _IN_DELETE | _IN_MOVED_FROM | _IN_MOVED_TO
        if libc.inotify_add_watch(fd, self.devices.encode(), mask) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise errors.SysfsError(f"inotify_add_watch {self.devices}: {os.strerror(err)}")
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        now = time.monotonic()
        offset = 0
        while offset + _EVENT.size <= len(data):
            _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0").decode()
            offset += _EVENT.size + length
            if name.startswith("."):
                continue  # a writer's temporary directory
            if mask & (_IN_CREATE | _IN_MOVED_TO):
                self.on_event(PciEvent("add", PciAddress(name), {}, now))
            elif mask & (_IN_DELETE | _IN_MOVED_FROM):
                self.on_event(PciEvent("remove", PciAddress(name), {}, now))

    def stop(self) -> None:
        if self._fd >= 0 and self._loop is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
