"""Where a node role process's kubelet plugin sockets are: each process registers under names of
its own (`agent.node.plugin.KubeletPlugin`: `plugins_registry/<driver>-<instance>-reg.sock`,
endpoint `plugins/<driver>/dra-<instance>.sock`), so a test that drives it as kubelet finds them
by pattern once the process serves."""

from __future__ import annotations

from pathlib import Path


def registration_sockets(kubelet_dir: Path, driver: str) -> list[Path]:
    """The driver's registration sockets in kubelet's plugin registry, oldest first."""
    found = [
        p for p in (kubelet_dir / "plugins_registry").glob(f"{driver}-*-reg.sock") if p.is_socket()
    ]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def registration_socket(kubelet_dir: Path, driver: str) -> Path:
    """The one registration socket of the driver; AssertionError when there is none or more."""
    found = registration_sockets(kubelet_dir, driver)
    assert len(found) == 1, f"registration sockets of {driver} in {kubelet_dir}: {found}"
    return found[0]
