"""The in-memory API server fake: API semantics as kube-apiserver has them, and the agent's real
informer and leader elector running on it unchanged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from agent import errors
from agent.kube.client import STRATEGIC_PATCH, Obj
from agent.kube.leasing import LeaderElector
from agent.kube.resources import RESOURCES
from agent.kube.watching import Event, Informer
from agent.testing.fakekube import FakeKube, Rejected
from tests.waiting import until

CMS = "/api/v1/namespaces/default/configmaps"
NODES = "/api/v1/nodes"
CLAIMS = "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims"
SLICES = "/apis/resource.k8s.io/v1/resourceslices"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases"


@pytest.fixture
async def fake() -> AsyncIterator[FakeKube]:
    kube = FakeKube(bookmark_interval=0.05)
    yield kube
    await kube.close()


def cm(name: str, value: str = "0", **labels: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels},
        "data": {"v": value},
    }


def cr(name: str, node: str = "n1", finalizers: list[str] | None = None) -> Obj:
    meta: dict[str, Any] = {"name": name}
    if finalizers:
        meta["finalizers"] = finalizers
    return {
        "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
        "kind": "ComposableResource",
        "metadata": meta,
        "spec": {"type": "gpu", "model": "A100", "target_node": node},
        "status": {"state": "Online"},
    }


# --- CRUD, conflicts --------------------------------------------------------------------------


async def test_create_get_replace_delete(fake: FakeKube) -> None:
    created = await fake.create(CMS, cm("a"))
    meta = created["metadata"]
    assert meta["namespace"] == "default"
    assert meta["uid"]
    assert meta["creationTimestamp"]
    assert meta["generation"] == 1
    assert int(meta["resourceVersion"]) > 0
    assert created["kind"] == "ConfigMap"
    assert created["apiVersion"] == "v1"

    got = await fake.get(f"{CMS}/a")
    assert got == created
    got["data"]["v"] = "1"
    replaced = await fake.replace(f"{CMS}/a", got)
    assert int(replaced["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    assert replaced["metadata"]["uid"] == meta["uid"]
    assert replaced["data"] == {"v": "1"}

    await fake.delete(f"{CMS}/a")
    with pytest.raises(errors.KubeNotFound, match='configmaps "a" not found'):
        await fake.get(f"{CMS}/a")
    assert fake.get_obj(f"{CMS}/a") is None


async def test_resource_version_is_global_and_increasing(fake: FakeKube) -> None:
    a = await fake.create(CMS, cm("a"))
    n = await fake.create(NODES, {"metadata": {"name": "n1"}})
    b = await fake.create(CMS, cm("b"))
    rvs = [int(o["metadata"]["resourceVersion"]) for o in (a, n, b)]
    assert rvs == sorted(rvs)
    assert len(set(rvs)) == 3
    assert n["kind"] == "Node"
    assert "namespace" not in n["metadata"]
    listed = await fake.get(CMS)
    assert listed["metadata"]["resourceVersion"] == str(rvs[-1])


async def test_create_existing_is_already_exists(fake: FakeKube) -> None:
    await fake.create(CMS, cm("a"))
    with pytest.raises(errors.KubeAlreadyExists, match='configmaps "a" already exists') as exc:
        await fake.create(CMS, cm("a"))
    assert exc.value.status == 409
    assert exc.value.reason == "AlreadyExists"


async def test_generate_name_and_name_validation(fake: FakeKube) -> None:
    made = await fake.create(CMS, {"metadata": {"generateName": "x-"}, "data": {}})
    assert made["metadata"]["name"].startswith("x-")
    assert len(made["metadata"]["name"]) == 7
    with pytest.raises(errors.KubeInvalid, match="RFC 1123") as exc:
        await fake.create(CMS, cm("Not_A_Name"))
    assert exc.value.status == 422
    with pytest.raises(errors.KubeInvalid, match="name or generateName is required"):
        await fake.create(CMS, {"metadata": {}})


async def test_stale_put_is_conflict_and_unconditional_put_wins(fake: FakeKube) -> None:
    first = await fake.create(CMS, cm("a"))
    fresh = dict(first, data={"v": "1"})
    await fake.replace(f"{CMS}/a", fresh)
    stale = dict(first, data={"v": "2"})
    with pytest.raises(errors.KubeConflict, match="the object has been modified") as exc:
        await fake.replace(f"{CMS}/a", stale)
    assert exc.value.reason == "Conflict"
    unconditional = {"metadata": {"name": "a"}, "data": {"v": "3"}}
    assert (await fake.replace(f"{CMS}/a", unconditional))["data"] == {"v": "3"}


async def test_missing_object_is_404_for_put_patch_delete(fake: FakeKube) -> None:
    with pytest.raises(errors.KubeNotFound):
        await fake.replace(f"{CMS}/nope", cm("nope"))
    with pytest.raises(errors.KubeNotFound):
        await fake.patch(f"{CMS}/nope", {"data": {"v": "1"}})
    with pytest.raises(errors.KubeNotFound):
        await fake.delete(f"{CMS}/nope")


async def test_noop_write_keeps_resource_version(fake: FakeKube) -> None:
    a = await fake.create(CMS, cm("a"))
    same = await fake.patch(f"{CMS}/a", {"data": {"v": "0"}})
    assert same["metadata"]["resourceVersion"] == a["metadata"]["resourceVersion"]
    again = await fake.replace(f"{CMS}/a", a)
    assert again["metadata"]["resourceVersion"] == a["metadata"]["resourceVersion"]


# --- status subresource, generation ---------------------------------------------------------------


async def test_status_subresource_semantics(fake: FakeKube) -> None:
    created = await fake.create(RESOURCES, cr("gpu-1"))
    assert "status" not in created  # dropped on create: it has a status subresource
    assert created["kind"] == "ComposableResource"

    with_status = await fake.patch(f"{RESOURCES}/gpu-1/status", {"status": {"state": "Attaching"}})
    assert with_status["status"] == {"state": "Attaching"}
    assert with_status["metadata"]["generation"] == 1  # status does not bump generation

    # The main resource ignores status; spec changes bump generation.
    body = dict(with_status, status={"state": "Deleting"})
    body["spec"] = dict(body["spec"], model="H100")
    updated = await fake.replace(f"{RESOURCES}/gpu-1", body)
    assert updated["status"] == {"state": "Attaching"}
    assert updated["spec"]["model"] == "H100"
    assert updated["metadata"]["generation"] == 2

    patched = await fake.patch(f"{RESOURCES}/gpu-1", {"status": {"state": "X"}, "spec": {"a": 1}})
    assert patched["status"] == {"state": "Attaching"}
    assert patched["spec"]["a"] == 1

    # The status subresource ignores everything but status.
    body = dict(patched, spec={"type": "cpu"}, status={"state": "Online"})
    body["metadata"] = dict(body["metadata"], labels={"x": "y"})
    online = await fake.replace(f"{RESOURCES}/gpu-1/status", body)
    assert online["status"] == {"state": "Online"}
    assert online["spec"] == patched["spec"]
    assert "labels" not in online["metadata"]


async def test_no_status_subresource_for_configmaps(fake: FakeKube) -> None:
    await fake.create(CMS, cm("a"))
    with pytest.raises(errors.KubeNotFound):
        await fake.patch(f"{CMS}/a/status", {"status": {}})


async def test_node_keeps_status_on_create(fake: FakeKube) -> None:
    node = await fake.create(NODES, {"metadata": {"name": "n1"}, "status": {"capacity": {}}})
    assert node["status"] == {"capacity": {}}


# --- patches ------------------------------------------------------------------------------------


async def test_merge_patch_rfc7386(fake: FakeKube) -> None:
    await fake.create(CMS, {"metadata": {"name": "a", "labels": {"k": "v", "x": "y"}}, "data": {}})
    out = await fake.patch(
        f"{CMS}/a",
        {"metadata": {"labels": {"x": None, "z": "1"}}, "data": {"list": "1"}},
    )
    assert out["metadata"]["labels"] == {"k": "v", "z": "1"}
    await fake.create(NODES, {"metadata": {"name": "n1"}, "spec": {"taints": [{"key": "t"}]}})
    node = await fake.patch(f"{NODES}/n1", {"spec": {"taints": None}}, content_type=STRATEGIC_PATCH)
    assert "taints" not in node["spec"]


async def test_patch_resource_version_is_a_precondition(fake: FakeKube) -> None:
    a = await fake.create(RESOURCES, cr("gpu-1"))
    rv = a["metadata"]["resourceVersion"]
    ok = await fake.patch(
        f"{RESOURCES}/gpu-1", {"metadata": {"resourceVersion": rv, "labels": {"a": "b"}}}
    )
    assert ok["metadata"]["labels"] == {"a": "b"}
    with pytest.raises(errors.KubeConflict, match="has been modified"):
        await fake.patch(
            f"{RESOURCES}/gpu-1/status",
            {"metadata": {"resourceVersion": rv}, "status": {"state": "Online"}},
        )


async def test_json_patch_is_unsupported(fake: FakeKube) -> None:
    await fake.create(CMS, cm("a"))
    with pytest.raises(errors.KubeInvalid) as exc:
        await fake.patch(f"{CMS}/a", {}, content_type="application/json-patch+json")
    assert exc.value.status == 415


# --- finalizers ---------------------------------------------------------------------------------


async def test_finalizers_delay_deletion(fake: FakeKube) -> None:
    await fake.create(RESOURCES, cr("gpu-1", finalizers=["f/one"]))
    deleting = await fake.delete(f"{RESOURCES}/gpu-1")
    assert deleting["metadata"]["deletionTimestamp"]
    stored = fake.get_obj(f"{RESOURCES}/gpu-1")
    assert stored is not None
    assert stored["metadata"]["deletionTimestamp"]
    assert stored["metadata"]["generation"] == 2
    again = await fake.delete(f"{RESOURCES}/gpu-1")  # a second delete changes nothing
    assert again["metadata"]["resourceVersion"] == stored["metadata"]["resourceVersion"]
    await fake.patch(f"{RESOURCES}/gpu-1", {"metadata": {"finalizers": None}})
    assert fake.get_obj(f"{RESOURCES}/gpu-1") is None


async def test_delete_preconditions(fake: FakeKube) -> None:
    await fake.create(CMS, cm("a"))
    with pytest.raises(errors.KubeConflict, match="Precondition failed"):
        await fake.delete(f"{CMS}/a", body={"preconditions": {"uid": "other"}})
    assert fake.get_obj(f"{CMS}/a") is not None


# --- list: selectors and pagination -------------------------------------------------------------


async def test_field_selectors(fake: FakeKube) -> None:
    for name, node in (("a", "n1"), ("b", "n2"), ("c", "n1")):
        await fake.create(RESOURCES, cr(name, node))

    async def names(selector: str) -> list[str]:
        page = await fake.get(RESOURCES, fieldSelector=selector)
        return [i["metadata"]["name"] for i in page["items"]]

    assert await names("spec.target_node=n1") == ["a", "c"]
    assert await names("spec.target_node==n1,metadata.name!=a") == ["c"]
    assert await names("spec.target_node!=n1") == ["b"]
    assert await names("metadata.name=b") == ["b"]
    with pytest.raises(errors.KubeInvalid, match=r"field label not supported: spec\.missing"):
        await names("spec.missing=")  # not a selectable field of the CRD: 400, as on a cluster
    fake.selectable("composableresources")  # any path, from now on
    assert await names("spec.missing=") == ["a", "b", "c"]
    await fake.create("/api/v1/namespaces/other/configmaps", cm("x"))
    await fake.create(CMS, cm("y"))
    all_cms = await fake.get("/api/v1/configmaps", fieldSelector="metadata.namespace=other")
    assert [i["metadata"]["name"] for i in all_cms["items"]] == ["x"]


async def test_label_selectors(fake: FakeKube) -> None:
    await fake.create(CMS, cm("a", app="x", tier="web"))
    await fake.create(CMS, cm("b", app="y"))
    await fake.create(CMS, cm("c"))

    async def names(selector: str) -> list[str]:
        page = await fake.get(CMS, labelSelector=selector)
        return [i["metadata"]["name"] for i in page["items"]]

    assert await names("app=x") == ["a"]
    assert await names("app==x") == ["a"]
    assert await names("app!=x") == ["b", "c"]  # no label matches != as on the real server
    assert await names("app in (x, y)") == ["a", "b"]
    assert await names("app notin (x)") == ["b", "c"]
    assert await names("app") == ["a", "b"]
    assert await names("!app") == ["c"]
    assert await names("app in (x,y),tier") == ["a"]
    with pytest.raises(errors.KubeInvalid):
        await fake.get(CMS, labelSelector="a in b")


async def test_pagination_is_a_consistent_snapshot(fake: FakeKube) -> None:
    for i in range(7):
        await fake.create(CMS, cm(f"cm-{i}"))
    first = await fake.get(CMS, limit=3)
    assert first["kind"] == "ConfigMapList"
    assert first["apiVersion"] == "v1"
    assert "kind" not in first["items"][0]  # built-in list items carry no kind, as the server's
    assert first["metadata"]["remainingItemCount"] == 4
    await fake.create(CMS, cm("cm-9"))  # after the snapshot: not in this list
    seen = [i["metadata"]["name"] for i in first["items"]]
    token = first["metadata"]["continue"]
    while token:
        page = await fake.get(CMS, limit=3, **{"continue": token})
        assert page["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
        seen += [i["metadata"]["name"] for i in page["items"]]
        token = page["metadata"].get("continue")
    assert seen == [f"cm-{i}" for i in range(7)]
    crs = await fake.get(RESOURCES)
    assert crs["kind"] == "ComposableResourceList"


async def test_expired_continue_token_is_gone(fake: FakeKube) -> None:
    for i in range(3):
        await fake.create(CMS, cm(f"cm-{i}"))
    first = await fake.get(CMS, limit=1)
    fake.compact()
    with pytest.raises(errors.KubeGone):
        await fake.get(CMS, limit=1, **{"continue": first["metadata"]["continue"]})


# --- the real informer on the fake --------------------------------------------------------------


async def _run_informer(informer: Informer) -> asyncio.Task[None]:
    task = asyncio.create_task(informer.run())
    await asyncio.wait_for(informer.synced.wait(), 10)
    return task


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_informer_lists_and_watches(fake: FakeKube) -> None:
    for i in range(3):
        await fake.create(CMS, cm(f"cm-{i}"))
    events: list[Event] = []
    informer = Informer(fake, CMS, name="cms")
    informer.add_handler(events.append)
    task = await _run_informer(informer)
    try:
        assert [e.type for e in events] == ["ADDED"] * 3
        assert informer.get("default", "cm-0")["kind"] == "ConfigMap"  # type: ignore[index]
        await fake.create(CMS, cm("cm-3"))
        await fake.patch(f"{CMS}/cm-0", {"data": {"v": "1"}})
        await fake.delete(f"{CMS}/cm-1")
        await until(lambda: _async(len(events) >= 6), what="three watch events")
        assert [(e.type, e.obj["metadata"]["name"]) for e in events[3:]] == [
            ("ADDED", "cm-3"),
            ("MODIFIED", "cm-0"),
            ("DELETED", "cm-1"),
        ]
        assert events[4].old is not None
        assert events[4].old["data"] == {"v": "0"}
        assert sorted(n for _, n in informer.store) == ["cm-0", "cm-2", "cm-3"]
        assert informer.lists == 1
        assert fake.count("list", "configmaps") == 1
        assert fake.count("watch", "configmaps") == 1
    finally:
        await _stop(task)


async def _async(value: Any) -> Any:
    return value


async def test_informer_resumes_after_stream_end_without_relist(fake: FakeKube) -> None:
    await fake.create(CMS, cm("a"))
    events: list[Event] = []
    informer = Informer(fake, CMS, name="cms", watch_timeout=1)
    informer.add_handler(events.append)
    task = await _run_informer(informer)
    try:
        fake.end_watches()
        await fake.create(CMS, cm("b"))
        await until(lambda: _async(informer.watches >= 2), what="a second watch")
        await until(lambda: _async(len(events) >= 2), what="b's ADDED")
        # and the server's timeoutSeconds (1 s here) ends a watch too
        await until(lambda: _async(informer.watches >= 3), what="a third watch", timeout=15)
        await fake.patch(f"{CMS}/b", {"data": {"v": "2"}})
        await until(lambda: _async(len(events) >= 3), what="b's MODIFIED")
        assert [e.type for e in events] == ["ADDED", "ADDED", "MODIFIED"]
        assert informer.lists == 1
        assert informer.gone == 0
    finally:
        await _stop(task)


async def test_informer_relists_after_410_and_loses_nothing(fake: FakeKube) -> None:
    for i in range(3):
        await fake.create(CMS, cm(f"cm-{i}"))
    events: list[Event] = []
    informer = Informer(fake, CMS, name="cms", backoff_max=0.2)
    informer.add_handler(events.append)
    task = await _run_informer(informer)
    try:
        fake.set_down()  # the informer is cut off ...
        await until(lambda: _async(fake.open_watches == 0), what="the watch to break")
        fake.edit(f"{CMS}/cm-0", lambda o: o["data"].update(v="9"))  # ... while things change
        fake.remove(f"{CMS}/cm-1")
        fake.add(CMS, cm("cm-new"))
        fake.compact()  # and the history it would resume from is gone
        fake.set_down(False)
        await until(lambda: _async(informer.gone >= 1 and informer.lists >= 2), what="relist")
        await until(lambda: _async(len(events) >= 6), what="the relist's diff")
        changes = sorted((e.type, e.obj["metadata"]["name"]) for e in events[3:])
        assert changes == [("ADDED", "cm-new"), ("DELETED", "cm-1"), ("MODIFIED", "cm-0")]
        assert sorted(n for _, n in informer.store) == ["cm-0", "cm-2", "cm-new"]
    finally:
        await _stop(task)


async def test_informer_with_field_selector_sees_transitions(fake: FakeKube) -> None:
    events: list[Event] = []
    informer = Informer(fake, RESOURCES, field_selector="spec.target_node=n1")
    informer.add_handler(events.append)
    task = await _run_informer(informer)
    try:
        await fake.create(RESOURCES, cr("a", "n1"))
        await fake.create(RESOURCES, cr("b", "n2"))
        await fake.patch(f"{RESOURCES}/a", {"spec": {"target_node": "n2"}})  # leaves the selector
        await fake.patch(f"{RESOURCES}/b", {"spec": {"target_node": "n1"}})  # enters it
        await until(lambda: _async(len(events) >= 3), what="three events")
        assert [(e.type, e.obj["metadata"]["name"]) for e in events] == [
            ("ADDED", "a"),
            ("DELETED", "a"),
            ("ADDED", "b"),
        ]
    finally:
        await _stop(task)


async def test_watch_bookmarks_advance_resource_version(fake: FakeKube) -> None:
    informer = Informer(fake, RESOURCES)
    task = await _run_informer(informer)
    try:
        start = informer.resource_version
        await fake.create(CMS, cm("elsewhere"))  # another resource moves the global version
        await until(
            lambda: _async(informer.resource_version != start), what="a bookmark", timeout=10
        )
        assert informer.resource_version == fake.resource_version
    finally:
        await _stop(task)


async def test_watch_from_too_old_version_is_410(fake: FakeKube) -> None:
    small = FakeKube(history=2)
    a = await small.create(CMS, cm("a"))
    for v in range(3):
        await small.patch(f"{CMS}/a", {"data": {"v": str(v + 1)}})
    async with small.stream(
        CMS,
        params={"watch": "true", "resourceVersion": a["metadata"]["resourceVersion"]},
        read_timeout=5,
    ) as body:
        lines = [line async for line in body]
    assert len(lines) == 1
    assert b'"code":410' in lines[0]
    assert b'"ERROR"' in lines[0]


# --- leader election on the fake ----------------------------------------------------------------


async def test_leader_elector_acquires_and_renews(fake: FakeKube) -> None:
    elector = LeaderElector(
        fake,
        namespace="kube-system",
        name="cohdi",
        identity="me",
        lease_duration=3.0,
        renew_deadline=2.0,
        retry_period=0.1,
    )
    worked = asyncio.Event()

    async def lead() -> None:
        worked.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(elector.run(lead))
    try:
        await asyncio.wait_for(worked.wait(), 10)
        lease = fake.get_obj(f"{LEASES}/cohdi")
        assert lease is not None
        assert lease["spec"]["holderIdentity"] == "me"
        first_rv = int(lease["metadata"]["resourceVersion"])
        await until(lambda: _async(fake.count("update", "leases") >= 2), what="two renewals")

        def renewed() -> Any:
            now = fake.get_obj(f"{LEASES}/cohdi")
            return now is not None and int(now["metadata"]["resourceVersion"]) > first_rv

        await until(lambda: _async(renewed()), what="a renewal")
        assert elector.is_leader
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    released = fake.get_obj(f"{LEASES}/cohdi")
    assert released is not None
    assert released["spec"]["holderIdentity"] == ""


# --- fault injection, observation, admission, other writers --------------------------------------


async def test_injected_failures(fake: FakeKube) -> None:
    fake.fail("POST", CMS, status=503, retry_after=2)
    with pytest.raises(errors.KubeUnavailable, match="503") as exc:
        await fake.create(CMS, cm("a"))
    assert exc.value.status == 503
    assert fake.get_obj(f"{CMS}/a") is None  # failed before the write
    await fake.create(CMS, cm("a"))  # only the next one failed

    fake.fail("PATCH", CMS, status=500, after=True)  # applied, but the answer is lost
    with pytest.raises(errors.KubeUnavailable):
        await fake.patch(f"{CMS}/a", {"data": {"v": "5"}})
    assert fake.get_obj(f"{CMS}/a")["data"] == {"v": "5"}  # type: ignore[index]

    for status, cls in (
        (409, errors.KubeConflict),
        (422, errors.KubeInvalid),
        (403, errors.KubeForbidden),
    ):
        fake.fail(path=CMS, status=status)
        with pytest.raises(cls):
            await fake.get(f"{CMS}/a")


async def test_hang_past_the_timeout_is_unavailable(fake: FakeKube) -> None:
    fake.hang("GET", CMS, seconds=5)
    with pytest.raises(errors.KubeUnavailable, match="no answer"):
        await fake.request("GET", f"{CMS}/a", timeout=0.05)


async def test_server_down(fake: FakeKube) -> None:
    fake.set_down()
    with pytest.raises(errors.KubeUnavailable, match="cannot reach"):
        await fake.get(CMS)
    with pytest.raises(errors.KubeUnavailable):
        async with fake.stream(CMS, params={"watch": "true"}, read_timeout=1):
            pass
    fake.set_down(False)
    assert (await fake.get(CMS))["items"] == []


async def test_requests_are_observed_and_counted(fake: FakeKube) -> None:
    seen: list[tuple[str, str]] = []
    fake.on_request(lambda r: seen.append((r.method, r.path)))
    await fake.create(RESOURCES, cr("a"))
    await fake.patch(f"{RESOURCES}/a/status", {"status": {"state": "Online"}})
    await fake.get(RESOURCES)
    assert seen == [
        ("POST", RESOURCES),
        ("PATCH", f"{RESOURCES}/a/status"),
        ("GET", RESOURCES),
    ]
    assert fake.count("create", "composableresources") == 1
    assert fake.count("patch", "composableresources/status") == 1
    assert fake.count("list", "composableresources") == 1
    assert fake.requests[0].body["metadata"]["name"] == "a"


async def test_admission_hook_rejects_and_defaults(fake: FakeKube) -> None:
    def slices(op: str, new: Obj, old: Obj | None) -> None:
        if not new.get("spec", {}).get("pool", {}).get("name"):
            raise Rejected("spec.pool.name: Required value")
        new["spec"].setdefault("nodeName", "defaulted")

    fake.admit("resourceslices", slices)
    with pytest.raises(errors.KubeInvalid, match=r"spec.pool.name: Required value"):
        await fake.create(SLICES, {"metadata": {"name": "s"}, "spec": {}})
    made = await fake.create(SLICES, {"metadata": {"name": "s"}, "spec": {"pool": {"name": "p"}}})
    assert made["spec"]["nodeName"] == "defaulted"


async def test_another_writer_emits_events(fake: FakeKube) -> None:
    claim = {"metadata": {"name": "c"}, "spec": {"devices": {"requests": []}}}
    await fake.create(CLAIMS, claim)
    events: list[Event] = []
    informer = Informer(fake, CLAIMS)
    informer.add_handler(events.append)
    task = await _run_informer(informer)
    try:
        fake.edit(f"{CLAIMS}/c", lambda o: o.update(status={"allocation": {"devices": {}}}))
        await until(lambda: _async(len(events) >= 2), what="the scheduler's write")
        assert events[1].type == "MODIFIED"
        assert events[1].obj["status"]["allocation"]
    finally:
        await _stop(task)
    assert len(fake.objects("resourceclaims")) == 1
    assert fake.objects("composabilityrequests") == []


# --- the server's other refusals ------------------------------------------------------------------


async def test_wrong_scope_paths_are_refused(fake: FakeKube) -> None:
    with pytest.raises(errors.KubeInvalid) as exc:  # POST to the all-namespace collection
        await fake.create("/apis/resource.k8s.io/v1/resourceclaims", {"metadata": {"name": "c"}})
    assert exc.value.status == 405
    with pytest.raises(errors.KubeNotFound):
        await fake.create("/api/v1/namespaces/default/nodes", {"metadata": {"name": "n"}})
    await fake.create(CLAIMS, {"metadata": {"name": "c"}, "spec": {}})
    everywhere = await fake.get("/apis/resource.k8s.io/v1/resourceclaims")
    assert [i["metadata"]["namespace"] for i in everywhere["items"]] == ["default"]


async def test_create_with_resource_version_is_bad_request(fake: FakeKube) -> None:
    with pytest.raises(errors.KubeInvalid, match="resourceVersion should not be set") as exc:
        await fake.create(CMS, {"metadata": {"name": "a", "resourceVersion": "7"}})
    assert exc.value.status == 400


async def test_put_name_and_uid_must_match(fake: FakeKube) -> None:
    a = await fake.create(CMS, cm("a"))
    with pytest.raises(errors.KubeInvalid, match=r"does not match the name on the URL \(a\)"):
        await fake.replace(f"{CMS}/a", {"metadata": {"name": "b"}, "data": {}})
    with pytest.raises(errors.KubeInvalid, match="does not match the name on the URL"):
        await fake.replace(f"{CMS}/a", {"metadata": {}, "data": {}})
    with pytest.raises(errors.KubeConflict, match="Precondition failed: UID"):
        await fake.replace(f"{CMS}/a", {"metadata": {"name": "a", "uid": "u"}, "data": {}})
    with pytest.raises(errors.KubeConflict, match="Precondition failed: UID"):
        await fake.patch(f"{CMS}/a", {"metadata": {"uid": "u"}})
    assert fake.get_obj(f"{CMS}/a") == a


async def test_strategic_patch_is_refused_for_custom_resources(fake: FakeKube) -> None:
    await fake.create(RESOURCES, cr("gpu-1"))
    with pytest.raises(errors.KubeInvalid) as exc:
        await fake.patch(f"{RESOURCES}/gpu-1", {"spec": {}}, content_type=STRATEGIC_PATCH)
    assert exc.value.status == 415


async def test_no_new_finalizers_while_deleting(fake: FakeKube) -> None:
    await fake.create(RESOURCES, cr("gpu-1", finalizers=["f/one"]))
    await fake.delete(f"{RESOURCES}/gpu-1")
    with pytest.raises(errors.KubeInvalid, match="no new finalizers can be added"):
        await fake.patch(f"{RESOURCES}/gpu-1", {"metadata": {"finalizers": ["f/one", "f/two"]}})


async def test_watch_sees_graceful_deletion(fake: FakeKube) -> None:
    start = await fake.create(RESOURCES, cr("gpu-1", finalizers=["f/one"]))
    await fake.delete(f"{RESOURCES}/gpu-1")
    await fake.patch(f"{RESOURCES}/gpu-1", {"metadata": {"finalizers": []}})
    params = {"watch": "true", "resourceVersion": start["metadata"]["resourceVersion"]}
    async with fake.stream(RESOURCES, params=params, read_timeout=5) as body:
        lines = []
        async for line in body:
            lines.append(orjson.loads(line))
            if len(lines) == 2:
                break
    assert [e["type"] for e in lines] == ["MODIFIED", "DELETED"]
    assert lines[0]["object"]["metadata"]["deletionTimestamp"]
    # The DELETED event carries the last stored state (finalizers still listed), as etcd's does,
    # at a resourceVersion of its own.
    assert lines[1]["object"]["metadata"]["finalizers"] == ["f/one"]
    assert int(lines[1]["object"]["metadata"]["resourceVersion"]) > int(
        lines[0]["object"]["metadata"]["resourceVersion"]
    )
    assert fake.get_obj(f"{RESOURCES}/gpu-1") is None


async def test_lost_reply_after_a_hang(fake: FakeKube) -> None:
    fake.hang("POST", CMS, seconds=5, after=True)
    with pytest.raises(errors.KubeUnavailable):
        await fake.request("POST", CMS, body=cm("a"), timeout=0.05)
    assert fake.get_obj(f"{CMS}/a") is not None  # the write happened; the answer did not come
    with pytest.raises(errors.KubeAlreadyExists):  # so a retry meets its own object
        await fake.create(CMS, cm("a"))


# --- several clients of one server ----------------------------------------------------------------


async def test_clients_share_the_server_not_the_faults(fake: FakeKube) -> None:
    other = fake.client()
    await other.create(CMS, cm("a"))
    assert fake.get_obj(f"{CMS}/a") is not None
    fake.set_down()
    assert (await other.get(f"{CMS}/a"))["metadata"]["name"] == "a"  # only `fake` is cut off
    with pytest.raises(errors.KubeUnavailable):
        await fake.get(f"{CMS}/a")
    fake.set_down(False)
    other.fail("GET", CMS, status=500)
    await fake.get(f"{CMS}/a")  # the other's fault is its own
    assert other.count("create", "configmaps") == 1
    assert fake.count("create", "configmaps") == 0
    a_rv = int(fake.get_obj(f"{CMS}/a")["metadata"]["resourceVersion"])  # type: ignore[index]
    b = await fake.create(CMS, cm("b"))
    assert int(b["metadata"]["resourceVersion"]) > a_rv  # one resourceVersion sequence


async def test_leader_fails_over_when_cut_off(fake: FakeKube) -> None:
    order: list[str] = []

    def elector(identity: str, kube: FakeKube) -> LeaderElector:
        return LeaderElector(
            kube,
            namespace="kube-system",
            name="cohdi",
            identity=identity,
            lease_duration=1.0,
            renew_deadline=0.6,
            retry_period=0.1,
        )

    def work(identity: str) -> Any:
        async def lead() -> None:
            order.append(f"{identity} starts")
            try:
                await asyncio.Event().wait()
            finally:
                order.append(f"{identity} stops")

        return lead

    a_kube, b_kube = fake, fake.client()
    a, b = elector("a", a_kube), elector("b", b_kube)
    a_task = asyncio.create_task(a.run(work("a")))
    await asyncio.wait_for(a.leading.wait(), 10)
    b_task = asyncio.create_task(b.run(work("b")))
    try:
        await until(lambda: _async(b_kube.count("get", "leases") >= 3), what="b campaigning")
        assert not b.is_leader
        a_kube.set_down()  # a can no longer renew; b must wait out the lease before taking it
        await asyncio.wait_for(b.leading.wait(), 20)
        assert order == ["a starts", "a stops", "b starts"]
        lease = fake.get_obj(f"{LEASES}/cohdi")
        assert lease is not None
        assert lease["spec"]["holderIdentity"] == "b"
        assert lease["spec"]["leaseTransitions"] == 1
    finally:
        for task in (a_task, b_task):
            task.cancel()
        await asyncio.gather(a_task, b_task, return_exceptions=True)


async def test_stalled_watch_fails_after_the_read_timeout(fake: FakeKube) -> None:
    fake.stalled = True
    await fake.create(CMS, cm("a"))

    async def read_all() -> list[bytes]:
        async with fake.stream(CMS, params={"watch": "true"}, read_timeout=0.2) as body:
            return [line async for line in body]

    with pytest.raises(errors.KubeUnavailable, match=r"sent nothing for 0\.2 s"):
        await read_all()
