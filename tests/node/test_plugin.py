"""The DRA kubelet plugin without a control plane: its DRA services (v1 and v1beta1) called
directly, reading claims from the in-memory API server, over a simulated node (synthetic sysfs,
stub NVML). Every answer and every failure: per-claim errors for a claim replaced, not allocated,
for another driver, a device not on the PCI bus or not attached, a GPU NVML does not know, a
missing claim and a corrupt checkpoint (the plugin still starts); idempotent prepare and
unprepare; a crash between PrepareStarted and PrepareCompleted; claims of an earlier boot; the
sockets (private, announced whole, and never removed by an older process stopping late)."""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent import errors
from agent._proto.dra.v1 import api_pb2 as v1
from agent._proto.dra.v1 import api_pb2_grpc as v1_grpc
from agent._proto.dra.v1beta1 import api_pb2 as v1beta1
from agent._proto.dra.v1beta1 import api_pb2_grpc as v1beta1_grpc
from agent._proto.pluginregistration.v1 import api_pb2 as reg
from agent._proto.pluginregistration.v1 import api_pb2_grpc as reg_grpc
from agent.node import cdi
from agent.node.checkpoint import COMPLETED, STARTED, Checkpoint, PreparedClaim, boot_id
from agent.node.plugin import BIND_DIR, KubeletPlugin, Preparer, _servicer
from tests.node.simnode import CLAIMS, DRIVER, NS, POOL, SimNode, make_node

NVIDIA_BDF, VFIO_BDF = "0000:41:00.0", "0000:42:00.0"


@pytest.fixture
async def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SimNode]:
    """Two GPUs attached and seen: gpu-a bound to nvidia (minor 3), gpu-v to vfio-pci (IOMMU
    group 77, passthrough, so NVML does not list it)."""
    n = make_node(tmp_path, monkeypatch)
    await n.attach("gpu-a", NVIDIA_BDF, minor=3)
    await n.attach("gpu-v", VFIO_BDF, minor=0, driver="vfio-pci", iommu_group=77, in_nvml=False)
    await n.reporter.nvml.start()
    try:
        yield n
    finally:
        await n.reporter.nvml.close()


