"""`cohdi-agent run` processes riding out what used to kill them, on the real control plane:

- the cluster role started while the fabric manager is unreachable stays up and not ready
  (`/readyz` 503 naming the fabric), logs the outage once, and becomes ready and publishes once
  the fabric answers (before: exit 1 within 3 s, its first inventory was read outside the retry);
- a 4 s API-server stall during slice writes (client timeout 2 s) is ridden out: the process stays
  up, `/readyz` shows the failing publication meanwhile, the slices converge afterwards (before:
  exit 1, a TimeoutError out of the publisher ended the role's TaskGroup and the process);
- with the cluster role unable to write (RBAC refuses it ResourceSlices and Node patches), the
  node role of the SAME process still serves its kubelet plugin: kubelet's own Go client prepares
  a claim through it (before: the publisher's error stopped both roles and removed the sockets).
  SIGTERM then stops the process cleanly: exit 0, Lease released, plugin sockets removed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import load_pem_x509_certificate

from agent import pki, settings
from agent.devcluster.controlplane import ControlPlane, certs_of, free_port
from agent.fabric.emulator.sysfs_hook import SysfsHook
from agent.manifests import rbac as access
from agent.model import pool as poolmodel
from agent.model.fabric import DeviceState
from agent.simulated import stubnvml
from tests import kubelet
from tests.cluster.conftest import CLAIMS, PASSWORD, World
from tests.cluster.test_scale_up import bound_pods, our_slices
from tests.conftest import kubeconfig_via
from tests.plugin_sockets import registration_socket, registration_sockets
from tests.tcpproxy import TcpProxy
from tests.waiting import until

pytestmark = pytest.mark.controlplane

LEASES = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases"


# --- helpers -------------------------------------------------------------------------------------


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--log-format", "json", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COHDI_FABRIC_PASSWORD": PASSWORD, **(env or {})},
        )


def cluster_args(world: World, fabric_url: str, metrics_port: int, lease: str) -> list[str]:
    assert world.emulator.ca_file is not None
    return [
        "--driver",
        world.driver,
        "--lease-name",
        lease,
        "--fabric-url",
        fabric_url,
        "--fabric-user",
        "admin",
        "--fabric-ca-bundle",
        str(world.emulator.ca_file),
        "--fabric-poll-interval",
        "0.5",
        "--metrics-port",
        str(metrics_port),
    ]


async def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then the exit status (SIGKILL after 15 s: a hang is a failure of its own)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.to_thread(proc.wait, 15)
    except subprocess.TimeoutExpired:
        proc.kill()
        await asyncio.to_thread(proc.wait)
        raise AssertionError("the agent did not stop within 15 s of SIGTERM") from None


async def http_get(port: int, path: str) -> tuple[int, str]:
    """(status, body), or (0, error) while nothing listens yet."""
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)) as r,
        ):
            return r.status, await r.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 0, repr(exc)


def log_messages(log: Path) -> list[str]:
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(str(json.loads(line).get("msg", "")))
        except ValueError:
            out.append(line)
    return out


async def published(world: World) -> dict[str, dict[str, Any]]:
    """Device name -> its entry, over our slices."""
    return {d["name"]: d for s in await our_slices(world) for d in s["spec"].get("devices") or []}


async def lease_holder(world: World, name: str) -> str | None:
    try:
        return (await world.kube.get(f"{LEASES}/{name}"))["spec"].get("holderIdentity") or ""
    except Exception:
        return None


# --- the fabric down at start --------------------------------------------------------------------


@pytest.mark.parametrize("world", [{"nodes": 2, "gpus": 4}], indirect=True)
async def test_started_with_the_fabric_down_it_waits_then_publishes(
    world: World, control_plane: ControlPlane, tmp_path: Path
) -> None:
    proxy = TcpProxy(int(world.emulator.url.rsplit(":", 1)[1]))
    await proxy.start()
    proxy.block()
    port = free_port()
    log = tmp_path / "agent.log"
    lease = f"lease-{world.suffix}"
    proc = spawn(
        [
            "--kubeconfig",
            str(control_plane.kubeconfig),
            *cluster_args(world, f"https://127.0.0.1:{proxy.port}", port, lease),
        ],
        log,
    )
    try:

        async def retried() -> bool:
            assert proc.poll() is None, f"the agent exited ({proc.returncode}) with the fabric down"
            return proxy.refused >= 10

        await until(retried, what="the agent retrying the fabric", timeout=60)
        await until(lambda: lease_holder(world, lease), what="the agent leading", timeout=30)
        status, body = await http_get(port, "/readyz")
        print(f"\nfabric down, {proxy.refused} connections refused; /readyz {status}:\n{body}")
        assert status == 503
        assert f"fabric manager at https://127.0.0.1:{proxy.port} unreachable" in body
        assert await http_get(port, "/healthz") == (200, "ok\n")
        assert await published(world) == {}
        down = [m for m in log_messages(log) if "unreachable" in m]
        assert len(down) == 1, f"one line per change of state, not per retry: {down}"

        proxy.unblock()
        up = time.monotonic()

        async def ready() -> bool:
            assert proc.poll() is None
            return (await http_get(port, "/readyz"))[0] == 200

        await until(ready, what="/readyz 200 once the fabric answers", timeout=60)
        ready_after = time.monotonic() - up
        devices = await until(lambda: _count(world, 4), what="the 4 devices published", timeout=60)
        print(
            f"fabric up: ready after {ready_after:.1f} s, {len(devices)} devices published; "
            f"log: {[m for m in log_messages(log) if 'fabric manager' in m]}"
        )
        assert any("reachable again" in m for m in log_messages(log))
    finally:
        rc = await stop(proc)
        await proxy.close()
    assert rc == 0
    assert await lease_holder(world, lease) == "", "SIGTERM released the Lease"


async def _count(world: World, n: int) -> dict[str, dict[str, Any]] | None:
    devices = await published(world)
    return devices if len(devices) == n else None


# --- the API server stalls during slice writes ---------------------------------------------------


@pytest.mark.parametrize("world", [{"nodes": 2, "gpus": 4}], indirect=True)
async def test_an_api_server_stall_during_slice_writes_is_ridden_out(
    world: World, control_plane: ControlPlane, tmp_path: Path
) -> None:
    proxy = TcpProxy(control_plane.apiserver_port)
    await proxy.start()
    kubeconfig = kubeconfig_via(control_plane, proxy.port, tmp_path / "via-proxy.kubeconfig")
    port = free_port()
    log = tmp_path / "agent.log"
    proc = spawn(
        [
            "--kubeconfig",
            str(kubeconfig),
            "--kube-request-timeout",
            "2",
            # the stall must not cost the Lease: that is another test's subject
            "--lease-duration",
            "40",
            "--lease-renew-deadline",
            "30",
            *cluster_args(world, world.emulator.url, port, f"lease-{world.suffix}"),
        ],
        log,
    )
    try:

        async def ready() -> bool:
            assert proc.poll() is None, f"the agent exited ({proc.returncode})"
            return (await http_get(port, "/readyz"))[0] == 200

        await until(ready, what="the agent ready", timeout=60)
        await until(lambda: _count(world, 4), what="the pool published", timeout=60)

        # Stall the API server, then change the fabric: the publisher's slice write hangs.
        node, machine = world.nodes[0], world.machine_of(world.nodes[0])
        device = next(
            d.spec.id for d in world.emulator.state.devices.values() if d.state == DeviceState.FREE
        )
        proxy.pause()
        stalled_at = time.monotonic()
        world.emulator.state.attach(device, machine)
        seen = ""
        while time.monotonic() - stalled_at < 4 or (
            not seen and time.monotonic() - stalled_at < 20
        ):
            assert proc.poll() is None, f"the agent exited ({proc.returncode}) during the stall"
            status, body = await http_get(port, "/readyz")
            if status == 503 and ("publishing failed" in body or "loop publisher" in body):
                seen = body
            await asyncio.sleep(0.2)
        proxy.resume()
        stall = time.monotonic() - stalled_at
        print(f"\nAPI server stalled {stall:.1f} s ({proxy.stalled} reads held); /readyz:\n{seen}")
        assert seen, "the failing slice write shows in /readyz during the stall"

        want = poolmodel.device_name(device)

        async def converged() -> bool:
            assert proc.poll() is None, f"the agent exited ({proc.returncode}) after the stall"
            entry = (await published(world)).get(want)
            return entry is not None and entry.get("nodeName") == node

        await until(converged, what=f"{want} published on {node}", timeout=60)
        await until(ready, what="/readyz 200 again", timeout=60)
        status, metrics = await http_get(port, "/metrics")
        restarts = [m for m in metrics.splitlines() if m.startswith("cohdi_loop_restarts_total")]
        print(f"converged after the stall; loop restarts: {restarts or 'none'}")
    finally:
        rc = await stop(proc)
        await proxy.close()
    assert rc == 0


# --- the cluster role cannot write; the node role in the same process serves kubelet ------------


def limited_kubeconfig(cp: ControlPlane, user: str, directory: Path) -> Path:
    """A kubeconfig for `user` (a client certificate from the cluster's CA), whom RBAC grants
    only what `limited_rules` says."""
    p = certs_of(cp.pki_dir)
    ca_key = serialization.load_pem_private_key(p.ca.key.read_bytes(), password=None)
    ca_cert = load_pem_x509_certificate(p.ca.cert.read_bytes())
    pair = pki.issue(directory, user, ca_key=ca_key, ca_cert=ca_cert, cn=user)  # type: ignore[arg-type]
    doc = yaml.safe_load(cp.kubeconfig.read_text())
    doc["users"][0]["user"] = {"client-certificate": str(pair.cert), "client-key": str(pair.key)}
    path = directory / f"{user}.kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    return path


def limited_rules(driver: str) -> list[dict[str, Any]]:
    """The agent's ClusterRole with every cluster-role write taken away except its Lease and
    Events: ResourceSlices, Node labels, claim status, ComposableResource objects are read-only.
    The node role keeps what it needs: read claims, report on ComposableResources' status."""
    lease = {
        "apiGroups": [access.LEASES],
        "resources": ["leases"],
        "verbs": ["get", "create", "update"],
    }
    grants = [*access.cluster_grants(driver), *access.node_grants()]
    read = ["get", "list", "watch"]
    rules: list[dict[str, Any]] = [lease]
    for rule in [g.rule() for g in grants]:
        resources = set(rule["resources"])
        if "leases" in resources or "events" in resources:
            rules.append(rule)
        elif rule.get("resourceNames"):
            continue  # resourceclaims/driver: writing claim status
        elif "composableresources/status" in resources:
            rules.append({**rule, "resources": ["composableresources/status"], "verbs": ["patch"]})
            rules.append({**rule, "verbs": read})
        elif "resourceclaims/status" not in resources:
            rules.append({**rule, "verbs": read})
    return rules


@pytest.mark.parametrize("world", [{"nodes": 1, "gpus": 2, "double": False}], indirect=True)
async def test_node_role_serves_kubelet_while_the_cluster_role_cannot_publish(
    world: World, control_plane: ControlPlane, tmp_path: Path
) -> None:
    binary = await asyncio.to_thread(kubelet.build)
    node = world.nodes[0]
    root = tmp_path / "nodes" / node
    (root / "sys" / "bus" / "pci" / "devices").mkdir(parents=True)
    (root / "nvml-gpus").touch()
    hook = SysfsHook(lambda m: root if m.name == node else None)
    world.emulator.state.on_appear.append(hook.appear)
    world.emulator.state.on_disappear.append(hook.disappear)
    stub = await asyncio.to_thread(stubnvml.build, settings.Settings().cache_dir)
    kubelet_dir = Path(tempfile.mkdtemp(prefix="kl-", dir="/tmp"))  # socket paths < 108 bytes
    plugin_dir = kubelet_dir / "plugins" / world.driver  # sockets: tests/plugin_sockets.py

    user = f"limited-{world.suffix}"
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": user},
        "rules": limited_rules(world.driver),
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": user},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": user},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    await world.kube.create(f"{rbac}/clusterroles", role)
    await world.kube.create(f"{rbac}/clusterrolebindings", binding)
    kubeconfig = limited_kubeconfig(control_plane, user, tmp_path)

    port = free_port()
    log = tmp_path / "agent.log"
    lease = f"lease-limited-{world.suffix}"
    proc = spawn(
        [
            "--kubeconfig",
            str(kubeconfig),
            "--roles",
            "node,cluster",
            *cluster_args(world, world.emulator.url, port, lease),
            "--node-name",
            node,
            "--node-sysfs-root",
            str(root / "sys"),
            "--node-nvml-path",
            str(stub),
            "--node-kubelet-dir",
            str(kubelet_dir),
            "--node-cdi-dir",
            str(tmp_path / "cdi"),
            "--node-rescan",
            "never",
        ],
        log,
        {"STUB_NVML_GPUS": str(root / "nvml-gpus")},
    )
    try:
        # The cluster role of that process leads its own Lease and fails to publish.
        async def refused() -> str | None:
            assert proc.poll() is None, f"the agent exited ({proc.returncode})"
            status, body = await http_get(port, "/readyz")
            return body if status == 503 and "forbidden" in body.lower() else None

        body = await until(refused, what="the refused publication in /readyz", timeout=60)
        print(f"\n/readyz of the node+cluster process:\n{body}")
        assert "[+]node ok" in body
        assert "[-]cluster: publishing failed" in body

        # A healthy cluster role (this test's, with the admin's rights) publishes and attaches.
        cluster_role = await world.start_role()
        await asyncio.wait_for(cluster_role.publisher.synced.wait(), 30)
        name = f"p{world.suffix}-0"
        await world.claim_and_pod(name)
        await until(lambda: bound_pods(world, [name]), what="the pod bound", timeout=90)
        claim = await world.kube.get(f"{CLAIMS}/{name}")
        uid = claim["metadata"]["uid"]

        assert proc.poll() is None
        done = await asyncio.to_thread(
            subprocess.run,
            [
                str(binary),
                "-registration",
                str(registration_socket(kubelet_dir, world.driver)),
                "-driver",
                world.driver,
                "-op",
                "prepare",
                "-namespace",
                claim["metadata"]["namespace"],
                "-name",
                name,
                "-uid",
                uid,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        entry = json.loads(done.stdout)["claims"][uid]
        print(f"kubelet's prepare through the node role of that process: {entry}")
        assert not entry.get("error")
        (dev,) = entry["devices"]
        assert dev["cdi_device_ids"][0].startswith(f"{world.driver}/gpu=")

        _, metrics = await http_get(port, "/metrics")
        assert 'cohdi_role_up{role="node"} 1.0' in metrics
        assert 'cohdi_role_up{role="cluster"} 1.0' in metrics
        assert proc.poll() is None
    finally:
        rc = await stop(proc)
        sockets_left = [
            *registration_sockets(kubelet_dir, world.driver),
            *plugin_dir.glob("dra*.sock"),
        ]
        shutil.rmtree(kubelet_dir, ignore_errors=True)
        for path in (f"{rbac}/clusterrolebindings/{user}", f"{rbac}/clusterroles/{user}"):
            try:
                await world.kube.delete(path)
            except Exception as exc:  # clean-up only: report, do not mask the test's outcome
                print(f"clean-up of {path}: {exc}")
    assert rc == 0
    assert sockets_left == [], "SIGTERM removed the plugin's sockets"
    assert await lease_holder(world, lease) == "", "SIGTERM released the Lease"
