"""Safe removal on the node without a control plane (the in-memory API server, a synthetic sysfs
tree, the stub NVML): a GPU with a compute process or an open handle is refused with the reason
(NodeReleased=False, Busy), an idle one is removed from the PCI tree and released, force_detach
skips the checks; the open-handle scan over a synthetic /proc tree and over the real /proc with a
file this test holds open; the reporter's informer and reconcile loop live and die together."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.kube.resources import FINALIZER, NODE_READY, NODE_RELEASED, RESOURCES
from agent.node.reporting import open_handles
from tests.node.simnode import SimNode, make_node
from tests.waiting import until

BDF = "0000:41:00.0"


# --- the /proc scan --------------------------------------------------------------------------


def test_open_handles_finds_this_process_holding_a_file(tmp_path: Path) -> None:
    device = tmp_path / "nvidia0"
    device.write_text("")
    assert os.getpid() not in open_handles(str(device))
    with open(device) as _held:
        assert os.getpid() in open_handles(str(device))
    assert os.getpid() not in open_handles(str(device))


def test_open_handles_over_a_synthetic_proc_tree(tmp_path: Path) -> None:
    device, other = tmp_path / "nvidia3", tmp_path / "nvidia4"
    device.write_text("")
    other.write_text("")
    proc = tmp_path / "proc"

    def fds(pid: str, *targets: str) -> None:
        (proc / pid / "fd").mkdir(parents=True)
        for n, target in enumerate(targets):
            os.symlink(target, proc / pid / "fd" / str(n))

    fds("100", str(other), str(device), str(device))  # counted once
    fds("200", str(other))
    fds("300", str(tmp_path / "gone"))  # an fd whose target vanished
    fds("42", str(device))
    (proc / "400").mkdir()  # a process without a readable fd directory
    fds("self", str(device))  # not a pid
    (proc / "uptime").write_text("1.0 1.0\n")

    assert open_handles(str(device), str(proc)) == [42, 100]
    assert open_handles(str(other), str(proc)) == [100, 200]
    assert open_handles(str(tmp_path / "no-such-device"), str(proc)) == []
    assert open_handles(str(device), str(tmp_path / "no-proc")) == []


# --- release ---------------------------------------------------------------------------------


@pytest.fixture
async def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SimNode]:
    """A GPU (minor 3) attached, seen and reported NodeReady; its device node in the node's
    /dev; a synthetic /proc."""
    (tmp_path / "proc").mkdir()
    n = make_node(tmp_path, monkeypatch, proc_root=str(tmp_path / "proc"))
    await n.attach("gpu-a", BDF, minor=3)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidia3").write_text("")
    await n.reporter.nvml.start()
    try:
        yield n
    finally:
        await n.reporter.nvml.close()


def name_of(node: SimNode) -> str:
    (key,) = node.reporter.resources.store
    return key[1]


def detaching(node: SimNode, **spec: Any) -> dict[str, Any]:
    """The composer asked for the detach: the resource is being deleted (its finalizer holds
    it); what the reporter's informer would now hold."""
    path = f"{RESOURCES}/{name_of(node)}"
    node.kube.edit(path, lambda o: o["metadata"].__setitem__("finalizers", [FINALIZER]))
    if spec:
        node.kube.edit(path, lambda o: o["spec"].update(spec))
    node.kube.remove(path)
    obj = node.kube.get_obj(path)
    assert obj is not None
    node.reporter.resources.store[("", name_of(node))] = obj
    return obj


def released(node: SimNode) -> dict[str, Any] | None:
    obj = node.kube.get_obj(f"{RESOURCES}/{name_of(node)}") or {}
    conds = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == NODE_RELEASED), None)


def function_dir(node: SimNode) -> Path:
    return node.sysfs / "bus" / "pci" / "devices" / BDF