@pytest.fixture
def kubelet_dir() -> Iterator[Path]:
    """Short, like /var/lib/kubelet: a unix socket path holds at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="kl-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def services(preparer: Preparer) -> dict[str, tuple[Any, Any]]:
    return {
        "v1": (v1, _servicer(v1, v1_grpc.DRAPluginServicer, preparer)),
        "v1beta1": (v1beta1, _servicer(v1beta1, v1beta1_grpc.DRAPluginServicer, preparer)),
    }


async def prepare(preparer: Preparer, *claims: dict[str, Any], version: str = "v1") -> Any:
    pb, servicer = services(preparer)[version]
    request = pb.NodePrepareResourcesRequest(
        claims=[
            pb.Claim(
                namespace=c["metadata"]["namespace"],
                uid=c["metadata"]["uid"],
                name=c["metadata"]["name"],
            )
            for c in claims
        ]
    )
    return await servicer.NodePrepareResources(request, None)


async def unprepare(preparer: Preparer, *uids: str, version: str = "v1") -> Any:
    pb, servicer = services(preparer)[version]
    request = pb.NodeUnprepareResourcesRequest(
        claims=[pb.Claim(namespace=NS, uid=u, name=f"c-{u}") for u in uids]
    )
    return await servicer.NodeUnprepareResources(request, None)


def spec_file(node: SimNode, uid: str) -> Path:
    return node.root / "cdi" / cdi.file_name(DRIVER, uid)


def checkpoint(node: SimNode) -> dict[str, PreparedClaim]:
    return Checkpoint(node.root / "plugin" / "checkpoint.json").load()


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
async def test_prepare_answers_cdi_ids_and_writes_the_spec(node: SimNode, version: str) -> None:
    preparer = node.preparer()
    claim = node.claim("train", ["gpu-a", "gpu-v"])
    uid = claim["metadata"]["uid"]

    response = await prepare(preparer, claim, version=version)

    entry = response.claims[uid]
    assert entry.error == ""
    assert [
        (list(d.request_names), d.pool_name, d.device_name, list(d.cdi_device_ids))
        for d in entry.devices
    ] == [
        (["gpu-0"], POOL, "gpu-a", [f"{DRIVER}/gpu={uid}-gpu-a"]),
        (["gpu-1"], POOL, "gpu-v", [f"{DRIVER}/gpu={uid}-gpu-v"]),
    ]
    spec = json.loads(spec_file(node, uid).read_text())
    assert spec["cdiVersion"] == ("0.5.0" if uid[0].isdigit() else "0.3.0")
    assert stat.S_IMODE(spec_file(node, uid).stat().st_mode) == 0o644
    (gpu_a, gpu_v) = spec["devices"]
    assert [n["path"] for n in gpu_a["containerEdits"]["deviceNodes"]] == [
        "/dev/nvidia3",
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/nvidia-uvm-tools",
    ]
    assert gpu_a["containerEdits"]["env"] == [
        f"COHDI_GPU_BDF={NVIDIA_BDF}",
        f"NVIDIA_VISIBLE_DEVICES={node.gpus[0].uuid}",
    ]
    assert [n["path"] for n in gpu_v["containerEdits"]["deviceNodes"]] == [
        "/dev/vfio/77",
        "/dev/vfio/vfio",
    ]
    record = checkpoint(node)[uid]
    assert (record.state, record.namespace, record.name) == (COMPLETED, NS, "train")
    assert record.cdi_file == str(spec_file(node, uid))


async def test_prepare_again_answers_from_the_checkpoint(node: SimNode) -> None:
    preparer = node.preparer()
    claim = node.claim("train", ["gpu-a"])
    first = await prepare(preparer, claim)
    reads = node.kube.count("get", "resourceclaims")
    again = await prepare(preparer, claim, version="v1beta1")
    assert node.kube.count("get", "resourceclaims") == reads  # no second read of the claim
    uid = claim["metadata"]["uid"]
    assert list(again.claims[uid].devices[0].cdi_device_ids) == list(
        first.claims[uid].devices[0].cdi_device_ids
    )


async def test_the_plugin_tells_safe_removal_which_claims_a_device_is_prepared_for(
    node: SimNode,
) -> None:
    preparer = node.preparer()
    claim = node.claim("train", ["gpu-a"])
    assert node.reporter.prepared_for is not None  # the plugin answers safe removal's question
    assert await preparer.prepared_for({"gpu-a"}) == []
    await prepare(preparer, claim)
    assert await preparer.prepared_for({"gpu-a", "gpu-z"}) == [f"{NS}/train"]
    assert await preparer.prepared_for({"gpu-v"}) == []
    await unprepare(preparer, claim["metadata"]["uid"])
    assert await preparer.prepared_for({"gpu-a"}) == []


async def test_empty_requests_are_fine(node: SimNode) -> None:
    preparer = node.preparer()
    assert len((await prepare(preparer)).claims) == 0
    assert len((await unprepare(preparer)).claims) == 0


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
async def test_unprepare_removes_spec_and_record_and_repeats_fine(
    node: SimNode, version: str
) -> None:
    preparer = node.preparer()
    claim = node.claim("train", ["gpu-a"])
    uid = claim["metadata"]["uid"]
    await prepare(preparer, claim)
    for _ in range(2):  # kubelet repeats calls after restarts
        response = await unprepare(preparer, uid, version=version)
        assert response.claims[uid].error == ""
        assert not spec_file(node, uid).exists()
        assert uid not in checkpoint(node)
    never = str(uuid.uuid4())  # a claim this node never prepared (deleted long ago)
    assert (await unprepare(preparer, never)).claims[never].error == ""


def _replaced(node: SimNode) -> dict[str, Any]:
    old = node.claim("swap", ["gpu-a"])
    node.kube.remove(f"{CLAIMS}/swap")
    node.claim("swap", ["gpu-a"])  # same name, new UID
    return old


def _unallocated(node: SimNode) -> dict[str, Any]:
    claim = node.claim("pending", ["gpu-a"])
    return node.kube.edit(f"{CLAIMS}/pending", lambda c: c.pop("status")) or claim


def _missing(node: SimNode) -> dict[str, Any]:
    return {"metadata": {"namespace": NS, "name": "gone", "uid": str(uuid.uuid4())}}


async def _off_bus(node: SimNode) -> dict[str, Any]:
    await node.attach("gpu-x", "0000:43:00.0", minor=5, on_bus=False)
    return node.claim("offbus", ["gpu-x"])


async def _unknown_to_nvml(node: SimNode) -> dict[str, Any]:
    await node.attach("gpu-n", "0000:44:00.0", minor=6, in_nvml=False)  # bound to nvidia
    return node.claim("nonvml", ["gpu-n"])


CASES = {
    "replaced": (_replaced, "was replaced"),
    "not allocated": (_unallocated, "is not allocated"),
    "other driver": (lambda n: n.claim("other", ["gpu-a"], driver="gpu.example.com"), "no device"),
    "not attached": (lambda n: n.claim("ghost", ["gpu-ghost"]), "no attached device"),
    "missing": (_missing, "404"),
    "off the bus": (_off_bus, "is not on this node's PCI bus"),
    "unknown to NVML": (_unknown_to_nvml, r"no /dev/nvidia<minor> known"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_failing_claim_is_an_error_in_its_entry(node: SimNode, case: str) -> None:
    """One request with a good claim and a failing one: the good one is prepared, the other
    carries its error (a gRPC error is only for a malformed request), and is left
    PrepareStarted, to be done again when kubelet retries."""
    make, message = CASES[case]
    bad = make(node)
    if asyncio.iscoroutine(bad):
        bad = await bad
    good = node.claim("good", ["gpu-a"])
    preparer = node.preparer()

    response = await prepare(preparer, bad, good)

    bad_entry = response.claims[bad["metadata"]["uid"]]
    assert message in bad_entry.error
    assert len(bad_entry.devices) == 0
    good_entry = response.claims[good["metadata"]["uid"]]
    assert (good_entry.error, len(good_entry.devices)) == ("", 1)
    assert checkpoint(node)[bad["metadata"]["uid"]].state == STARTED
    assert not spec_file(node, bad["metadata"]["uid"]).exists()


async def test_a_gpu_without_a_uuid_gets_no_visible_devices(node: SimNode) -> None:
    (key,) = [k for k, o in node.reporter.resources.store.items() if "gpu-a" in str(o)]
    node.reporter.resources.store[key]["status"]["device_id"] = ""
    claim = node.claim("train", ["gpu-a"])
    await prepare(node.preparer(), claim)
    spec = json.loads(spec_file(node, claim["metadata"]["uid"]).read_text())
    assert spec["devices"][0]["containerEdits"]["env"] == [f"COHDI_GPU_BDF={NVIDIA_BDF}"]


async def test_a_gpu_attached_after_nvml_started_is_found_by_a_reinit(node: SimNode) -> None:
    await node.attach("gpu-b", "0000:45:00.0", minor=7)  # NVML snapshotted its list before
    claim = node.claim("late", ["gpu-b"])
    response = await prepare(node.preparer(), claim)
    assert response.claims[claim["metadata"]["uid"]].error == ""
    spec = json.loads(spec_file(node, claim["metadata"]["uid"]).read_text())
    assert spec["devices"][0]["containerEdits"]["deviceNodes"][0]["path"] == "/dev/nvidia7"


async def test_without_nvml_a_passthrough_gpu_still_prepares(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = make_node(tmp_path, monkeypatch)
    await n.attach("gpu-v", VFIO_BDF, minor=0, driver="vfio-pci", iommu_group=9, in_nvml=False)
    await n.attach("gpu-a", NVIDIA_BDF, minor=3)
    good, bad = n.claim("vfio", ["gpu-v"]), n.claim("nv", ["gpu-a"])  # NVML never started
    response = await prepare(n.preparer(), good, bad)
    assert response.claims[good["metadata"]["uid"]].error == ""
    assert "no /dev/nvidia<minor>" in response.claims[bad["metadata"]["uid"]].error


async def test_a_crash_between_started_and_completed_is_prepared_again(node: SimNode) -> None:
    preparer = node.preparer()
    claim = node.claim("train", ["gpu-a", "gpu-v"])
    uid = claim["metadata"]["uid"]
    first = await prepare(preparer, claim)
    original = spec_file(node, uid).read_text()
    # As if the process died after PrepareStarted, halfway through writing the spec.
    cp = Checkpoint(node.root / "plugin" / "checkpoint.json")
    with cp.locked():
        claims = cp.load()
        claims[uid] = PreparedClaim(uid, NS, "train", STARTED)
        cp.save(claims)
    spec_file(node, uid).write_text(original[: len(original) // 2])

    again = await prepare(node.preparer(), claim)  # a new process

    assert again == first
    assert spec_file(node, uid).read_text() == original
    assert checkpoint(node)[uid].state == COMPLETED
    assert [p.name for p in (node.root / "cdi").iterdir()] == [spec_file(node, uid).name]


def _earlier_boot(node: SimNode, uid: str) -> None:
    """A claim prepared before a reboot: its record (another boot id) and its spec file."""
    path = spec_file(node, uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")
    (node.root / "plugin").mkdir(exist_ok=True)
    Checkpoint(node.root / "plugin" / "checkpoint.json", boot="an-earlier-boot").save(
        {uid: PreparedClaim(uid, NS, "old", COMPLETED, [], str(path))}
    )


async def test_claims_of_an_earlier_boot_are_dropped_at_start(node: SimNode) -> None:
    old = str(uuid.uuid4())
    _earlier_boot(node, old)
    await asyncio.to_thread(node.preparer().clean_stale)
    assert not spec_file(node, old).exists()
    doc = json.loads((node.root / "plugin" / "checkpoint.json").read_text())
    assert (doc["boot_id"], doc["claims"]) == (boot_id(), {})


async def test_claims_of_an_earlier_boot_are_dropped_by_any_later_write(node: SimNode) -> None:
    old = str(uuid.uuid4())
    _earlier_boot(node, old)
    claim = node.claim("train", ["gpu-a"])
    await prepare(node.preparer(), claim)  # no clean_stale: the plugin was not restarted
    assert not spec_file(node, old).exists()
    assert list(checkpoint(node)) == [claim["metadata"]["uid"]]
    _earlier_boot(node, old)
    await unprepare(node.preparer(), str(uuid.uuid4()))
    assert not spec_file(node, old).exists()
    assert checkpoint(node) == {}


async def test_a_fresh_start_with_nothing_stale_writes_nothing(node: SimNode) -> None:
    await asyncio.to_thread(node.preparer().clean_stale)
    assert not (node.root / "plugin" / "checkpoint.json").exists()


async def test_a_corrupt_checkpoint_is_a_per_claim_error_not_a_crash(
    node: SimNode, kubelet_dir: Path
) -> None:
    """Like dra-example-driver: the plugin starts, each prepare and unprepare answers the
    checkpoint's error for its claim, the file is kept for an operator; once it is moved away,
    claims prepare again."""
    plugin = KubeletPlugin(
        node.kube,
        driver=DRIVER,
        kubelet_dir=kubelet_dir,
        cdi_dir=node.root / "cdi",
        reporter=node.reporter,
    )
    cp_path = plugin.plugin_dir / "checkpoint.json"
    cp_path.parent.mkdir(parents=True)
    cp_path.write_text('{"version": 1, "claims": {"x": ')  # half a file
    await plugin.start()
    try:
        claim = node.claim("train", ["gpu-a"])
        uid = claim["metadata"]["uid"]
        response = await prepare(plugin.preparer, claim)
        assert "is not JSON" in response.claims[uid].error
        assert "move it away" in response.claims[uid].error
        assert "is not JSON" in (await unprepare(plugin.preparer, uid)).claims[uid].error
        assert cp_path.read_text() == '{"version": 1, "claims": {"x": '

        cp_path.rename(cp_path.with_suffix(".broken"))
        response = await prepare(plugin.preparer, claim)
        assert response.claims[uid].error == ""
    finally:
        await plugin.stop()


def plugin_on(node: SimNode, kubelet_dir: Path) -> KubeletPlugin:
    return KubeletPlugin(
        node.kube,
        driver=DRIVER,
        kubelet_dir=kubelet_dir,
        cdi_dir=node.root / "cdi",
        reporter=node.reporter,
    )


async def get_info(socket: Path) -> Any:
    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        return await reg_grpc.RegistrationStub(channel).GetInfo(reg.InfoRequest())


async def test_sockets_are_private_and_announce_the_plugin(
    node: SimNode, kubelet_dir: Path
) -> None:
    plugin = plugin_on(node, kubelet_dir)
    await plugin.start()
    try:
        for socket in (plugin.dra_socket, plugin.reg_socket):
            st = socket.stat()
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            # no private bind directory left beside it but the one kept for all (kubelet's
            # watcher ignores dot names, but nothing should pile up), and that one empty
            dots = [p.name for p in socket.parent.iterdir() if p.name.startswith(".")]
            assert dots == [BIND_DIR]
            assert list((socket.parent / BIND_DIR).iterdir()) == []
        info = await get_info(plugin.reg_socket)
        assert (info.type, info.name, info.endpoint) == (
            "DRAPlugin",
            DRIVER,
            str(plugin.dra_socket),
        )
        assert list(info.supported_versions) == [
            "v1.DRAPlugin",
            "v1beta1.DRAPlugin",
            "v1alpha1.DRAResourceHealth",
        ]

        async with grpc.aio.insecure_channel(f"unix://{plugin.dra_socket}") as channel:
            answer = await v1_grpc.DRAPluginStub(channel).NodePrepareResources(
                v1.NodePrepareResourcesRequest()
            )
        assert len(answer.claims) == 0

        async with grpc.aio.insecure_channel(f"unix://{plugin.reg_socket}") as channel:
            stub = reg_grpc.RegistrationStub(channel)
            await stub.NotifyRegistrationStatus(
                reg.RegistrationStatus(plugin_registered=False, error="version skew")
            )
            assert not plugin.registration.registered.is_set()
            await stub.NotifyRegistrationStatus(reg.RegistrationStatus(plugin_registered=True))
        assert plugin.registration.registered.is_set()
    finally:
        await plugin.stop()
    assert not plugin.dra_socket.exists()
    assert not plugin.reg_socket.exists()


async def test_an_old_process_stopping_late_keeps_its_replacements_sockets(
    node: SimNode, kubelet_dir: Path
) -> None:
    """A restart where the replacement starts before the old process has stopped (a rolling
    update, a slow shutdown): the old one's stop must not delete the new one's sockets, or
    kubelet loses the plugin until the next restart."""
    old = plugin_on(node, kubelet_dir)
    await old.start()
    new = plugin_on(node, kubelet_dir)
    try:
        await new.start()
        await old.stop()
        for socket in (new.dra_socket, new.reg_socket):
            assert stat.S_ISSOCK(socket.stat().st_mode), socket
        assert (await get_info(new.reg_socket)).name == DRIVER
    finally:
        await old.stop()
        await new.stop()
    assert not new.dra_socket.exists()
    assert not new.reg_socket.exists()


async def test_a_socket_someone_else_removed_is_no_error_at_stop(
    node: SimNode, kubelet_dir: Path
) -> None:
    plugin = plugin_on(node, kubelet_dir)
    await plugin.start()
    plugin.reg_socket.unlink()
    await plugin.stop()
    assert not plugin.dra_socket.exists()


async def test_a_socket_path_over_107_bytes_is_refused_and_nothing_keeps_running(
    node: SimNode, kubelet_dir: Path
) -> None:
    deep = kubelet_dir / ("k" * 90)
    plugin = plugin_on(node, deep)
    with pytest.raises(errors.ConfigError, match="over 107 bytes"):
        await plugin.start()
    assert plugin._servers == []
    leftovers = [
        p
        for d in (plugin.dra_socket.parent, plugin.reg_socket.parent)
        if d.exists()
        for p in d.iterdir()
        if p.name != "checkpoint.lock"
    ]
    assert leftovers == []


async def test_the_registration_socket_is_checked_too(node: SimNode, kubelet_dir: Path) -> None:
    """The DRA socket fits but the registration socket (named after the driver) does not: the
    DRA server that had started is stopped and its socket removed."""
    # dra: <dir>/plugins/<driver>/dra-<8>.sock, bound first as <dir>/plugins/<driver>/.cohdi/<8>/s;
    # registration: <dir>/plugins_registry/<driver>-<8>-reg.sock, longer than both.
    driver = "d" * (84 - len(str(kubelet_dir)) - len(".example.com")) + ".example.com"
    plugin = KubeletPlugin(
        node.kube,
        driver=driver,
        kubelet_dir=kubelet_dir,
        cdi_dir=node.root / "cdi",
        reporter=node.reporter,
    )
    assert len(str(plugin.dra_socket.parent / ".abcdefgh" / "s")) <= 107
    assert len(str(plugin.reg_socket)) > 107
    with pytest.raises(errors.ConfigError, match="over 107 bytes"):
        await plugin.start()
    assert plugin._servers == []
    assert not plugin.dra_socket.exists()
    assert not plugin.reg_socket.exists()
