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

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.node.simnode import node_role

DRIVER = "fake.cohdi.io"


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="brk-", dir="/tmp"))  # short: unix socket paths
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_a_node_whose_checkpoint_is_unreadable_is_not_ready(root: Path) -> None:
    plugin_dir = root / "kubelet" / "plugins" / DRIVER
    plugin_dir.mkdir(parents=True)
    (plugin_dir / "checkpoint.json").write_text('{"version": 1, "garb')
    async with node_role(root, driver=DRIVER) as role:
        assert role.not_ready(), "every prepare on this node fails, yet it reports ready"