async def test_a_gpu_running_a_compute_process_is_refused(node: SimNode) -> None:
    node.processes(BDF, [4242, 4343])
    detaching(node)
    await node.reporter._handle(name_of(node))
    cond = released(node)
    assert cond is not None
    assert (cond["status"], cond["reason"]) == ("False", "Busy")
    assert "2 compute process(es)" in cond["message"]
    assert "4242, 4343" in cond["message"]
    assert function_dir(node).exists()
    assert BDF in node.reporter.functions


async def test_a_gpu_prepared_for_a_claim_is_refused_before_any_process_opens_it(
    node: SimNode,
) -> None:
    """kubelet prepared the GPU for a pod that has not started: no process, no open handle, but
    removing it now would leave that pod without its GPU (a request shrinking, a hand delete)."""
    asked: list[set[str]] = []

    async def prepared_for(devices: set[str]) -> list[str]:
        asked.append(devices)
        return ["default/train-0"]

    node.reporter.prepared_for = prepared_for
    detaching(node)
    await node.reporter._handle(name_of(node))
    cond = released(node)
    assert cond is not None
    assert (cond["status"], cond["reason"]) == ("False", "Busy")
    assert cond["message"] == "prepared for claim default/train-0"
    assert asked
    assert function_dir(node).exists()
    node.reporter.prepared_for = None


async def test_a_gpu_whose_device_node_is_open_is_refused(node: SimNode) -> None:
    holder = node.root / "proc" / "777" / "fd"
    holder.mkdir(parents=True)
    os.symlink(node.root / "dev" / "nvidia3", holder / "9")
    detaching(node)
    await node.reporter._handle(name_of(node))
    cond = released(node)
    assert cond is not None
    assert (cond["status"], cond["reason"]) == ("False", "Busy")
    assert cond["message"] == f"{node.root / 'dev' / 'nvidia3'} is open in pids 777"
    assert function_dir(node).exists()


async def test_an_idle_gpu_is_removed_from_the_tree_and_released(node: SimNode) -> None:
    detaching(node)
    await node.reporter._handle(name_of(node))
    cond = released(node)
    assert cond is not None
    assert (cond["status"], cond["reason"]) == ("True", "Removed")
    assert not function_dir(node).exists()  # a synthetic tree: what the kernel would do
    assert BDF not in node.reporter.functions


async def test_a_real_tree_gets_remove_written(node: SimNode) -> None:
    """Where the function has a `remove` attribute (real sysfs), the reporter writes 1 to it and
    leaves the rest to the kernel."""
    (function_dir(node) / "remove").write_text("")
    detaching(node)
    await node.reporter._handle(name_of(node))
    assert (function_dir(node) / "remove").read_text() == "1"
    cond = released(node)
    assert cond is not None
    assert cond["status"] == "True"


async def test_force_detach_skips_the_checks(node: SimNode) -> None:
    node.processes(BDF, [4242])
    detaching(node, force_detach=True)
    await node.reporter._handle(name_of(node))
    cond = released(node)
    assert cond is not None
    assert cond["status"] == "True"
    assert not function_dir(node).exists()


async def test_a_gpu_nvml_no_longer_knows_is_released(node: SimNode) -> None:
    node.gpus.clear()
    node.processes(BDF, [])
    await node.reporter.nvml.call(node.reporter.nvml.nvml.reinit)
    detaching(node)
    await node.reporter._handle(name_of(node))
    cond = released(node)
    assert cond is not None
    assert cond["status"] == "True"


async def test_without_nvml_nothing_can_say_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = make_node(tmp_path, monkeypatch)  # NVML never started: no process check possible
    await n.attach("gpu-a", BDF, minor=3)
    n.processes(BDF, [4242])
    detaching(n)
    await n.reporter._handle(name_of(n))
    cond = released(n)
    assert cond is not None
    assert cond["status"] == "True"


