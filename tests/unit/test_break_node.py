"""A node role that cannot do its work but says it is ready, found by trying to break issues 9-11
with real processes. It failed before its fix and now guards it.

Seen on `./dev demo --keep` (real node roles over synthetic trees): gpu-server-1's plugin
checkpoint overwritten with `{"version": 1, "garb`. From then on
- every NodePrepareResources on that node answers the claim with `checkpoint.json is not JSON
  (...); move it away to start with no prepared claims` (called over the plugin's socket as
  kubelet does), so no GPU pod can start there;
- every safe removal there answers `NodeReleased=False, Busy: prepared for claim (checkpoint
  unreadable ...)`, so the node's GPUs stay attached (`Detaching` for good after their
  scale-down), with no Warning Event on the resource;
- yet `/readyz` says `[+]node ok` (a `--roles node` process with the same corrupt file:
  `readyz check passed`), the node keeps its fabric label and the scheduler keeps sending GPU
  claims to it.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import app, settings
from agent.testing.fakekube import FakeKube
from tests.waiting import until

DRIVER = "fake.cohdi.io"


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="brk-", dir="/tmp"))  # short: unix socket paths
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_a_node_whose_checkpoint_is_unreadable_is_not_ready(root: Path) -> None:
    (root / "sys" / "bus" / "pci" / "devices").mkdir(parents=True)
    plugin_dir = root / "kubelet" / "plugins" / DRIVER
    plugin_dir.mkdir(parents=True)
    (plugin_dir / "checkpoint.json").write_text('{"version": 1, "garb')
    kube = FakeKube(bookmark_interval=60)
    kube.selectable("composableresources", "spec.target_node")
    cfg = settings.Settings(
        cluster=settings.ClusterSettings(driver=DRIVER),
        node=settings.NodeSettings(
            name="node-0",
            sysfs_root=str(root / "sys"),
            nvml_path=str(root / "no-nvml.so"),
            rescan="never",
            kubelet_dir=str(root / "kubelet"),
            cdi_dir=str(root / "cdi"),
        ),
    )
    role = app._NodeRole(kube, cfg)  # type: ignore[arg-type]
    task = asyncio.create_task(role.run())
    try:

        async def started() -> bool:
            reporter = role.reporter
            return role.plugin_serving and reporter is not None and reporter.scanned.is_set()

        await until(started, what="the plugin serving and the first scan done", timeout=10)
        assert role.not_ready(), "every prepare on this node fails, yet it reports ready"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
