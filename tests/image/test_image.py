"""The container image, built here with no registry (`agent.devcluster.image`), and run with
runc from its OCI archive — the file containerd imports:

- the archive is an OCI layout (oci-layout, index.json naming the image for containerd and for
  OCI tools, a manifest, a config with ENTRYPOINT cohdi-agent, user 65532, the OCI labels and the
  source key);
- unpacked and run by runc as PID 1: `cohdi-agent --help` works; the venv's Python loads the
  compiled PCI scan (and scans a synthetic tree with it), grpcio, pyudev (libudev), cffi and
  cryptography;
- SIGTERM from the host to PID 1 stops `fabric-emulator` (the image's default user, read-only
  root, a tmpfs home) and `run --roles node` (user 0, the plugin serving) with status 0.

The first build on a fresh machine takes minutes (apt, mmdebstrap, buildah), so these tests are
in the serial tier (marker `controlplane`, though they start no control plane). The image is
built (or taken from the cache) once per session and unpacked once per module.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import __version__, settings
from agent.devcluster import image
from agent.devcluster.local import progress
from agent.simulated.sysfs import add_function
from tests.image import oci
from tests.image.pid1 import unavailable

pytestmark = [
    pytest.mark.controlplane,
    pytest.mark.skipif(unavailable() is not None, reason=unavailable() or ""),
    pytest.mark.skipif(shutil.which("apt-get") is None, reason="no apt-get: a Debian machine"),
]

DEAD_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: u, user: {token: not-used}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
"""


@pytest.fixture(scope="module")
def built() -> image.Image:
    started = time.monotonic()
    out = image.ensure_image(settings.Settings().cache_dir, progress)
    print(f"image {out.reference} ({out.archive}) ready in {time.monotonic() - started:.1f} s")
    return out


@pytest.fixture(scope="module")
def unpacked(built: image.Image) -> Iterator[tuple[Path, dict[str, Any]]]:
    top = Path(tempfile.mkdtemp(prefix="cohdi-image-"))
    try:
        config = oci.unpack(built.archive, top / "rootfs")
        yield top / "rootfs", config
    finally:
        shutil.rmtree(top, ignore_errors=True)


def container(unpacked: tuple[Path, dict[str, Any]], tmp_path: Path, **kw: Any) -> oci.Container:
    rootfs, config = unpacked
    return oci.Container(rootfs=rootfs, config=config, bundle=tmp_path / "bundle", **kw)


