"""Decisions tell the story: in logs (one JSON object a line, the objects as fields, one line per
decision, in order, no line twice), in Events and in `cohdi_decisions_total`, exactly once each.

On the in-memory world of tests/unit/test_cluster_role_fake.py (the whole cluster role, an
in-memory API server and fabric), with the real node role for the node: its reporter over a
synthetic PCI tree and its kubelet plugin's DRA service, called as kubelet calls it.

Before: successful attaches and readiness were not logged, the node role logged nothing about
prepare, unprepare or NodeReady, the claim, device and node were only inside message text, "waiting
for node ... to release" was logged twice, and a deleting ComposableResource whose finalizer write
met a 409 was detached, announced and counted a second time."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent import logs, settings
from agent._proto.dra.v1 import api_pb2 as v1
from agent._proto.dra.v1 import api_pb2_grpc as v1_grpc
from agent.controllers import metrics
from agent.kube.resources import RESOURCES, resource_name
from agent.model.fabric import DeviceId, PoolDevice
from agent.node.plugin import Preparer, _servicer
from agent.node.reporting import NodeReporter
from agent.simulated.sysfs import add_function
from agent.testing.nodereport import NodeDouble
from tests.unit.test_cluster_role_fake import DRIVER, World, world
from tests.waiting import until

BDF = "0000:41:00.0"  # where the in-memory fabric says an attached GPU is


@contextlib.contextmanager
def json_log() -> Iterator[io.StringIO]:
    """Every log line of the process, as `--log-format json` writes it, into a buffer."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@contextlib.asynccontextmanager
async def node_role(w: World, node: str, root: Path) -> AsyncIterator[Preparer]:
    """The real node role for `node`: the reporter over a synthetic tree holding the GPU's PCI
    function (bound to vfio-pci for passthrough, so no NVML is needed), and the plugin's
    Preparer."""
    add_function(root / "sys", BDF, driver="vfio-pci", iommu_group=77)  # passthrough: no NVML
    cfg = settings.NodeSettings(
        sysfs_root=str(root / "sys"),
        nvml_path=str(root / "no-nvml.so"),
        rescan="never",
        kubelet_dir=str(root / "kubelet"),
        cdi_dir=str(root / "cdi"),
    )
    reporter = NodeReporter(w.kube, cfg, node=node, dev_root=str(root / "dev"))
    task = asyncio.create_task(reporter.run())
    preparer = Preparer(
        w.kube,
        driver=DRIVER,
        reporter=reporter,
        plugin_dir=root / "plugin",
        cdi_dir=root / "cdi",
    )
    try:
        yield preparer
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _claim_pb(obj: dict[str, Any]) -> Any:
    meta = obj["metadata"]
    return v1.Claim(namespace=meta["namespace"], uid=meta["uid"], name=meta["name"])


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dec-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


#: The decisions of one GPU's life, in the order they must be logged.
STORY = (
    "attach-requested",
    "attached",
    "node-ready",
    "ready",
    "prepared",
    "unprepared",
    "scale-down",
    "released",
    "detached",
)
#: The fields each decision's line carries besides `decision`.
FIELDS = {
    "attach-requested": {"claim", "pod", "resource", "device", "node"},
    "attached": {"resource", "device", "node", "machine", "fabric", "duration"},
    "node-ready": {"resource", "device", "node"},
    "ready": {"claim", "pod", "device", "node", "duration"},
    "prepared": {"claim", "device", "node", "duration"},
    "unprepared": {"claim", "node", "duration"},
    "scale-down": {"resource", "device", "node"},
    "released": {"resource", "device", "node"},
    "detached": {"resource", "device", "node", "duration"},
}


