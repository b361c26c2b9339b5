"""SIGTERM stops every long-running command when it is PID 1, as it is in the container image
(ENTRYPOINT cohdi-agent, no init): PID 1 gets no default action for SIGTERM, so a command that
does not handle it is never stopped by `docker stop` or the kubelet (killed only after the grace
period). Each command runs as PID 1 of its own PID namespace (`unshare --pid --fork`) and gets
SIGTERM from the host, the way a container runtime sends it.

`fabric-emulator` ignored SIGTERM as PID 1 before `agent.__main__` handled it for every command.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.simulated.sysfs import add_function
from tests.image.pid1 import Init, unavailable
from tests.waiting import until

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")

DEAD_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: u, user: {token: not-used}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
"""


def agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]


async def test_fabric_emulator_as_pid1_stops_on_sigterm_with_status_0(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    argv = agent("fabric-emulator", "--emulator-port", "0", "--emulator-tls-dir", str(tmp_path))
    with Init(argv, tmp_path / "emulator.log", env) as init:
        await until(
            lambda: _async("fabric emulator: http" in init.output()),
            what="the emulator's URL",
        )
        assert init.terminate() == 0, init.output()
    assert "Traceback" not in init.output()


@pytest.fixture
def kubelet_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kl-", dir="/tmp"))  # socket paths < 108 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_node_role_as_pid1_stops_on_sigterm_with_status_0(
    tmp_path: Path, kubelet_dir: Path
) -> None:
    """The node role on a synthetic tree (no API server needed to start it) serves its kubelet
    plugin as PID 1, then stops on SIGTERM: exit 0 and its sockets removed."""
    add_function(tmp_path / "sys", "0000:41:00.0")
    kubeconfig = tmp_path / "dead.kubeconfig"
    kubeconfig.write_text(DEAD_KUBECONFIG)
    registry = kubelet_dir / "plugins_registry"  # <driver>-<instance>-reg.sock, one per process
    argv = agent(
        "run",
        "--roles=node",
        f"--kubeconfig={kubeconfig}",
        "--node-name=n1",
        f"--node-sysfs-root={tmp_path / 'sys'}",
        f"--node-nvml-path={tmp_path / 'no-nvml.so'}",
        f"--node-kubelet-dir={kubelet_dir}",
        f"--node-cdi-dir={tmp_path / 'cdi'}",
        "--node-rescan=never",
    )
    with Init(argv, tmp_path / "node.log") as init:
        await until(
            lambda: _async(any(registry.glob("composable.cohdi.io-*-reg.sock"))),
            what="the plugin's registration socket",
        )
        assert init.terminate() == 0, init.output()
    assert not any(registry.glob("composable.cohdi.io-*-reg.sock")), "socket left behind"


async def _async(value: bool) -> bool:
    return value


@pytest.mark.controlplane
async def test_demo_as_pid1_stops_everything_on_sigterm(tmp_path: Path) -> None:
    """The demo as PID 1 (its own local control plane, emulator and node processes under it):
    SIGTERM mid-run takes its own stop path — every process it started stopped, exit 143."""
    state = Path(tempfile.mkdtemp(prefix="p1-", dir="/tmp"))  # plugin socket paths < 108 bytes
    argv = agent(
        "demo",
        "--pods=2",
        "--duration=30",
        "--nodes=1",
        "--gpus=2",
        f"--dev-state-dir={state / 'dev-cluster'}",
    )
    try:
        with Init(argv, tmp_path / "demo.log") as init:
            await until(
                lambda: _async("submitting" in init.output()), what="the workload", timeout=240
            )
            assert init.terminate(timeout=120) == 143, init.output()[-3000:]
        assert "SIGTERM: stopping every process" in init.output()
    finally:
        shutil.rmtree(state, ignore_errors=True)