def test_archive_is_an_oci_layout_named_for_containerd(built: image.Image) -> None:
    doc = oci.layout(built.archive)
    (entry,) = doc["index"]["manifests"]
    assert entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert entry["annotations"]["io.containerd.image.name"] == built.reference
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == built.reference
    assert built.reference == f"localhost/cohdi-agent:{__version__}"
    assert doc["manifest"]["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert doc["layers"], "no layers"
    config = doc["config"]["config"]
    assert config["Entrypoint"] == ["cohdi-agent"]
    assert config["User"] == "65532:65532"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.title"] == "cohdi-agent"
    assert labels["io.cohdi.source-key"] == built.key
    assert labels["org.opencontainers.image.base.name"].startswith(image.BASE_IMAGE)
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    size = sum(layer["size"] for layer in doc["layers"])
    print(f"layers: {len(doc['layers'])}, {size / 2**20:.0f} MiB compressed")


def test_help_runs_as_the_images_entrypoint(
    unpacked: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    log = tmp_path / "help.log"
    assert container(unpacked, tmp_path, args=["--help"]).run(log) == 0, log.read_text()
    assert "usage: cohdi-agent" in log.read_text()


def test_compiled_scan_grpc_udev_load_in_the_runtime(
    unpacked: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """The runtime stage has what the compiled extension and the wheels need at run time; the
    C scan reads a synthetic tree mounted into the container."""
    add_function(tmp_path / "sys", "0000:41:00.0")
    code = (
        "import agent.native._scan, grpc, cffi, cryptography, pyudev;"
        "from agent.native import scanning;"
        "pyudev.Context();"
        f"fns = scanning.scan_c({str(tmp_path / 'sys')!r});"
        "print('scanned', [str(f.address) for f in fns])"
    )
    log = tmp_path / "python.log"
    box = container(
        unpacked,
        tmp_path,
        entrypoint=["/opt/cohdi-agent/bin/python", "-c", code],
        binds=[str(tmp_path / "sys")],
    )
    assert box.run(log) == 0, log.read_text()
    assert "scanned ['0000:41:00.0']" in log.read_text(), log.read_text()


def test_fabric_emulator_as_pid1_stops_on_sigterm(
    unpacked: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """The image's default user (65532), read-only root, a tmpfs home (as the chart's emptyDir)."""
    box = container(
        unpacked,
        tmp_path,
        args=["fabric-emulator", "--emulator-port", "0"],
        tmpfs=["/var/lib/cohdi-agent"],
    )
    log = tmp_path / "emulator.log"
    box.start(log)
    try:
        oci.wait_for(lambda: "fabric emulator: http" in log.read_text(), "the emulator's URL", log)
        assert _is_pid1(box), "cohdi-agent is not PID 1 of the container"
        assert box.terminate() == 0, log.read_text()
    finally:
        box.delete()
    assert "Traceback" not in log.read_text(), log.read_text()


def test_node_role_as_pid1_stops_on_sigterm(
    unpacked: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """`run --roles node` as user 0 (the node role's DaemonSet runs it so), its plugin serving
    in a kubelet directory from the host; SIGTERM: exit 0, sockets removed."""
    add_function(tmp_path / "sys", "0000:41:00.0")
    (tmp_path / "kubeconfig").write_text(DEAD_KUBECONFIG)
    kubelet = Path(tempfile.mkdtemp(prefix="kl-", dir="/tmp"))  # socket paths < 108 bytes
    registry = kubelet / "plugins_registry"  # <driver>-<instance>-reg.sock, one per process

    def registered() -> bool:
        return any(registry.glob("composable.cohdi.io-*-reg.sock"))

    box = container(
        unpacked,
        tmp_path,
        user="0:0",
        args=[
            "run",
            "--roles=node",
            f"--kubeconfig={tmp_path / 'kubeconfig'}",
            "--node-name=n1",
            f"--node-sysfs-root={tmp_path / 'sys'}",
            f"--node-nvml-path={tmp_path / 'no-nvml.so'}",
            f"--node-kubelet-dir={kubelet}",
            f"--node-cdi-dir={tmp_path / 'cdi'}",
            "--node-rescan=never",
        ],
        binds=[str(tmp_path), str(kubelet)],
    )
    log = tmp_path / "node.log"
    box.start(log)
    try:
        oci.wait_for(registered, "the plugin's registration socket", log)
        assert _is_pid1(box)
        assert box.terminate() == 0, log.read_text()
        assert not registered(), "the node role left its socket behind"
    finally:
        box.delete()
        shutil.rmtree(kubelet, ignore_errors=True)


def _is_pid1(box: oci.Container) -> bool:
    from tests.image.pid1 import namespace_pid

    pid = box.init_pid()
    return pid != 0 and namespace_pid(pid) == 1


def test_cli_prints_the_cached_archive_and_reference(built: image.Image) -> None:
    """The same archive while the source is unchanged (another writer in the tree may have
    changed it since: then a new archive beside it)."""
    done = subprocess.run(
        [sys.executable, "-m", "agent", "dev-cluster", "image"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(":", 1) for line in done.stdout.splitlines() if ":" in line)
    archive = Path(lines["archive"].strip())
    assert archive.is_file()
    assert archive.parent == built.archive.parent
    assert lines["reference"].strip() == built.reference


def test_cluster_role_runs_as_65532_on_a_read_only_root_and_stops_on_sigterm(
    unpacked: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """The cluster role as the chart runs it: the image's user, read-only root, nothing
    writable (no home); an API server that does not answer keeps it retrying the Lease until
    SIGTERM, which stops it with status 0."""
    shared = Path(tempfile.mkdtemp(prefix="kc-", dir="/tmp"))  # pytest's tmp_path is root's 0700
    shared.chmod(0o755)
    (shared / "kubeconfig").write_text(DEAD_KUBECONFIG)
    (shared / "kubeconfig").chmod(0o644)
    box = container(
        unpacked,
        tmp_path,
        args=[
            "run",
            "--roles=cluster",
            f"--kubeconfig={shared / 'kubeconfig'}",
            "--fabric-url=https://127.0.0.1:9",
        ],
        binds=[str(shared)],
    )
    log = tmp_path / "cluster.log"
    box.start(log)
    try:
        oci.wait_for(lambda: "cannot acquire lease" in log.read_text(), "the Lease retries", log)
        assert _is_pid1(box)
        assert box.terminate() == 0, log.read_text()
    finally:
        box.delete()
        shutil.rmtree(shared, ignore_errors=True)
    assert "Traceback" not in log.read_text(), log.read_text()
