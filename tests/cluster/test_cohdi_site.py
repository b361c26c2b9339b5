"""A CoHDI site switching to cohdi-agent: CoHDI's ConfigMap and Secret exactly as CoHDI's chart
writes them, Nodes that carry `spec.providerID: fsas-cdi://<machine uuid>` and are named unlike
their machines, the emulator serving the FTI fabric manager and cluster manager — and
`cohdi-agent run` given only `--cohdi-config-namespace` (plus what this test bed needs: the
kubeconfig, a Lease of its own and a driver name of its own, so tests on the shared control
plane do not see each other), with CoHDI's deployment variables (CDI_ENDPOINT, TENANT_ID,
CLUSTER_ID, USE_CM) in its environment as CoHDI's Deployment sets them. Then the fabric manager's
password is rotated and CoHDI's Secret with it: the same process logs in anew and the next pod
gets its GPU."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.controllers.publishing import SLICES
from agent.demo import objects
from agent.devcluster.controlplane import ControlPlane
from agent.fabric.emulator import config as emuconfig
from agent.fabric.emulator.cm_api import ClusterManagerConfig, NodeGroup, ResSpec
from agent.fabric.emulator.server import EmulatorServer
from agent.kube.client import Kube
from agent.kube.resources import RESOURCES
from agent.manifests import installing
from agent.model.scaling import MAX_LABEL, MIN_LABEL
from agent.testing.nodereport import NodeDouble
from tests.cluster.conftest import CLAIMS, NODES, PODS, finish, make_node
from tests.waiting import until

pytestmark = [pytest.mark.controlplane]

#: CoHDI's chart values (CoHDI/values.yaml of the chart), the device-info block verbatim.
DEVICE_INFO = """\
- index: 1
  cdi-model-name: "a100"
  dra-attributes:
    productName: "NVIDIA A100 80GB PCIe"
  driver-name: "gpu.nvidia.com"
  k8s-device-name: "nvidia-a100-80"
  cannot-coexist-with: [2,3]
- index: 2
  cdi-model-name: "L40S"
  dra-attributes:
    productName: "NVIDIA L40S"
  driver-name: "gpu.nvidia.com"
  k8s-device-name: "nvidia-l40s"
  cannot-coexist-with: [1,3]
- index: 3
  cdi-model-name: "a30"
  dra-attributes:
    productName: "NVIDIA A30"
  driver-name: "gpu.nvidia.com"
  k8s-device-name: "nvidia-a30"
  cannot-coexist-with: [1,2]