async def test_a_gpu_already_gone_is_released(node: SimNode) -> None:
    detaching(node)
    node.reporter.functions.clear()
    await node.reporter._handle(name_of(node))
    cond = released(node)
    assert cond is not None
    assert cond["status"] == "True"
    assert function_dir(node).exists()  # nothing of ours to remove


async def test_a_failed_status_write_is_retried(node: SimNode) -> None:
    detaching(node)
    node.kube.fail("PATCH", f"{RESOURCES}/{name_of(node)}/status", status=503)
    await node.reporter._handle(name_of(node))
    assert released(node) is None
    await until(lambda: _pending(node), what="the retry to be queued", timeout=10)


async def _pending(node: SimNode) -> bool:
    return name_of(node) in node.reporter._pending


# --- the whole reporter ------------------------------------------------------------------------


async def test_reporter_reports_arrival_and_release_and_stops_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reporter's run(): the informer and the reconcile loop on the in-memory API server and
    a synthetic tree watched with inotify. A resource that comes Online gets NodeReady; once it
    is being deleted, NodeReleased; cancelling run() leaves no task of it behind."""
    n = make_node(tmp_path, monkeypatch)
    cr = await n.attach("gpu-a", BDF, minor=0)
    name = cr["metadata"]["name"]
    path = f"{RESOURCES}/{name}"
    n.reporter.resources.store.clear()
    n.kube.edit(path, lambda o: o["status"].update(conditions=[]))
    task = asyncio.create_task(n.reporter.run())
    try:

        async def cond(ctype: str) -> dict[str, Any] | None:
            obj = n.kube.get_obj(path) or {}
            conds = (obj.get("status") or {}).get("conditions") or []
            return next((c for c in conds if c["type"] == ctype and c["status"] == "True"), None)

        ready = await until(lambda: cond(NODE_READY), what="NodeReady")
        assert BDF in ready["message"]
        n.kube.edit(path, lambda o: o["metadata"].__setitem__("finalizers", [FINALIZER]))
        n.kube.remove(path)
        await until(lambda: cond(NODE_RELEASED), what="NodeReleased")
        assert not (n.sysfs / "bus" / "pci" / "devices" / BDF).exists()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert left == []


async def test_the_reporter_fails_when_its_informer_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The informer runs in the reporter's TaskGroup: when it dies, run() fails with its error
    and the reconcile loop stops, instead of waiting forever for a store that no longer moves."""
    n = make_node(tmp_path, monkeypatch)

    async def broken() -> None:
        raise RuntimeError("the watch broke")

    monkeypatch.setattr(n.reporter.resources, "run", broken)
    async with asyncio.timeout(30):  # a guard against the old hang, not a timing assert
        with pytest.raises(ExceptionGroup) as caught:
            await n.reporter.run()
    assert caught.group_contains(RuntimeError, match="the watch broke")
    left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert left == []


async def test_retries_pending_when_the_reporter_stops_are_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy GPU is looked at again 5 s later: a timer, which run() cancels when it ends, so
    nothing of a stopped reporter runs on afterwards."""
    n = make_node(tmp_path, monkeypatch)
    await n.attach("gpu-a", BDF, minor=3)
    n.processes(BDF, [4242])
    n.reporter.resources.store.clear()
    task = asyncio.create_task(n.reporter.run())
    try:
        await until(lambda: _has_store(n), what="the informer's list")
        detaching(n)
        n.kube.edit(
            f"{RESOURCES}/{name_of(n)}", lambda o: o["metadata"].__setitem__("labels", {"x": "y"})
        )
        await until(lambda: _busy(n), what="the busy refusal")
        timers = set(n.reporter._timers)
        assert timers
        assert not any(t.cancelled() for t in timers)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert all(t.cancelled() for t in timers)


async def _has_store(node: SimNode) -> bool:
    return bool(node.reporter.resources.store) and node.reporter.nvml.available


async def _busy(node: SimNode) -> bool:
    cond = released(node)
    return cond is not None and cond["reason"] == "Busy"
