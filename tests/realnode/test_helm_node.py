"""The Helm chart on a real node: `helm install` of packaging/helm/cohdi-agent into the local
control plane with the session's real kubelet + containerd. The node role runs as the chart's
DaemonSet pod and the cluster role as its Deployment's two pods (leader election), both from the
agent's image (built here, imported into containerd), under the chart's two ServiceAccounts with
the tokens the kubelet mounts.

What the test bed adds, as a real cluster would have it:
- The pods reach the API server and the fabric emulator (both on loopback) through TLS bridges
  on the node's address (`agent.devcluster.bridge`; the bed runs no kube-proxy): the chart's
  `apiServer.host/port` points the agent at it, `fabric.url`/`fabric.ca` at the emulator's.
- The node role's simulated GPU server: its synthetic sysfs tree and stub NVML, mounted from the
  host (`node.extraVolumes`, `node.extraArgs`, `node.extraEnv`); a character device made for the
  test stands in for each GPU's /dev/nvidia<N> (as in test_cdi.py).

Then: the real kubelet registers the plugin served from the DaemonSet pod; a pod with a
ResourceClaim is scheduled through the binding conditions, the kubelet calls
NodePrepareResources on the pod's plugin, containerd injects the CDI device, the container sees
it and exits 0; deleting the pod unprepares and the GPU goes back to the pool; the audit log
shows the two ServiceAccounts' requests and no refusal. Then `helm upgrade` to a new image tag
while a pod holds a GPU: the DaemonSet surges a new pod before the old one stops, the kubelet
never drops the driver (no plugin count of 0, no UNAVAILABLE), and the claim is unprepared by the
new pod when its pod is deleted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import errors, settings
from agent.demo import objects
from agent.devcluster import helm, image, local
from agent.devcluster.bridge import TlsBridge, serving_context
from agent.devcluster.controlplane import ControlPlane
from agent.devcluster.realnode import TOLERATION, RealNode
from agent.fabric.emulator.server import EmulatorServer
from agent.fabric.emulator.state import Device
from agent.kube.client import Kube
from agent.model.fabric import DeviceState
from agent.simulated import stubnvml
from tests.packaging.test_helm_chart import CHART, run_helm
from tests.realnode.test_cdi import (
    A100,
    IMAGE,
    DevNodes,
    check_report,
    gpu_minor,
    import_devcheck,
    node_fabric,
)
from tests.waiting import until

pytestmark = [pytest.mark.controlplane, pytest.mark.all_kube_versions]

SLICES = "/apis/resource.k8s.io/v1/resourceslices"
#: the second tag the same image is imported under, for the upgrade
NEXT_TAG = "0.1.0-next"


@dataclass
class Install:
    node: RealNode
    kube: Kube
    cp: ControlPlane
    emulator: EmulatorServer
    helm: Path
    home: Path
    suffix: str
    image: image.Image
    values: Path
    node_dir: Path
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def release(self) -> str:
        return f"cohdi-agent-{self.suffix}"

    @property
    def ns(self) -> str:
        return f"gpu-{self.suffix}"

    @property
    def driver(self) -> str:
        return f"h{self.suffix}.cohdi.io"

    @property
    def fabric(self) -> str:
        return f"fab-{self.suffix}"

    def helm_run(self, *args: str) -> str:
        done = run_helm(
            self.helm,
            self.home,
            *args,
            "--kubeconfig",
            str(self.cp.kubeconfig),
            "--namespace",
            self.ns,
        )
        assert done.returncode == 0, f"helm {args[0]}: {done.stderr}"
        return done.stdout

    def path(self, plural: str, name: str = "", group: str = "") -> str:
        base = f"/apis/{group}" if group else "/api/v1"
        return f"{base}/namespaces/{self.ns}/{plural}" + (f"/{name}" if name else "")

    async def pods(self, component: str) -> list[dict[str, Any]]:
        selector = urllib.parse.quote(
            f"app.kubernetes.io/instance={self.release},app.kubernetes.io/component={component}"
        )
        items: list[dict[str, Any]] = (
            await self.kube.get(f"{self.path('pods')}?labelSelector={selector}")
        )["items"]
        return items


def _ready(pod: dict[str, Any]) -> bool:
    conds = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def _image_of(pod: dict[str, Any]) -> str:
    image_: str = pod["spec"]["containers"][0]["image"]
    return image_


@pytest.fixture
def dev_nodes() -> Iterator[DevNodes]:
    nodes = DevNodes()
    try:
        yield nodes
    finally:
        nodes.remove_all()


@pytest.fixture
async def install(
    control_plane: ControlPlane, real_node: RealNode, dev_nodes: DevNodes, tmp_path: Path
) -> AsyncIterator[Install]:
    """The image in containerd (two tags), the emulator and the two bridges, the simulated GPU
    server, and the chart installed with values for this bed; all removed afterwards."""
    t0 = time.monotonic()
    cache = settings.Settings().cache_dir
    binary = await asyncio.to_thread(helm.ensure_built, cache, progress=local.progress)
    img = await asyncio.to_thread(image.ensure_image, cache, local.progress)
    t_img = time.monotonic()
    await asyncio.to_thread(real_node.import_image, img.archive)
    repository, tag = img.reference.rsplit(":", 1)
    with contextlib.suppress(errors.DevClusterError):  # an earlier run's tag
        await asyncio.to_thread(real_node.ctr, "images", "rm", f"{repository}:{NEXT_TAG}")
    await asyncio.to_thread(
        real_node.ctr, "images", "tag", img.reference, f"{repository}:{NEXT_TAG}"
    )
    t_import = time.monotonic()

    suffix = uuid.uuid4().hex[:6]
    password = secrets.token_urlsafe(12)
    emulator, node_dir = node_fabric(real_node, dev_nodes, tmp_path, suffix, password)
    await emulator.start()
    assert emulator.ca_file is not None
    stub = await asyncio.to_thread(stubnvml.build, cache)

    # The pods' way to the API server and the emulator (see the module docstring): certificates
    # for the node's address signed by the cluster's CA, which the pods trust (kube-root-ca.crt).
    pki = control_plane.pki_dir
    bridges: list[TlsBridge] = []
    for stem, port, ca in (
        ("api", control_plane.apiserver_port, pki / "ca.crt"),
        ("fabric", emulator.port, emulator.ca_file),
    ):
        ctx, _ = serving_context(
            pki / "ca.crt", pki / "ca.key", tmp_path / "bridge", stem, real_node.node_ip
        )
        bridge = TlsBridge(real_node.node_ip, ctx, "127.0.0.1", port, ca)
        bridge.start()
        bridges.append(bridge)
    api, fabric = bridges

    # Both roles on the real node only: in a full session other tests' Nodes (no kubelet behind
    # them) carry the fabric label too, and pods placed there would stay Pending.
    on_real_node = {"kubernetes.io/hostname": real_node.name}
    values = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "driver": f"h{suffix}.cohdi.io",
        "idleGrace": 2,
        "apiServer": {"host": real_node.node_ip, "port": api.port},
        "fabric": {
            "backend": "redfish",
            "url": f"https://{fabric.address}",
            "user": "admin",
            "password": password,
            "ca": (pki / "ca.crt").read_text(),
        },
        # the bed's node may carry realnode.REAL_NODE_TAINT (the DaemonSet tolerates every taint)
        "cluster": {
            "extraArgs": ["--fabric-poll-interval=1"],
            "tolerations": [TOLERATION],
            "nodeSelector": on_real_node,
        },
        "node": {
            "nodeSelector": on_real_node,
            "kubeletDir": str(real_node.kubelet_root),
            "cdiDir": str(real_node.cdi),
            "nvmlPath": str(stub),
            "extraArgs": [f"--node-sysfs-root={node_dir / 'sys'}", "--node-rescan=never"],
            "extraEnv": [{"name": "STUB_NVML_GPUS", "value": str(node_dir / "nvml-gpus")}],
            # the simulated server's tree and the stub NVML, at the same paths as on the host
            "extraVolumes": [
                {"name": "sim", "hostPath": {"path": str(node_dir), "type": "Directory"}},
                {"name": "nvml", "hostPath": {"path": str(stub.parent), "type": "Directory"}},
            ],
            "extraVolumeMounts": [
                {"name": "sim", "mountPath": str(node_dir)},
                {"name": "nvml", "mountPath": str(stub.parent), "readOnly": True},
            ],
        },
    }
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    async with await Kube.connect(kubeconfig=str(control_plane.kubeconfig)) as kube:
        inst = Install(
            real_node,
            kube,
            control_plane,
            emulator,
            binary,
            tmp_path / "helm-home",
            suffix,
            img,
            values_file,
            node_dir,
        )
        inst.timings.update(image_s=t_img - t0, import_s=t_import - t_img)
        try:
            yield inst
        finally:
            with contextlib.suppress(AssertionError):
                await asyncio.to_thread(inst.helm_run, "uninstall", inst.release, "--wait")
            for pod in await _node_pod_logs(inst):
                print(pod)
            with contextlib.suppress(errors.AgentError):
                await kube.delete(f"/api/v1/namespaces/{inst.ns}")
            await _delete_slices(kube, inst.driver)
            for bridge in bridges:
                bridge.stop()
            await emulator.stop()
            with contextlib.suppress(errors.DevClusterError):
                await asyncio.to_thread(real_node.ctr, "images", "rm", f"{repository}:{NEXT_TAG}")


async def _node_pod_logs(inst: Install) -> list[str]:
    """The last lines of every pod of the release still there (for a failing run's output)."""
    out = []
    with contextlib.suppress(errors.AgentError):
        for pod in (await inst.kube.get(inst.path("pods")))["items"]:
            name = pod["metadata"]["name"]
            with contextlib.suppress(errors.AgentError):
                text = await asyncio.to_thread(inst.node.pod_log, inst.ns, name)
                out.append(f"--- {name} ---\n" + "\n".join(text.splitlines()[-10:]))
    return out


async def _delete_slices(kube: Kube, driver: str) -> None:
    with contextlib.suppress(errors.AgentError):
        for s in (await kube.get(SLICES))["items"]:
            if s["spec"]["driver"] == driver:
                with contextlib.suppress(errors.KubeNotFound):
                    await kube.delete(f"{SLICES}/{s['metadata']['name']}")


def _kubelet_lines(node: RealNode, since: int = 0) -> list[str]:
    return node.kubelet_log.read_text(errors="replace").splitlines()[since:]


def _decisions(text: str, kind: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict) and doc.get("decision") == kind:
                found.append(doc)
    return found


async def _wait_running(inst: Install, what: str) -> None:
    """Until the DaemonSet's pod and the Deployment's two pods are Ready, every one of them on
    the image `what` names (a tag) and no older pod left."""

    async def probe() -> list[str] | None:
        node, cluster = await inst.pods("node"), await inst.pods("cluster")
        pods = node + cluster
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        if len(node) != 1 or len(cluster) != 2 or len(live) != 3:
            return None
        if all(_ready(p) and _image_of(p).endswith(f":{what}") for p in pods):
            return [p["metadata"]["name"] for p in pods]
        return None

    last: dict[str, Any] = {}
    try:
        names = await until(probe, what=f"the release's pods Ready on :{what}", timeout=240)
    except AssertionError as exc:
        for c in ("node", "cluster"):
            last[c] = [
                (p["metadata"]["name"], _image_of(p), p.get("status")) for p in await inst.pods(c)
            ]
        logs = "\n".join(await _node_pod_logs(inst))
        tail = "\n".join(_kubelet_lines(inst.node)[-30:])
        raise AssertionError(
            f"{exc}\n{json.dumps(last)[:4000]}\n{logs}\n--- kubelet ---\n{tail}"
        ) from exc
    print(f"release pods Ready on :{what}: {names}")


async def _registered(inst: Install, since: int) -> str:
    async def probe() -> str | None:
        for line in _kubelet_lines(inst.node, since):
            if '"Registered DRA plugin"' in line and f'driverName="{inst.driver}"' in line:
                return line
        return None

    found: str = await until(probe, what="the kubelet registering the plugin", timeout=60)
    return found


async def _submit(inst: Install, name: str, args: list[str]) -> None:
    await inst.kube.create(
        inst.path("resourceclaims", group="resource.k8s.io/v1"),
        objects.gpu_claim(name, inst.driver, A100),
    )
    await inst.kube.create(
        inst.path("pods"),
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "nodeSelector": {"kubernetes.io/hostname": inst.node.name},
                "restartPolicy": "Never",
                "dnsPolicy": "Default",
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "terminationGracePeriodSeconds": 5,
                "tolerations": [TOLERATION],
                "containers": [
                    {
                        "name": "check",
                        "image": IMAGE,
                        "imagePullPolicy": "Never",
                        "args": args,
                        "resources": {"claims": [{"name": "gpu"}]},
                    }
                ],
                "resourceClaims": [{"name": "gpu", "resourceClaimName": name}],
            },
        },
    )