"""
TENANT = "060ea5a5-46e4-42b4-8d95-70578718d8d0"  # the chart's example tenant (= its realm)
USER, PASSWORD, CLIENT_SECRET = "cdi-admin", "CDI@dm1n-test", "Zmet0q6Xjno0xzaAr76IH2IYr7DfScZj"


@dataclass
class Site:
    kube: Kube
    emulator: EmulatorServer
    namespace: str
    driver: str
    suffix: str
    nodes: dict[str, str]  # node name -> machine uuid
    cluster: str


async def chart_objects(kube: Kube, namespace: str, ca_pem: str) -> None:
    """The namespace, ConfigMap and Secret as CoHDI's chart renders them (templates
    cdi_dra/templates/configmap.yaml and secret.yaml: `data` with the YAML block, `stringData`)."""
    await kube.create(
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
    )
    await kube.create(
        f"/api/v1/namespaces/{namespace}/configmaps",
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "composable-dra-dds", "namespace": namespace},
            "data": {
                "label-prefix": "cohdi.io",
                "fabric-id-range": "[0]",
                "device-info": DEVICE_INFO,
            },
        },
    )
    await kube.create(
        f"/api/v1/namespaces/{namespace}/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": "composable-dra-secret", "namespace": namespace},
            "stringData": {
                "username": USER,
                "password": PASSWORD,
                "realm": TENANT,
                "client_id": "cdi",
                "client_secret": CLIENT_SECRET,
                "certificate": ca_pem,
            },
        },
    )


@pytest.fixture
async def site(control_plane: ControlPlane, kube: Kube, tmp_path: Path) -> AsyncIterator[Site]:
    suffix = uuid.uuid4().hex[:6]
    namespace = f"composable-dra-{suffix}"
    driver = f"c{suffix}.cohdi.io"
    machines = [str(uuid.uuid4()) for _ in range(3)]
    nodes = {f"worker-{suffix}-{i}": m for i, m in enumerate(machines)}
    cluster = str(uuid.uuid4())
    conf = emuconfig.parse(
        {
            "tenant": TENANT,
            "realm": TENANT,
            "machines": [
                {"id": m, "name": f"cdimgr-host-{i}", "fabric": f"fab-{suffix}"}
                for i, m in enumerate(machines)
            ],
            "devices": [{"model": "a100", "count": 6, "fabric": f"fab-{suffix}"}],
            "users": [{"name": USER, "password": PASSWORD}],
        }
    )
    cm = ClusterManagerConfig(
        cluster=cluster,
        groups=[NodeGroup(str(uuid.uuid4()), "gpu", tuple(machines), (ResSpec("a100", 0, 2),))],
    )
    emulator = EmulatorServer(conf, tls_dir=tmp_path / "tls", cluster_manager=cm)
    await emulator.start()
    assert emulator.ca_file is not None
    await installing.install(kube, driver)
    for name, machine in nodes.items():
        await make_node(kube, name, {"test-world": suffix})
        await kube.patch(f"{NODES}/{name}", {"spec": {"providerID": f"fsas-cdi://{machine}"}})
    await chart_objects(kube, namespace, emulator.ca_file.read_text())
    s = Site(kube, emulator, namespace, driver, suffix, nodes, cluster)
    double = asyncio.create_task(NodeDouble(kube, set(nodes)).run())
    try:
        yield s
    finally:
        double.cancel()
        await asyncio.gather(double, return_exceptions=True)
        await emulator.stop()
        with contextlib.suppress(Exception):
            for obj in (await kube.get(RESOURCES))["items"]:
                if obj["spec"].get("target_node") in nodes:
                    name = obj["metadata"]["name"]
                    await kube.patch(f"{RESOURCES}/{name}", {"metadata": {"finalizers": None}})
                    await kube.delete(f"{RESOURCES}/{name}")
        for name in nodes:
            with contextlib.suppress(Exception):
                await kube.delete(f"{NODES}/{name}")
        with contextlib.suppress(Exception):
            await kube.delete(f"/api/v1/namespaces/{namespace}")


def run_agent(s: Site, cp: ControlPlane, log: Path) -> subprocess.Popen[bytes]:
    args = [
        sys.executable,
        "-m",
        "agent",
        "run",
        "--cohdi-config-namespace",
        s.namespace,
        # the test bed's own: this control plane, a Lease and a driver of this test's own
        "--kubeconfig",
        str(cp.kubeconfig),
        "--lease-name",
        f"lease-{s.suffix}",
        "--driver",
        s.driver,
        "--log-format",
        "json",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COHDI_")}
    env |= {  # CoHDI's Deployment's variables (chart: cdi_dra/templates/deployment.yaml)
        "CDI_ENDPOINT": s.emulator.url,
        "TENANT_ID": TENANT,
        "CLUSTER_ID": s.cluster,
        "USE_CM": "true",
    }
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


async def test_cohdi_site_runs_on_cohdi_configuration_alone(
    site: Site, control_plane: ControlPlane, tmp_path: Path
) -> None:
    s = site
    log = tmp_path / "agent.log"
    proc = run_agent(s, control_plane, log)
    try:

        async def published() -> int | None:
            slices = (await s.kube.get(SLICES, fieldSelector=f"spec.driver={s.driver}"))["items"]
            n = sum(len(x["spec"].get("devices") or []) for x in slices)
            return n or None

        offered = await until(published, what="pool slices published", timeout=60)

        async def labelled() -> dict[str, dict[str, str]] | None:
            out = {}
            for name in s.nodes:
                labels = (await s.kube.get(f"{NODES}/{name}"))["metadata"].get("labels") or {}
                if "cohdi.io/fabric" not in labels or MAX_LABEL not in labels:
                    return None
                out[name] = labels
            return out

        labels = await until(labelled, what="nodes found by providerID and labelled", timeout=60)

        name = f"cohdi-{s.suffix}"
        await objects.submit(s.kube, name, s.driver, "a100", {"test-world": s.suffix})

        async def bound() -> str | None:
            pod = await s.kube.get(f"{PODS}/{name}")
            return pod["spec"].get("nodeName") or None

        node = await until(bound, what="the pod bound", timeout=90)
        machine = s.nodes[node]
        attached = [d for d in s.emulator.state.devices.values() if d.machine == machine]
        print(
            f"\nCoHDI site: {offered} pool devices published; nodes by providerID "
            f"{sorted(s.nodes)}; CM limits {MIN_LABEL}={labels[node].get(MIN_LABEL)} "
            f"{MAX_LABEL}={labels[node][MAX_LABEL]}; pod bound to {node} (machine {machine}); "
            f"attaches started {s.emulator.state.attach_started}"
        )
        assert offered == 6
        assert {labels[n][MAX_LABEL] for n in s.nodes} == {"2"}  # the cluster manager's a100 max
        assert {labels[n].get(MIN_LABEL) for n in s.nodes} == {"0"}
        assert len(attached) == 1
        assert attached[0].state.value == "attached"
        assert s.emulator.state.attach_started == 1
        claim = await s.kube.get(f"{CLAIMS}/{name}")
        conditions = [
            c["type"]
            for d in (claim.get("status") or {}).get("devices") or []
            for c in d.get("conditions") or []
            if c["status"] == "True"
        ]
        assert "FabricDeviceReady" in conditions
        await finish(s.kube, name)

        # the fabric manager's password is rotated, then CoHDI's Secret: the running agent
        # logs in with the new one (no restart) and the next pod gets its GPU
        s.emulator.creds.accounts[USER].password = "rotated-pass-2"
        s.emulator.creds.expire_all()
        await s.kube.patch(
            f"/api/v1/namespaces/{s.namespace}/secrets/composable-dra-secret",
            {"stringData": {"password": "rotated-pass-2"}},
        )

        async def logged_in_anew() -> bool:  # a token exists only after a good login
            return bool(s.emulator.creds.tokens)

        await until(logged_in_anew, what="a login with the rotated password", timeout=60)
        second = f"cohdi2-{s.suffix}"
        await objects.submit(s.kube, second, s.driver, "a100", {"test-world": s.suffix})

        async def second_bound() -> str | None:
            pod = await s.kube.get(f"{PODS}/{second}")
            return pod["spec"].get("nodeName") or None

        node2 = await until(second_bound, what="the second pod bound", timeout=90)
        print(f"after the Secret's password changed: second pod bound to {node2}")
        assert proc.poll() is None  # the same process
        assert "CoHDI configuration changed (credentials)" in log.read_text()
        await finish(s.kube, second)
    except BaseException:
        print(log.read_text()[-6000:])
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        if proc.returncode not in (0, -15):
            print(log.read_text()[-4000:])
