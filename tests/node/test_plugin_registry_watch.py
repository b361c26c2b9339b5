"""What kubelet's plugin watcher sees of our sockets appearing. It watches plugins_registry with
inotify and, for every entry created there, stats the entry before it looks at the name (so
before it ignores a dot name), logging `Error when handling create event ... stat file ...: no
such file or directory` for one already gone (k8s.io/kubernetes pkg/kubelet/pluginmanager/
pluginwatcher, 1.36 and 1.37 alike). The plugin used to bind each socket in a private directory
made and removed beside the public name within milliseconds, and the real-node test on 1.37.2 saw
that error in kubelet's log. Here: every entry created in the watched directories while plugins
start, restart and overlap (a DaemonSet's maxSurge) still exists afterwards, as kubelet's late
stat needs; the sockets themselves arrive by rename (IN_MOVED_TO), which kubelet handles as a
create too."""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.node.plugin import KubeletPlugin
from tests.node.simnode import DRIVER, SimNode, make_node

IN_CREATE = 0x100
IN_MOVED_TO = 0x80
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


class Watch:
    """inotify (IN_CREATE | IN_MOVED_TO) on some directories, as kubelet's fsnotify watcher."""

    def __init__(self, *dirs: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.dirs: dict[int, Path] = {}
        for d in dirs:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(d), IN_CREATE | IN_MOVED_TO)
            assert wd >= 0, os.strerror(ctypes.get_errno())
            self.dirs[wd] = d

    def events(self) -> list[tuple[str, Path]]:
        """("create" | "moved-to", path) of every event so far, in order."""
        out: list[tuple[str, Path]] = []
        try:
            data = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return out
        offset = 0
        while offset < len(data):
            wd, mask, _cookie, size = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            name = data[offset : offset + size].rstrip(b"\0").decode()
            offset += size
            kind = "create" if mask & IN_CREATE else "moved-to"
            out.append((kind, self.dirs[wd] / name))
        return out

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def kubelet_dir() -> Iterator[Path]:
    """Short, like /var/lib/kubelet: a unix socket path holds at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="kw-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def plugin_on(node: SimNode, kubelet_dir: Path) -> KubeletPlugin:
    return KubeletPlugin(
        node.kube,
        driver=DRIVER,
        kubelet_dir=kubelet_dir,
        cdi_dir=node.root / "cdi",
        reporter=node.reporter,
    )


async def test_nothing_appears_in_the_watched_directories_only_to_vanish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kubelet_dir: Path
) -> None:
    node = make_node(tmp_path, monkeypatch)
    first = plugin_on(node, kubelet_dir)
    registry, plugin_dir = first.reg_socket.parent, first.dra_socket.parent
    registry.mkdir(parents=True)
    plugin_dir.mkdir(parents=True)
    watch = Watch(registry, plugin_dir)
    try:
        await first.start()
        await first.stop()
        await first.start()  # a restart in the same process
        second = plugin_on(node, kubelet_dir)
        await second.start()  # the replacement pod starts while the old one runs (maxSurge)
        await first.stop()
        await second.stop()
        events = watch.events()
    finally:
        watch.close()

    created = [path for kind, path in events if kind == "create"]
    gone = [str(path) for path in created if not path.exists()]
    assert gone == [], "kubelet would stat these after they were removed: " + ", ".join(gone)
    # the sockets arrive whole, by rename, once per start (a process's own names: the first's
    # two starts, the second's one; the node-local DRA name at each of the three)
    arrived = [path for kind, path in events if kind == "moved-to"]
    for socket, starts in ((first.reg_socket, 2), (first.dra_socket, 2), (second.reg_socket, 1)):
        assert arrived.count(socket) == starts, socket
    assert arrived.count(first.local_socket) == 3