async def _pod_in(
    inst: Install, name: str, phases: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Until the pod is in one of `phases`: (pod, the claim as last seen allocated)."""
    seen: dict[str, Any] = {}
    claim_path = inst.path("resourceclaims", name, group="resource.k8s.io/v1")

    async def probe() -> dict[str, Any] | None:
        claim = await inst.kube.get(claim_path)
        if (claim.get("status") or {}).get("allocation"):
            seen["claim"] = claim
        pod = seen["pod"] = await inst.kube.get(inst.path("pods", name))
        return pod if pod.get("status", {}).get("phase") in phases else None

    try:
        pod: dict[str, Any] = await until(probe, what=f"pod {name} in {phases}", timeout=180)
    except AssertionError as exc:
        logs = "\n".join(await _node_pod_logs(inst))
        raise AssertionError(
            f"{exc}\npod: {json.dumps(seen.get('pod', {}).get('status'))}\n"
            f"claim: {json.dumps(seen.get('claim', {}).get('status'))}\n{logs}\n--- kubelet ---\n"
            + "\n".join(_kubelet_lines(inst.node)[-30:])
        ) from exc
    return pod, seen["claim"]


def _attached(inst: Install, claim: dict[str, Any]) -> Device:
    """The claim went through the binding conditions; the emulator's GPU it got."""
    (result,) = claim["status"]["allocation"]["devices"]["results"]
    assert result["bindingConditions"] == ["FabricDeviceReady"]
    (dev_status,) = claim["status"]["devices"]
    assert any(
        c["type"] == "FabricDeviceReady" and c["status"] == "True" for c in dev_status["conditions"]
    )
    (gpu,) = [d for d in inst.emulator.state.devices.values() if d.state == DeviceState.ATTACHED]
    return gpu


async def _node_pod_log(inst: Install, pod: str) -> str:
    return await asyncio.to_thread(inst.node.pod_log, inst.ns, pod)


async def _unprepared_by(inst: Install, pod: str, claim_uid: str, name: str) -> None:
    """Until the node pod `pod` logged the claim unprepared and its CDI spec is gone."""

    async def probe() -> bool:
        text = await _node_pod_log(inst, pod)
        done = [d for d in _decisions(text, "unprepared") if str(d.get("claim", "")).endswith(name)]
        return bool(done) and not list(inst.node.cdi.glob(f"*{claim_uid}*"))

    await until(probe, what=f"{pod} unpreparing the claim", timeout=60, interval=0.5)


async def _back_in_pool(inst: Install, name: str) -> None:
    claim_path = inst.path("resourceclaims", name, group="resource.k8s.io/v1")

    async def deallocated() -> bool:
        return not ((await inst.kube.get(claim_path)).get("status") or {}).get("allocation")

    await until(deallocated, what="the claim deallocated", timeout=60)
    await inst.kube.delete(claim_path)

    async def offered_free() -> bool:
        if any(d.state != DeviceState.FREE for d in inst.emulator.state.devices.values()):
            return False
        offered = [
            d
            for s in (await inst.kube.get(SLICES))["items"]
            if s["spec"]["driver"] == inst.driver and s["spec"]["pool"]["name"] == inst.fabric
            for d in s["spec"].get("devices") or []
        ]
        return len(offered) == 2

    await until(offered_free, what="the GPU detached and offered free again", timeout=90)


def _audit(cp: ControlPlane, accounts: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Per ServiceAccount: requests, refusals (authorization `forbid` or HTTP 403)."""
    out = {a: {"requests": 0, "forbidden": 0} for a in accounts}
    for line in cp.audit_log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            ev = json.loads(line)
            user = ev.get("user", {}).get("username", "")
            if user not in out:
                continue
            out[user]["requests"] += 1
            decision = (ev.get("annotations") or {}).get("authorization.k8s.io/decision")
            if decision == "forbid" or (ev.get("responseStatus") or {}).get("code") == 403:
                out[user]["forbidden"] += 1
                print("refused:", line[:400])
    return out


async def test_helm_install_on_a_real_node_runs_the_flow_and_upgrades_seamlessly(
    install: Install,
) -> None:
    inst, node = install, install.node
    accounts = (
        f"system:serviceaccount:{inst.ns}:{inst.release}-cluster",
        f"system:serviceaccount:{inst.ns}:{inst.release}-node",
    )
    since = len(_kubelet_lines(node))
    await import_devcheck(node)

    # --- install: the image's pods run, the kubelet registers the plugin --------------------
    t0 = time.monotonic()
    await asyncio.to_thread(
        inst.helm_run,
        "install",
        inst.release,
        str(CHART),
        "--create-namespace",
        "-f",
        str(inst.values),
    )
    await _wait_running(inst, inst.image.reference.rsplit(":", 1)[1])
    reg = await _registered(inst, since)
    install_s = time.monotonic() - t0
    (node_pod,) = await inst.pods("node")
    assert node_pod["spec"]["nodeName"] == node.name
    # they run the imported image; the probes (/healthz, /readyz on the metrics port) pass:
    # Ready above, never restarted
    image_ids = set()
    for pod in [node_pod, *await inst.pods("cluster")]:
        (status,) = pod["status"]["containerStatuses"]
        assert status["image"] == inst.image.reference, status
        assert status["restartCount"] == 0, pod["status"]
        image_ids.add(status["imageID"])
    assert node_pod["spec"]["serviceAccountName"] == f"{inst.release}-node"
    print("kubelet:", reg[:220])
    lease = await inst.kube.get(inst.path("leases", inst.release, group="coordination.k8s.io/v1"))
    cluster_pods = {p["metadata"]["name"] for p in await inst.pods("cluster")}
    assert lease["spec"]["holderIdentity"] in cluster_pods

    # --- a pod with a claim: prepared by the DaemonSet pod's plugin, CDI injected, exit 0 ------
    name = f"gpu-{inst.suffix}"
    t1 = time.monotonic()
    await _submit(inst, name, [])
    pod, claim = await _pod_in(inst, name, ("Succeeded", "Failed"))
    done_s = time.monotonic() - t1
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    report = term.get("message", "")
    assert term["exitCode"] == 0, report
    gpu = _attached(inst, claim)
    check_report(report, gpu)
    dev_node = Path("/dev") / f"nvidia{gpu_minor(gpu.pci_address)}"
    uid = claim["metadata"]["uid"]
    calls = [ln for ln in _kubelet_lines(node, since) if "calling node" in ln.lower() and uid in ln]
    assert any(
        "Done calling NodePrepareResources rpc" in ln
        and f'cdi_device_ids:\\"{inst.driver}/gpu={uid}-' in ln
        and "err=null" in ln
        for ln in calls
    ), calls
    plugin_log = await _node_pod_log(inst, node_pod["metadata"]["name"])
    assert [d for d in _decisions(plugin_log, "prepared") if d["claim"].endswith(name)]
    await _unprepared_by(inst, node_pod["metadata"]["name"], uid, name)
    t2 = time.monotonic()
    await inst.kube.request("DELETE", inst.path("pods", name), body={"gracePeriodSeconds": 0})
    await _back_in_pool(inst, name)
    back_s = time.monotonic() - t2
    assert not dev_node.exists()  # the stand-in went with the GPU

    # --- RBAC: the flow ran under the chart's two ServiceAccounts, nothing refused -------------
    audit = _audit(inst.cp, accounts)
    print(f"audit log: {audit}")
    assert all(a["requests"] > 0 for a in audit.values()), audit
    assert all(a["forbidden"] == 0 for a in audit.values()), audit

    # --- helm upgrade to a new image tag while a pod holds a GPU ------------------------------
    held = f"held-{inst.suffix}"
    await _submit(inst, held, ["--wait"])
    _, held_claim = await _pod_in(inst, held, ("Running",))
    held_uid = held_claim["metadata"]["uid"]
    assert list(node.cdi.glob(f"*{held_uid}*"))
    mark = len(_kubelet_lines(node))
    t3 = time.monotonic()
    await asyncio.to_thread(
        inst.helm_run,
        "upgrade",
        inst.release,
        str(CHART),
        "--reuse-values",
        "--set",
        f"image.tag={NEXT_TAG}",
    )
    await _wait_running(inst, NEXT_TAG)
    upgrade_s = time.monotonic() - t3
    (new_pod,) = await inst.pods("node")
    assert new_pod["metadata"]["name"] != node_pod["metadata"]["name"]
    for pod in [new_pod, *await inst.pods("cluster")]:
        # (the status names the image by either tag: containerd has one image under both)
        assert _image_of(pod).endswith(f":{NEXT_TAG}"), pod["spec"]
        image_ids.add(pod["status"]["containerStatuses"][0]["imageID"])
    assert len(image_ids) == 1, image_ids  # the same archive under its second tag
    # kubelet's plugins for the driver after each registration change: the surge pod's joins
    # (2), the old pod's leaves (1, once its watcher sees the socket go); never none

    async def changes() -> list[tuple[str, int]] | None:
        counts = [
            (event, int(m.group(1)))
            for ln in _kubelet_lines(node, mark)
            if f'driverName="{inst.driver}"' in ln
            for event in ("Registered", "Unregistered")
            if f'"{event} DRA plugin"' in ln
            for m in [re.search(r"numPlugins=(\d+)", ln)]
            if m
        ]
        dropped = any(n == 0 for _, n in counts)  # the one-name layout's failure: say so below
        return counts if counts and (counts[-1][0] == "Unregistered" or dropped) else None

    counts = await until(changes, what="kubelet dropping the old pod's plugin", timeout=60)
    during = _kubelet_lines(node, mark)
    assert not [ln for ln in during if "UNAVAILABLE" in ln], "a DRA call found no plugin"
    print(f"kubelet's plugins for the driver during the upgrade: {counts}")
    assert ("Registered", 2) in counts, counts  # both pods registered at once
    assert counts[-1] == ("Unregistered", 1), counts  # the old one left, the new one stays
    assert all(n >= 1 for _, n in counts), counts
    assert list(node.cdi.glob(f"*{held_uid}*")), "the held claim's CDI spec went"

    # the pod holding the GPU ends later: the new pod's plugin unprepares its claim normally
    t4 = time.monotonic()
    await inst.kube.delete(inst.path("pods", held))
    await _unprepared_by(inst, new_pod["metadata"]["name"], held_uid, held)
    assert any(
        "Done calling NodeUnprepareResources rpc" in ln and "err=null" in ln
        for ln in _kubelet_lines(node, mark)
        if held_uid in ln
    )
    await _back_in_pool(inst, held)
    unprep_s = time.monotonic() - t4
    audit = _audit(inst.cp, accounts)
    assert all(a["forbidden"] == 0 for a in audit.values()), audit
    print(
        f"helm on the real node: image {inst.timings['image_s']:.1f} s, import "
        f"{inst.timings['import_s']:.1f} s; install -> pods Ready and plugin registered "
        f"{install_s:.1f} s; GPU pod done (exit 0, CDI device seen) {done_s:.1f} s; GPU back "
        f"in the pool {back_s:.1f} s after deletion; upgrade rolled {upgrade_s:.1f} s; held "
        f"claim unprepared and back {unprep_s:.1f} s; audit {audit}"
    )
