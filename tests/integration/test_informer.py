"""The informer against the real API server: it lists, watches, resumes, and after a 410 Gone it
relists and diffs, so that nothing that changed while it was cut off is lost — not even deletions.

410 is forced for real: the informer is cut off by a proxy, objects change, etcd is compacted and
kube-apiserver restarted (its watch cache starts afresh at the current revision), then the informer
reconnects with its old resourceVersion.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.request
import uuid
from pathlib import Path

import pytest

from agent.devcluster.controlplane import ControlPlane
from agent.kube.client import Kube, path_of
from agent.kube.watching import Event, Informer
from tests.conftest import kubeconfig_via
from tests.tcpproxy import TcpProxy
from tests.waiting import until

pytestmark = pytest.mark.controlplane


def compact_etcd(control_plane: ControlPlane) -> int:
    """Compact etcd up to its current revision through its HTTP gateway; returns the revision."""

    def post(path: str, doc: dict[str, object]) -> dict[str, object]:
        req = urllib.request.Request(  # noqa: S310 -- loopback etcd over http
            control_plane.etcd_url + path, data=json.dumps(doc).encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 -- loopback etcd
            return dict(json.loads(resp.read()))

    head = post("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})
    revision = int(head["header"]["revision"])  # type: ignore[index]
    post("/v3/kv/compaction", {"revision": revision, "physical": True})
    return revision


async def _make_namespace(kube: Kube) -> str:
    ns = f"inf-{uuid.uuid4().hex[:6]}"
    await kube.create(
        "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
    )
    return ns


def _cm(name: str, value: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name},
        "data": {"v": value},
    }


async def test_relist_after_410_loses_nothing(
    control_plane: ControlPlane, kube: Kube, tmp_path: Path
) -> None:
    ns = await _make_namespace(kube)
    cms = path_of(group="", version="v1", plural="configmaps", namespace=ns)
    for i in range(5):
        await kube.create(cms, _cm(f"cm-{i}", "0"))

    proxy = TcpProxy(control_plane.apiserver_port)
    port = await proxy.start()
    events: list[Event] = []
    async with await Kube.connect(
        kubeconfig=str(kubeconfig_via(control_plane, port, tmp_path / "kc")), request_timeout=2.0
    ) as cut_kube:
        informer = Informer(cut_kube, cms, name="configmaps", backoff_max=0.5)
        informer.add_handler(events.append)
        task = asyncio.create_task(informer.run())
        try:
            await asyncio.wait_for(informer.synced.wait(), 30)
            # kube-root-ca.crt is not there: no controller-manager publishes it.
            assert {n for _, n in informer.store} == {f"cm-{i}" for i in range(5)}
            await kube.create(cms, _cm("cm-live", "0"))
            await until(lambda: _has(informer, "cm-live"), what="the watch to deliver cm-live")
            assert informer.lists == 1

            proxy.block()  # the informer is cut off from here on
            for i in range(5, 10):
                await kube.create(cms, _cm(f"cm-{i}", "0"))
            for i in (0, 1):
                await kube.patch(f"{cms}/cm-{i}", {"data": {"v": "changed"}})
            for i in (2, 3):
                await kube.delete(f"{cms}/cm-{i}")
            compact_etcd(control_plane)
            await asyncio.to_thread(control_plane.restart_apiserver)
            events.clear()
            proxy.unblock()

            truth = await kube.get(cms)
            want = {i["metadata"]["name"]: i["metadata"]["resourceVersion"] for i in truth["items"]}
            await until(
                lambda: _matches(informer, want), what="the informer to converge", timeout=60
            )
            assert informer.gone >= 1, "the informer never saw 410 Gone"
            assert informer.lists >= 2, "the informer did not relist"
            seen = {(e.type, e.obj["metadata"]["name"]) for e in events}
            assert {("DELETED", "cm-2"), ("DELETED", "cm-3")} <= seen
            assert {("MODIFIED", "cm-0"), ("MODIFIED", "cm-1")} <= seen
            assert {("ADDED", f"cm-{i}") for i in range(5, 10)} <= seen
            assert informer.store[(ns, "cm-0")]["data"] == {"v": "changed"}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await proxy.close()
            await kube.delete(f"/api/v1/namespaces/{ns}")


async def test_resumes_without_relist_after_a_dropped_connection(
    control_plane: ControlPlane, kube: Kube, tmp_path: Path
) -> None:
    """A dropped connection with the resourceVersion still in the watch cache resumes the watch
    from where it was: no relist, no replay, nothing missed."""
    ns = await _make_namespace(kube)
    cms = path_of(group="", version="v1", plural="configmaps", namespace=ns)
    proxy = TcpProxy(control_plane.apiserver_port)
    port = await proxy.start()
    events: list[Event] = []
    async with await Kube.connect(
        kubeconfig=str(kubeconfig_via(control_plane, port, tmp_path / "kc")), request_timeout=2.0
    ) as cut_kube:
        informer = Informer(cut_kube, cms, name="configmaps", backoff_max=0.5)
        informer.add_handler(events.append)
        task = asyncio.create_task(informer.run())
        try:
            await asyncio.wait_for(informer.synced.wait(), 30)
            proxy.block()
            await kube.create(cms, _cm("during-gap", "0"))
            await asyncio.sleep(0.5)
            proxy.unblock()
            await until(lambda: _has(informer, "during-gap"), what="the resumed watch")
            assert informer.lists == 1
            assert informer.gone == 0
            assert informer.watches >= 2
            assert [(e.type, e.obj["metadata"]["name"]) for e in events] == [
                ("ADDED", "during-gap")
            ]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await proxy.close()
            await kube.delete(f"/api/v1/namespaces/{ns}")


async def _has(informer: Informer, name: str) -> bool:
    return any(n == name for _, n in informer.store)


async def _matches(informer: Informer, want: dict[str, str]) -> bool:
    have = {n: o["metadata"]["resourceVersion"] for (_, n), o in informer.store.items()}
    return have == want