async def test_scale_up_and_down_in_json_tells_the_story_in_order(root: Path) -> None:
    with json_log() as out:
        async with world(double=False, idle_grace=0.3) as w, node_role(w, "node-0", root) as p:
            servicer = _servicer(v1, v1_grpc.DRAPluginServicer, p)
            w.new_claim("c1")
            w.allocate("c1", "gpu-1", "node-0")
            await w.wait(lambda: w.condition("c1", "FabricDeviceReady"), "c1 ready", 60)
            claim = _claim_pb(w.claim("c1"))
            prepared = await servicer.NodePrepareResources(
                v1.NodePrepareResourcesRequest(claims=[claim]), None
            )
            assert prepared.claims[claim.uid].error == ""
            unprepared = await servicer.NodeUnprepareResources(
                v1.NodeUnprepareResourcesRequest(claims=[claim]), None
            )
            assert unprepared.claims[claim.uid].error == ""
            w.release("c1")
            await w.wait(lambda: w.resource(resource_name("gpu-1")) is None, "detached", 60)
    lines = out.getvalue().splitlines()
    docs = [orjson.loads(line) for line in lines]  # one parseable object per line, or it raises
    for doc in docs:
        assert {"ts", "level", "logger", "msg"} <= set(doc), doc
    decisions = [d for d in docs if "decision" in d]
    print(f"{len(lines)} lines, {len(decisions)} decisions:")
    for d in decisions:
        shown = {k: v for k, v in d.items() if k not in ("ts", "logger", "msg", "level")}
        print(f"  {d['level']:<7} {d['msg']}  {shown}")
    kinds = [d["decision"] for d in decisions]
    story = [k for k in kinds if k in STORY]
    assert story == list(STORY), f"decision lines out of order or missing: {kinds}"
    for d in decisions:
        if d["decision"] in FIELDS:
            missing = FIELDS[d["decision"]] - set(d)
            assert not missing, f"{d['decision']} lacks {missing}: {d}"
            assert d["level"] == "info"
    device_lines = {d["decision"]: d for d in decisions}
    assert device_lines["attach-requested"]["claim"] == "default/c1"
    assert device_lines["attach-requested"]["pod"] == "c1"
    assert device_lines["attached"]["device"] == "gpu-1"
    assert device_lines["prepared"]["device"] == w.device_name("gpu-1")
    assert isinstance(device_lines["detached"]["duration"], float)
    seen: set[tuple[str, str]] = set()
    twice = []
    for d in docs:
        key = (d["logger"], d["msg"])
        if key in seen:
            twice.append(key)
        seen.add(key)
    assert not twice, f"logged twice: {twice}"


def _sample(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return value or 0.0


async def test_ten_deletes_are_ten_detached_events_and_ten_counted_even_after_409s() -> None:
    async with world(gpus=10, nodes=2, double=False) as w:
        w.tasks.append(asyncio.create_task(NodeDouble(w.kube, set(w.nodes)).run()))
        names = [f"c{i}" for i in range(10)]
        for i, name in enumerate(names):
            w.new_claim(name)
            w.allocate(name, f"gpu-{i}", f"node-{i % 2}")
        for name in names:
            await w.wait(lambda n=name: w.condition(n, "FabricDeviceReady"), f"{name} ready", 60)
        for name in names:
            w.release(name)
        before = _sample("cohdi_decisions_total", kind="detached")

        # The node writes to the resource between our read and our finalizer write (here: the
        # API server answers the finalizer write after each device's first detach 409).
        detach = w.fabric.detach
        conflicts = 0

        conflicted: set[str] = set()

        async def detach_then_conflict(device: DeviceId) -> PoolDevice:
            nonlocal conflicts
            done = await detach(device)
            if device in conflicted:
                return done
            conflicted.add(device)
            conflicts += 1
            w.kube.fail(
                "PATCH",
                f"{RESOURCES}/{resource_name(device)}",
                status=409,
                reason="Conflict",
                message="the object has been modified; please apply your changes to the latest",
            )
            return done

        w.fabric.detach = detach_then_conflict  # type: ignore[method-assign]
        for i in range(10):
            await w.kube.delete(f"{RESOURCES}/{resource_name(f'gpu-{i}')}")
        await w.wait(
            lambda: all(w.resource(resource_name(f"gpu-{i}")) is None for i in range(10)),
            "all ten resources gone",
            60,
        )
        events = await until(
            lambda: _detached_events(w), what="ten Detached occurrences written", timeout=30
        )
        counted = _sample("cohdi_decisions_total", kind="detached") - before
        detaches = len(w.fabric.detaches)
    print(
        f"10 deletes, {conflicts} finalizer writes answered 409: {len(events)} Detached Events "
        f"(counts {sorted(e['count'] for e in events)}), {counted:.0f} counted, "
        f"{detaches} fabric detaches"
    )
    assert len(events) == 10
    assert all(e["count"] == 1 for e in events), "a resource announced Detached twice"
    assert counted == 10
    assert detaches == 10


async def _detached_events(w: World) -> list[dict[str, Any]]:
    await asyncio.sleep(0.2)  # let the recorder's writes land
    found = [e for e in w.kube.objects("events") if e["reason"] == "Detached"]  # objects
    return found if sum(e["count"] for e in found) >= 10 else []
