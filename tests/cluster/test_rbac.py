"""The split least-privilege RBAC (`agent.manifests.rbac`) on the real control plane, under real
ServiceAccount tokens from the TokenRequest API:

- the cluster role (its own process, the cluster ServiceAccount's token) and the node role (its
  own process, the node ServiceAccount's token bound to a pod on its node) run the scale-up flow
  (publish, attach, the node's NodeReady, kubelet's prepare and unprepare, scale-down with the
  node's NodeReleased, a ComposabilityRequest reconciled and deleted, the Lease released at
  SIGTERM) and the audit log shows 0 refusals;
- every (rule, verb) is taken away in turn and kube-apiserver's authorizer (SubjectAccessReview)
  shows which request of that flow it would refuse; a grant the flow does not reach is listed in
  `NOT_IN_THE_FLOW` with the code path that needs it;
- a node's token is refused writing another node's ComposableResource status (the admission
  policy), writing anything without a node in its token, and updating a Lease (RBAC);
- kube-apiserver refuses the cluster token a claim's status.devices entry of another driver;
- with --cohdi-config-namespace the cluster token reads CoHDI's two objects there, nothing else;
- vendor-driver mode runs under its token with no refusal.
The flow runs twice: with the objects of agent/manifests applied, and under the ServiceAccounts
the Helm chart installs.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent import errors, settings
from agent.demo import objects
from agent.devcluster import helm
from agent.devcluster.controlplane import ControlPlane, free_port
from agent.fabric.emulator.sysfs_hook import SysfsHook
from agent.kube.client import Kube
from agent.kube.resources import REQUESTS, RESOURCES
from agent.manifests import installing, rbac
from agent.model import cohdi
from agent.simulated import stubnvml
from tests import kubelet
from tests.cluster import access
from tests.cluster.conftest import A100, CLAIMS, NS, World
from tests.cluster.test_resilience import cluster_args, http_get, spawn, stop
from tests.cluster.test_scale_up import bound_pods
from tests.packaging.test_helm_chart import CHART, run_helm
from tests.plugin_sockets import registration_socket
from tests.waiting import until

pytestmark = pytest.mark.controlplane

#: Grants (resource, verb) the scale-up flow does not reach, and the code that needs them.
NOT_IN_THE_FLOW = {
    ("composableresources", "get"): "requesting: a member's create met AlreadyExists",
    ("resourceclaims", "get"): "scaling/vendoring: the claim read again after a conflict",
    ("events", "patch"): "eventing: the same Event again bumps its count",
}


def _user(namespace: str, account: str) -> str:
    return f"system:serviceaccount:{namespace}:{account}"


def _matches(grant: rbac.Grant, verb: str, call: access.Call) -> bool:
    resource = f"{call.resource}/{call.subresource}" if call.subresource else call.resource
    return call.verb == verb and call.group == grant.group and resource in grant.resources


def _sentinel(grant: rbac.Grant, namespace: str) -> access.Call:
    """A request the grant allows (to see that RBAC has the probe's role)."""
    resource, _, sub = grant.resources[0].partition("/")
    return access.Call(
        "",
        grant.verbs[0],
        grant.group,
        resource,
        sub,
        namespace,
        grant.names[:1][0] if grant.names else "",
        0,
    )


async def _probe_denials(
    kube: Kube,
    suffix: str,
    roles: dict[str, tuple[str, list[rbac.Grant], str]],
    calls: dict[str, list[access.Call]],
) -> tuple[dict[tuple[str, str, str], list[str]], list[dict[str, Any]]]:
    """For every (role, grant, verb): a user with that role less that verb; which of the role's
    calls the API server's authorizer then refuses. Returns ({(role, resource, verb): [refused
    call]}, [the probe objects made])."""
    made: list[dict[str, Any]] = []
    probes: list[tuple[tuple[str, str, str], str, list[access.Call], access.Call]] = []
    for role, (user, grants, kind) in roles.items():
        ns = "" if kind == "ClusterRole" else grants_namespace(calls[user])
        for i, grant in enumerate(grants):
            for verb in grant.verbs:
                probe = f"probe-{suffix}-{len(probes)}"
                less = list(grants)
                rest = tuple(v for v in grant.verbs if v != verb)
                if rest:
                    less[i] = replace(grant, verbs=rest)
                else:
                    del less[i]
                meta: dict[str, Any] = {"name": probe, **({"namespace": ns} if ns else {})}
                made += [
                    {
                        "apiVersion": rbac.RBAC_API,
                        "kind": kind,
                        "metadata": meta,
                        "rules": [g.rule() for g in less],
                    },
                    {
                        "apiVersion": rbac.RBAC_API,
                        "kind": f"{kind}Binding",
                        "metadata": meta,
                        "roleRef": {"apiGroup": rbac.RBAC_GROUP, "kind": kind, "name": probe},
                        "subjects": [{"apiGroup": rbac.RBAC_GROUP, "kind": "User", "name": probe}],
                    },
                ]
                affected = [c for c in calls[user] if _matches(grant, verb, c)]
                key = (role, ",".join(grant.resources), verb)
                probes.append((key, probe, affected, _sentinel(less[0], ns)))
    await access.apply_all(kube, made)

    async def synced() -> bool:
        for _key, probe, _affected, sentinel in probes:
            if not await access.allowed(kube, probe, sentinel):
                return False
        return True

    await until(synced, what="RBAC has every probe role", timeout=30)
    out: dict[tuple[str, str, str], list[str]] = {}
    for key, probe, affected, _sentinel_call in probes:
        out[key] = [c.what for c in affected if not await access.allowed(kube, probe, c)]
    return out, made


def grants_namespace(calls: list[access.Call]) -> str:
    (ns,) = {c.namespace for c in calls if c.resource == "leases"}
    return ns


def _distinct(calls: list[access.Call]) -> list[access.Call]:
    seen: dict[tuple[str, ...], access.Call] = {}
    for c in calls:
        seen.setdefault(
            (c.user, c.verb, c.group, c.resource, c.subresource, c.namespace, c.name), c
        )
    return list(seen.values())


async def _node_process(
    world: World, node: str, kubeconfig: Path, tmp_path: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    """The node role alone, on a synthetic sysfs fed by the emulator, with its token; (process,
    its kubelet directory)."""
    root = tmp_path / "nodes" / node
    (root / "sys" / "bus" / "pci" / "devices").mkdir(parents=True)
    (root / "nvml-gpus").touch()
    hook = SysfsHook(lambda m: root if m.name == node else None)
    world.emulator.state.on_appear.append(hook.appear)
    world.emulator.state.on_disappear.append(hook.disappear)
    stub = await asyncio.to_thread(stubnvml.build, settings.Settings().cache_dir)
    kubelet_dir = Path(tempfile.mkdtemp(prefix="kl-", dir="/tmp"))  # socket paths < 108 bytes
    proc = spawn(
        [
            "--kubeconfig",
            str(kubeconfig),
            "--roles",
            "node",
            "--driver",
            world.driver,
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
        tmp_path / "node.log",
        {"STUB_NVML_GPUS": str(root / "nvml-gpus")},
    )
    return proc, kubelet_dir


async def _kubelet(
    binary: Path, registration: Path, driver: str, op: str, claim: dict[str, Any]
) -> str:
    done = await asyncio.to_thread(
        subprocess.run,
        [
            str(binary),
            "-registration",
            str(registration),
            "-driver",
            driver,
            "-op",
            op,
            "-namespace",
            claim["metadata"]["namespace"],
            "-name",
            claim["metadata"]["name"],
            "-uid",
            claim["metadata"]["uid"],
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def _install_access(
    how: str, world: World, cp: ControlPlane, tmp_path: Path, ns: str, name: str, lease: str
) -> Callable[[], Awaitable[None]]:
    """The access control of `name` in `ns`, from agent/manifests ("manifests") or by `helm
    install` of the chart ("helm", which also creates its workloads: no pod runs here); returns
    what removes it."""
    kube = world.kube
    await access.ensure_namespace(kube, ns)
    if how == "manifests":
        docs = rbac.rbac(world.driver, ns, name=name, lease=lease)
        await access.apply_all(kube, docs)
        return lambda: access.delete_all(kube, docs)
    binary = await asyncio.to_thread(
        helm.ensure_built, settings.Settings().cache_dir, progress=print
    )
    # the world installed the DeviceClass; the chart makes the same one and owns it
    await kube.delete(f"{installing.CLASSES}/{world.device_class}")
    base = ["--kubeconfig", str(cp.kubeconfig), "--namespace", ns]
    sets = [
        f"fullnameOverride={name}",
        f"driver={world.driver}",
        f"leaderElection.leaseName={lease}",
    ]
    args = ["install", name, str(CHART), *base, *[a for s in sets for a in ("--set", s)]]
    done = await asyncio.to_thread(run_helm, binary, tmp_path / "helm", *args)
    assert done.returncode == 0, done.stderr

    async def uninstall() -> None:
        gone = await asyncio.to_thread(
            run_helm, binary, tmp_path / "helm", "uninstall", name, *base
        )
        if gone.returncode != 0:
            print(f"helm uninstall: {gone.stderr}")

    return uninstall


@pytest.mark.parametrize("install", ["manifests", "helm"])
@pytest.mark.parametrize(
    "world",
    [{"nodes": 1, "gpus": 2, "double": False, "idle_grace": 1.0, "settle": 1.0}],
    indirect=True,
)
async def test_split_roles_run_the_flow_with_no_denial_and_every_rule_is_needed(
    world: World, control_plane: ControlPlane, tmp_path: Path, install: str
) -> None:
    """`install`: the access control applied from agent/manifests, or installed by the chart
    (the chart's two ServiceAccounts run the flow)."""
    kube, suffix, node = world.kube, world.suffix, world.nodes[0]
    ns, name, lease = f"agent-{suffix}", f"ag{suffix}", f"lease-{suffix}"
    cluster_sa = rbac.service_account_name(name, "cluster")
    node_sa = rbac.service_account_name(name, "node")
    users = {_user(ns, cluster_sa), _user(ns, node_sa)}
    binary = await asyncio.to_thread(kubelet.build)
    remove = await _install_access(install, world, control_plane, tmp_path, ns, name, lease)
    made: list[dict[str, Any]] = []
    procs: list[subprocess.Popen[bytes]] = []
    kubelet_dir: Path | None = None
    try:
        pod = await access.pod_on(kube, ns, f"node-role-{suffix}", node_sa, node)
        node_cfg = access.token_kubeconfig(
            control_plane,
            await access.token(kube, ns, node_sa, pod=pod),
            tmp_path / "node.kubeconfig",
        )
        cluster_cfg = access.token_kubeconfig(
            control_plane, await access.token(kube, ns, cluster_sa), tmp_path / "cluster.kubeconfig"
        )
        node_proc, kubelet_dir = await _node_process(world, node, node_cfg, tmp_path)
        procs.append(node_proc)
        port = free_port()
        cluster_proc = spawn(
            [
                "--kubeconfig",
                str(cluster_cfg),
                "--roles",
                "cluster",
                *cluster_args(world, world.emulator.url, port, lease),
                "--lease-namespace",
                ns,
                "--idle-grace",
                "1",
                "--scale-down-settle",
                "1",
            ],
            tmp_path / "cluster.log",
        )
        procs.append(cluster_proc)

        async def ready() -> bool:
            assert cluster_proc.poll() is None, (tmp_path / "cluster.log").read_text()[-3000:]
            return (await http_get(port, "/readyz"))[0] == 200

        await until(ready, what="the cluster role ready under its token", timeout=60)

        claim_name = f"p{suffix}-0"
        await world.claim_and_pod(claim_name)
        await until(lambda: bound_pods(world, [claim_name]), what="the pod bound", timeout=90)
        claim = await kube.get(f"{CLAIMS}/{claim_name}")
        registration = registration_socket(kubelet_dir, world.driver)  # the process's own name
        prepared = await _kubelet(binary, registration, world.driver, "prepare", claim)
        assert f"{world.driver}/gpu=" in prepared, prepared
        await _kubelet(binary, registration, world.driver, "unprepare", claim)
        await objects.finish(kube, claim_name)

        async def detached() -> bool:
            items = (await kube.get(RESOURCES))["items"]
            return not [r for r in items if r["spec"].get("target_node") == node]

        await until(detached, what="the GPU scaled down and detached", timeout=120)

        # A ComposabilityRequest (CoHDI's way): one member attached and reported, then removed.
        request = f"req-{suffix}"
        await kube.create(
            REQUESTS,
            {
                "apiVersion": f"{rbac.crds.GROUP}/{rbac.crds.VERSION}",
                "kind": "ComposabilityRequest",
                "metadata": {"name": request},
                "spec": {
                    "resource": {"type": "gpu", "model": A100, "size": 1, "target_node": node}
                },
            },
        )

        async def running() -> bool:
            req = await kube.get(f"{REQUESTS}/{request}")
            return (req.get("status") or {}).get("state") == "Running"

        await until(running, what="the request Running", timeout=60)
        await kube.delete(f"{REQUESTS}/{request}")

        async def request_gone() -> bool:
            try:
                await kube.get(f"{REQUESTS}/{request}")
            except errors.KubeNotFound:
                return await detached()
            return False

        await until(request_gone, what="the request and its member gone", timeout=120)
        codes = [await stop(p) for p in procs]
        assert codes == [0, 0], codes

        calls = access.audited(control_plane, users)
        denied = [f"{c.user}: {c.what} -> {c.code}" for c in calls if c.code in (401, 403)]
        summary = sorted({f"{c.user.rsplit(':', 1)[1]}: {c.what}" for c in _distinct(calls)})
        print(f"\n{len(calls)} requests by the two ServiceAccounts, {len(summary)} distinct:")
        print("\n".join(f"  {s}" for s in summary))
        assert denied == []

        # Every (rule, verb) taken away in turn: what of this flow breaks.
        cluster_user, node_user = _user(ns, cluster_sa), _user(ns, node_sa)
        distinct = {u: _distinct([c for c in calls if c.user == u]) for u in users}
        distinct[cluster_user] += [
            replace(
                c,
                verb="arbitrary-node:update",
                resource="resourceclaims",
                subresource="driver",
                name=world.driver,
            )
            for c in distinct[cluster_user]
            if (c.resource, c.subresource, c.verb) == ("resourceclaims", "status", "update")
        ]
        roles = {
            "cluster": (cluster_user, rbac.cluster_grants(world.driver), "ClusterRole"),
            "leader": (cluster_user, rbac.leader_grants(lease), "Role"),
            "node": (node_user, rbac.node_grants(), "ClusterRole"),
        }
        breaks, made = await _probe_denials(kube, suffix, roles, distinct)
        print("\nwithout   ->   refused in the flow")
        unexplained = []
        for (role, resource, verb), refused in breaks.items():
            why = NOT_IN_THE_FLOW.get((resource, verb)) if role == "cluster" else None
            shown = "; ".join(refused) if refused else f"(not in this flow: {why})"
            print(f"  {role}: {resource} {verb}   ->   {shown}")
            if not refused and why is None:
                unexplained.append((role, resource, verb))
        assert unexplained == [], "granted, never used in the flow and no reason given"
        exercised = {
            (r, v) for (role, r, v), refused in breaks.items() if refused and role == "cluster"
        }
        assert exercised & set(NOT_IN_THE_FLOW) == set(), (
            "NOT_IN_THE_FLOW lists a grant the flow does use"
        )
    finally:
        for p in procs:
            if p.poll() is None:
                await stop(p)
        if kubelet_dir is not None:
            shutil.rmtree(kubelet_dir, ignore_errors=True)
        await access.delete_all(kube, made)
        await remove()


async def test_a_node_token_writes_only_its_own_node_and_no_lease(
    kube: Kube, control_plane: ControlPlane, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:6]
    ns, name, driver = f"agent-{suffix}", f"ag{suffix}", f"v{suffix}.cohdi.io"
    mine, other = f"own-{suffix}", f"other-{suffix}"
    await installing.install(kube, driver)
    docs = rbac.rbac(driver, ns, name=name, lease=f"lease-{suffix}")
    node_sa = rbac.service_account_name(name, "node")
    await access.ensure_namespace(kube, ns)
    await access.apply_all(kube, docs)
    crs: list[str] = []
    try:
        for target in (mine, other):
            cr = await kube.create(
                RESOURCES,
                {
                    "apiVersion": f"{rbac.crds.GROUP}/{rbac.crds.VERSION}",
                    "kind": "ComposableResource",
                    "metadata": {"name": f"gpu-{target}"},
                    "spec": {
                        "type": "gpu",
                        "model": "NVIDIA-A100-PCIE-40GB",
                        "target_node": target,
                    },
                },
            )
            crs.append(cr["metadata"]["name"])
        pod = await access.pod_on(kube, ns, f"node-role-{suffix}", node_sa, mine)
        async with (
            await Kube.connect(
                kubeconfig=str(
                    access.token_kubeconfig(
                        control_plane,
                        await access.token(kube, ns, node_sa, pod=pod),
                        tmp_path / "n.kubeconfig",
                    )
                )
            ) as node_kube,
            await Kube.connect(
                kubeconfig=str(
                    access.token_kubeconfig(
                        control_plane,
                        await access.token(kube, ns, node_sa),
                        tmp_path / "u.kubeconfig",
                    )
                )
            ) as unbound,
        ):
            status = {"status": {"pci_address": "0000:01:00.0"}}

            async def refused_other() -> str | None:
                try:
                    await node_kube.patch(f"{RESOURCES}/gpu-{other}/status", status)
                except errors.KubeForbidden as exc:
                    return str(exc) if "may not write ComposableResources" in str(exc) else None
                return None

            message = await until(
                refused_other, what="the policy refusing another node", timeout=30
            )
            print(f"\nanother node's status: {message}")
            written = await node_kube.patch(f"{RESOURCES}/gpu-{mine}/status", status)
            assert written["status"]["pci_address"] == "0000:01:00.0"  # its own node: allowed

            with pytest.raises(errors.KubeForbidden, match="no node in this token"):
                await unbound.patch(f"{RESOURCES}/gpu-{mine}/status", status)

            # An agent outside a pod (systemd): a token bound to its Node object names the node.
            await objects.make_node(kube, mine, {"test-world": suffix})
            node_obj = await kube.get(f"/api/v1/nodes/{mine}")
            bearer = await access.token(kube, ns, node_sa, pod=node_obj)
            cfg = access.token_kubeconfig(control_plane, bearer, tmp_path / "node-bound.kubeconfig")
            async with await Kube.connect(kubeconfig=str(cfg)) as node_bound:
                await node_bound.patch(f"{RESOURCES}/gpu-{mine}/status", status)
                with pytest.raises(errors.KubeForbidden, match="may not write ComposableResources"):
                    await node_bound.patch(f"{RESOURCES}/gpu-{other}/status", status)

            lease_path = f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
            await kube.create(
                lease_path,
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": f"lease-{suffix}"},
                },
            )
            with pytest.raises(errors.KubeForbidden) as lease_refused:
                await node_kube.patch(
                    f"{lease_path}/lease-{suffix}", {"spec": {"holderIdentity": "node"}}
                )
            print(f"a Lease: {lease_refused.value}")
            with pytest.raises(errors.KubeForbidden):
                await node_kube.replace(
                    "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/kube-scheduler",
                    {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": "kube-scheduler"},
                    },
                )
    finally:
        with contextlib.suppress(errors.KubeNotFound):
            await kube.delete(f"/api/v1/nodes/{mine}")
        for cr in crs:
            try:
                await kube.delete(f"{RESOURCES}/{cr}")
            except errors.AgentError as exc:
                print(f"clean-up of {cr}: {exc}")
        await access.delete_all(kube, docs)


async def test_cohdi_config_role_reads_only_cohdis_two_objects(
    kube: Kube, control_plane: ControlPlane, tmp_path: Path
) -> None:
    """--cohdi-config-namespace: the cluster role's token reads CoHDI's ConfigMap and Secret the
    way the agent does (get, and list/watch with a metadata.name field selector) and nothing
    else in that namespace."""
    suffix = uuid.uuid4().hex[:6]
    ns, cohdi_ns, name = f"agent-{suffix}", f"cohdi-{suffix}", f"ag{suffix}"
    docs = rbac.rbac(f"c{suffix}.cohdi.io", ns, name=name, cohdi_config_namespace=cohdi_ns)
    await access.ensure_namespace(kube, ns)
    await access.ensure_namespace(kube, cohdi_ns)
    await access.apply_all(kube, docs)
    try:
        for kind, obj in (
            ("configmaps", cohdi.CONFIGMAP),
            ("secrets", cohdi.SECRET),
            ("secrets", "other"),
        ):
            await kube.create(
                f"/api/v1/namespaces/{cohdi_ns}/{kind}",
                {
                    "apiVersion": "v1",
                    "kind": "Secret" if kind == "secrets" else "ConfigMap",
                    "metadata": {"name": obj},
                },
            )
        bearer = await access.token(kube, ns, rbac.service_account_name(name, "cluster"))
        cfg = access.token_kubeconfig(control_plane, bearer, tmp_path / "c.kubeconfig")
        async with await Kube.connect(kubeconfig=str(cfg)) as agent_kube:
            for kind, obj in (("configmaps", cohdi.CONFIGMAP), ("secrets", cohdi.SECRET)):
                base = f"/api/v1/namespaces/{cohdi_ns}/{kind}"

                async def readable(base: str = base, obj: str = obj) -> bool:
                    try:
                        await agent_kube.get(f"{base}/{obj}")
                    except errors.KubeForbidden:
                        return False  # RBAC has not seen the RoleBinding yet
                    return True

                await until(readable, what=f"{kind}/{obj} readable", timeout=30)
                listed = await agent_kube.get(base, fieldSelector=f"metadata.name={obj}")
                assert [i["metadata"]["name"] for i in listed["items"]] == [obj]
                await agent_kube.get(
                    base, fieldSelector=f"metadata.name={obj}", watch=1, timeoutSeconds=1
                )
                with pytest.raises(errors.KubeForbidden):
                    await agent_kube.get(base)  # every object of the kind
            with pytest.raises(errors.KubeForbidden):
                await agent_kube.get(f"/api/v1/namespaces/{cohdi_ns}/secrets/other")
            with pytest.raises(errors.KubeForbidden):
                await agent_kube.get(
                    f"/api/v1/namespaces/{ns}/secrets",
                    fieldSelector=f"metadata.name={cohdi.SECRET}",
                )
    finally:
        await access.delete_all(kube, docs)


async def test_claim_device_status_only_for_our_driver(
    kube: Kube, control_plane: ControlPlane, tmp_path: Path
) -> None:
    """kube-apiserver itself (not a review) enforces the name-limited `resourceclaims/driver`
    grant: the cluster role's token writes status.devices entries of its driver, and an entry of
    another driver in the same claim is refused."""
    suffix = uuid.uuid4().hex[:6]
    ns, name, driver, other = (
        f"agent-{suffix}",
        f"ag{suffix}",
        f"d{suffix}.cohdi.io",
        "gpu.other.example",
    )
    docs = rbac.rbac(driver, ns, name=name)
    await access.ensure_namespace(kube, ns)
    await access.apply_all(kube, docs)
    claims = f"/apis/resource.k8s.io/v1/namespaces/{ns}/resourceclaims"
    try:
        claim = await kube.create(
            claims, {**objects.gpu_claim("c", driver, A100), "metadata": {"name": "c"}}
        )
        results = [
            {"request": "gpu", "driver": d, "pool": "p", "device": f"g{i}"}
            for i, d in enumerate((driver, other))
        ]
        claim["status"] = {"allocation": {"devices": {"results": results}}}
        await kube.replace(f"{claims}/c/status", claim)  # the scheduler's part, as the admin
        bearer = await access.token(kube, ns, rbac.service_account_name(name, "cluster"))
        cfg = access.token_kubeconfig(control_plane, bearer, tmp_path / "c.kubeconfig")
        entry = {"pool": "p", "conditions": [], "data": None}
        async with await Kube.connect(kubeconfig=str(cfg)) as agent_kube:

            async def ours_written() -> bool:
                current = await agent_kube.get(f"{claims}/c")
                current["status"]["devices"] = [{**entry, "driver": driver, "device": "g0"}]
                try:
                    await agent_kube.replace(f"{claims}/c/status", current)
                except errors.KubeForbidden:
                    return False  # RBAC has not seen the binding yet
                return True

            await until(ours_written, what="our driver's entry written", timeout=30)
            current = await agent_kube.get(f"{claims}/c")
            current["status"]["devices"].append({**entry, "driver": other, "device": "g1"})
            with pytest.raises(errors.KubeError) as refused:
                await agent_kube.replace(f"{claims}/c/status", current)
            print(f"\nanother driver's entry: {refused.value}")
            assert "resourceclaims/driver" in str(refused.value)
            assert refused.value.status in (403, 422)
    finally:
        with contextlib.suppress(errors.KubeNotFound):
            await kube.delete(f"{claims}/c")
        await access.delete_all(kube, docs)


@pytest.mark.parametrize("world", [{"nodes": 1, "gpus": 2}], indirect=True)
async def test_vendor_driver_mode_runs_under_its_token_with_no_denial(
    world: World, control_plane: ControlPlane, tmp_path: Path
) -> None:
    """--vendor-driver: the cluster role, in its own process under the cluster ServiceAccount's
    token from `rbac(..., vendor_driver=...)`, publishes under the vendor's name, attaches, and
    writes FabricDeviceReschedule into the vendor driver's entry of the claim (the reason the
    vendor's name is in the resourceclaims/driver grant); the scheduler moves the claim onto the
    vendor's device; 0 refusals."""
    from tests.cluster.test_vendor_mode import (
        DEVICE_CLASSES,
        Reschedules,
        StandInVendor,
        vendor_claim,
        vendor_pod,
    )

    kube, suffix = world.kube, world.suffix
    vendor = f"gpu.v{suffix}.example"
    ns, name, lease = f"agent-{suffix}", f"ag{suffix}", f"lease-{suffix}"
    docs = rbac.rbac(world.driver, ns, name=name, lease=lease, vendor_driver=vendor)
    cluster_sa = rbac.service_account_name(name, "cluster")
    await access.ensure_namespace(kube, ns)
    await access.apply_all(kube, docs)
    expression = f'device.driver == "{vendor}" && device.attributes["{vendor}"].type == "gpu"'
    await kube.create(
        DEVICE_CLASSES,
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "DeviceClass",
            "metadata": {"name": vendor},
            "spec": {"selectors": [{"cel": {"expression": expression}}]},
        },
    )
    StandInVendor(world, vendor)
    claim = f"v{suffix}"
    seen = Reschedules(world, claim)
    world.tasks.append(asyncio.create_task(seen.informer.run()))
    cfg = access.token_kubeconfig(
        control_plane, await access.token(kube, ns, cluster_sa), tmp_path / "c.kubeconfig"
    )
    port = free_port()
    proc = spawn(
        [
            "--kubeconfig",
            str(cfg),
            "--roles",
            "cluster",
            *cluster_args(world, world.emulator.url, port, lease),
            "--lease-namespace",
            ns,
            "--vendor-driver",
            vendor,
            "--claim-deadline",
            "120",
        ],
        tmp_path / "cluster.log",
    )
    try:

        async def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "cluster.log").read_text()[-3000:]
            return (await http_get(port, "/readyz"))[0] == 200

        await until(ready, what="the cluster role ready under its token", timeout=60)
        await kube.create(CLAIMS, vendor_claim(claim, vendor))
        await kube.create(f"/api/v1/namespaces/{NS}/pods", vendor_pod(claim, suffix))

        async def on_vendors_device() -> bool:
            got = await kube.get(f"{CLAIMS}/{claim}")
            results = ((got.get("status") or {}).get("allocation") or {}).get("devices") or {}
            return [(r["driver"], r["pool"]) for r in results.get("results") or []] == [
                (vendor, world.nodes[0])
            ]

        await until(on_vendors_device, what="the claim on the vendor's device", timeout=120)
        assert seen.count == 1
        assert await stop(proc) == 0
        calls = access.audited(control_plane, {_user(ns, cluster_sa)})
        writes = [c.what for c in calls if c.verb in ("update", "patch", "create", "delete")]
        print(f"\nvendor mode, cluster token: {len(calls)} requests; writes: {sorted(set(writes))}")
        assert [c.what for c in calls if c.code in (401, 403)] == []
        assert any(c.resource == "resourceclaims" and c.subresource == "status" for c in calls)
    finally:
        if proc.poll() is None:
            await stop(proc)
        with contextlib.suppress(errors.AgentError):
            await kube.delete(f"{DEVICE_CLASSES}/{vendor}")
        await access.delete_all(kube, docs)
