"""The Requester (agent/controllers/requesting.py) on the in-memory API server: the real
informers, publisher and event recorder, the test playing the composer (it writes members'
`status.state` as the composer would). Each branch of the observe/decide/act loop, fast; what
only the real API proves (CRD schema, the composer's attach) is in tests/cluster/test_requests.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent.controllers import requesting
from agent.controllers.publishing import NODES, SLICES, Publisher
from agent.controllers.requesting import Requester
from agent.kube.client import Obj
from agent.kube.eventing import Recorder
from agent.kube.resources import FINALIZER, REQUESTS, RESOURCES
from agent.kube.watching import Informer
from agent.model import requests as rq
from agent.model.fabric import (
    DeviceId,
    DeviceState,
    FabricId,
    Inventory,
    Machine,
    MachineId,
    PoolDevice,
)
from agent.testing.fakekube import FakeKube, Rejected
from tests import virtualtime
from tests.waiting import until

# In-memory worlds only: graces, settle periods and backoff pass in virtual time.
pytestmark = pytest.mark.virtualtime

A100 = "NVIDIA-A100-PCIE-40GB"
EVENTS = "/api/v1/namespaces/default/events"
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


def inventory(nodes: list[str], free: int, attached: int = 0) -> Inventory:
    fab = FabricId("fab")
    devices = [
        PoolDevice(DeviceId(f"gpu-{i}"), fab, A100, DeviceState.FREE) for i in range(free)
    ] + [
        PoolDevice(
            DeviceId(f"busy-{i}"), fab, A100, DeviceState.ATTACHED, machine=MachineId("m-n9")
        )
        for i in range(attached)
    ]
    machines = tuple(Machine(MachineId(f"m-{n}"), n, fab) for n in nodes)
    return Inventory(machines, tuple(devices))


def valid_labels(op: str, new: Obj, old: Obj | None) -> None:
    """What the API server's metadata validation says of label values (the fake leaves it out)."""
    for key, value in (new["metadata"].get("labels") or {}).items():
        if len(value) > 63 or not LABEL_VALUE.fullmatch(value):
            raise Rejected(f'metadata.labels: Invalid value: "{value}" ({key})')


@dataclass
class Rig:
    kube: FakeKube
    requester: Requester
    publisher: Publisher
    resources: Informer
    clock: list[float]
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    async def submit(self, name: str, size: int, **resource: Any) -> Obj:
        body = {
            "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
            "kind": "ComposabilityRequest",
            "metadata": {"name": name},
            "spec": {
                "resource": {
                    "type": "gpu",
                    "model": A100,
                    "size": size,
                    "allocation_policy": "samenode",
                    "target_node": "n1",
                    **resource,
                }
            },
        }
        return await self.kube.create(REQUESTS, body)

    def request(self, name: str) -> Obj | None:
        return self.kube.get_obj(f"{REQUESTS}/{name}")

    def status(self, name: str) -> dict[str, Any]:
        obj = self.request(name)
        return dict((obj or {}).get("status") or {})

    def condition(self, name: str, ctype: str) -> dict[str, Any]:
        conds = self.status(name).get("conditions") or []
        return next((c for c in conds if c["type"] == ctype), {})

    def members(self) -> list[Obj]:
        return self.kube.objects("composableresources")

    def events(self, reason: str | None = None) -> list[Obj]:
        """One entry per occurrence: an aggregated Event (`count` n) is there n times."""
        return [
            e
            for e in self.kube.objects("events")
            if reason in (None, e["reason"])
            for _ in range(int(e.get("count") or 1))
        ]

    def play_composer(self, name: str, state: str, **status: Any) -> None:
        def change(o: Obj) -> None:
            o["status"] = {**(o.get("status") or {}), "state": state, **status}

        self.kube.edit(f"{RESOURCES}/{name}", change)

    def all_online(self) -> None:
        for m in self.members():
            if not m["metadata"].get("deletionTimestamp"):
                self.play_composer(
                    m["metadata"]["name"], "Online", cdi_device_id=f"d-{m['metadata']['name']}"
                )

    async def state(self, name: str, want: str, within: float = 10) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            st = self.status(name)
            return st if st.get("state") == want else None

        return await until(probe, what=f"{name} {want}", timeout=within)


@contextlib.asynccontextmanager
async def rig(
    *,
    nodes: tuple[str, ...] = ("n1", "n2", "n3"),
    free: int = 8,
    attached: int = 0,
    limits: rq.Limits | None = None,
    resources_kube: Callable[[FakeKube], FakeKube] | None = None,
    requests_kube: Callable[[FakeKube], FakeKube] | None = None,
) -> AsyncIterator[Rig]:
    wall, mono = virtualtime.clocks()
    kube = FakeKube(bookmark_interval=0.05, wall=wall)
    kube.admit("composableresources", valid_labels)
    for n in nodes:
        kube.add(NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}})
    informers = {
        "requests": Informer(
            requests_kube(kube) if requests_kube else kube, REQUESTS, name="requests"
        ),
        "resources": Informer(
            resources_kube(kube) if resources_kube else kube, RESOURCES, name="resources"
        ),
        "nodes": Informer(kube, NODES, name="nodes"),
        "slices": Informer(kube, SLICES, name="slices"),
    }
    publisher = Publisher(
        kube, driver="fake.cohdi.io", slices=informers["slices"], nodes=informers["nodes"]
    )
    publisher.update_inventory(inventory(list(nodes), free, attached))
    recorder = Recorder(kube, component="cohdi-agent", instance="test")
    clock = [wall()]
    requester = Requester(
        kube,
        requests=informers["requests"],
        resources=informers["resources"],
        nodes=informers["nodes"],
        publisher=publisher,
        recorder=recorder,
        limits=limits or rq.Limits(max_size=16),
        clock=lambda: clock[0],
        mono=mono,
    )
    r = Rig(kube, requester, publisher, informers["resources"], clock)
    for inf in informers.values():
        r.tasks.append(asyncio.create_task(inf.run()))
    r.tasks += [
        asyncio.create_task(publisher.run()),
        asyncio.create_task(recorder.run()),
        asyncio.create_task(requester.run()),
    ]
    try:
        yield r
    finally:
        for t in r.tasks:
            t.cancel()
        await asyncio.gather(*r.tasks, return_exceptions=True)
        await kube.close()


# --- the loop -----------------------------------------------------------------------------------


async def test_members_are_owned_labelled_and_the_request_runs() -> None:
    async with rig() as r:
        req = await r.submit("req", 2)
        await until(lambda: _async(len(r.members()) == 2), what="two members")
        assert set(r.status("req")["resources"]) == {"req-0", "req-1"}
        members = r.members()
        assert [m["metadata"]["name"] for m in members] == ["req-0", "req-1"]
        for m in members:
            assert m["metadata"]["labels"] == {
                rq.OWNER_LABEL: "req",
                rq.MANAGED_BY: "cohdi-agent",
            }
            (ref,) = m["metadata"]["ownerReferences"]
            assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
                "ComposabilityRequest",
                "req",
                req["metadata"]["uid"],
                True,
            )
            assert m["spec"] == {
                "type": "gpu",
                "model": A100,
                "target_node": "n1",
                "force_detach": False,
            }
        assert FINALIZER in (r.request("req") or {})["metadata"]["finalizers"]
        r.all_online()
        st = await r.state("req", "Running")
        assert st["resources"]["req-0"]["cdi_device_id"] == "d-req-0"
        assert r.condition("req", rq.READY)["status"] == "True"
        await until(lambda: _async(r.events(rq.RUNNING)), what="the Running event")
        assert r.kube.count("create", "composableresources") == 2


async def test_a_253_character_request_runs_with_valid_labels_and_events() -> None:
    # Reproduction: a 64+-character name made a label value the API server refuses (here the
    # admission hook applies its rule); the 422 was dropped and the request did nothing.
    name = "r" * 253
    async with rig() as r:
        await r.submit(name, 2)
        await until(lambda: _async(len(r.members()) == 2), what="two members")
        for m in r.members():
            assert len(m["metadata"]["name"]) <= 253
            assert m["metadata"]["labels"][rq.OWNER_LABEL] == rq.owner_label(name)
        r.all_online()
        await r.state(name, "Running")
        events = await until(lambda: _async(r.events(rq.RUNNING)), what="the Running event")
        assert events[0]["involvedObject"]["name"] == name
        assert len(events[0]["metadata"]["name"]) <= 253


async def test_a_size_over_the_limit_is_refused_and_creates_nothing() -> None:
    # Reproduction: `size: 1000000` made ComposableResources one POST at a time, silently.
    async with rig(limits=rq.Limits(max_size=4)) as r:
        await r.submit("big", 1_000_000)
        st = await r.state("big", "Failed")
        assert "above this agent's limit of 4" in st["error"]
        assert r.condition("big", rq.REFUSED)["reason"] == rq.TOO_LARGE
        warning = await until(lambda: _async(r.events(rq.TOO_LARGE)), what="a TooLarge event")
        assert warning[0]["type"] == "Warning"
        assert r.members() == []
        assert r.kube.count("create", "composableresources") == 0


async def test_no_node_and_unknown_model_are_conditions_on_the_request() -> None:
    async with rig() as r:
        await r.submit("nowhere", 1, target_node="n7")
        await r.submit("b200", 1, model="NVIDIA-B200")
        await r.state("nowhere", "Failed")
        await r.state("b200", "Failed")
        assert r.condition("nowhere", rq.REFUSED)["reason"] == rq.NO_NODE
        assert r.condition("b200", rq.REFUSED)["reason"] == rq.UNKNOWN_MODEL
        await until(lambda: _async(r.events(rq.NO_NODE)), what="a NoNode event")
        await until(lambda: _async(r.events(rq.UNKNOWN_MODEL)), what="an UnknownModel event")
        assert r.members() == []


async def test_differentnode_spreads_the_members() -> None:
    async with rig() as r:
        await r.submit("spread", 3, allocation_policy="differentnode", target_node="")
        await until(lambda: _async(len(r.members()) == 3), what="three members")
        assert {m["spec"]["target_node"] for m in r.members()} == {"n1", "n2", "n3"}


async def test_scaling_down_deletes_the_surplus_and_shrinks_the_status() -> None:
    async with rig() as r:
        await r.submit("req", 3)
        await until(lambda: _async(len(r.members()) == 3), what="three members")
        r.all_online()
        await r.state("req", "Running")
        r.kube.fail("DELETE", RESOURCES, status=500, times=1)  # retried
        r.kube.edit(f"{REQUESTS}/req", lambda o: o["spec"]["resource"].update(size=1))

        async def one() -> dict[str, Any] | None:
            st = r.status("req")
            return st if len(st.get("resources") or {}) == 1 and len(r.members()) == 1 else None

        st = await until(one, what="one member left, in the status too")
        assert st["state"] == "Running"
        assert list(st["resources"]) == [r.members()[0]["metadata"]["name"]]
        r.kube.edit(f"{REQUESTS}/req", lambda o: o["spec"]["resource"].update(size=0))
        await until(lambda: _async(r.members() == []), what="no member")
        await r.state("req", "Running")


async def test_deleting_the_request_cleans_its_members_first() -> None:
    async with rig() as r:
        await r.submit("req", 2)
        await until(lambda: _async(len(r.members()) == 2), what="two members")
        for m in r.members():  # the composer's finalizer: a member goes only once detached
            r.kube.edit(
                f"{RESOURCES}/{m['metadata']['name']}",
                lambda o: o["metadata"].update(finalizers=["composer"]),
            )
        await r.kube.delete(f"{REQUESTS}/req")
        await r.state("req", "Cleaning")
        await until(
            lambda: _async(all(m["metadata"].get("deletionTimestamp") for m in r.members())),
            what="members being deleted",
        )
        assert r.request("req") is not None  # held by our finalizer
        for m in r.members():
            r.kube.edit(
                f"{RESOURCES}/{m['metadata']['name']}",
                lambda o: o["metadata"].update(finalizers=[]),
            )
        await until(lambda: _async(r.request("req") is None), what="the request gone")
        assert r.events("Cleaning")


async def test_a_failed_member_is_replaced_and_said_so() -> None:
    async with rig(limits=rq.Limits(max_size=16, replace_failed_after=0)) as r:
        await r.submit("req", 1)
        await until(lambda: _async(len(r.members()) == 1), what="a member")
        r.play_composer("req-0", "Failed", reason="DeviceFailed", error="the GPU fell off")
        await until(
            lambda: _async([m["metadata"]["name"] for m in r.members()] == ["req-1"]),
            what="req-0 replaced by req-1",
        )
        note = await until(lambda: _async(r.events("Replacing")), what="a Replacing event")
        assert "DeviceFailed: the GPU fell off" in note[0]["message"]
        r.all_online()
        await r.state("req", "Running")


async def test_a_member_waiting_for_a_device_is_kept_then_replaced_when_one_stays_free() -> None:
    limits = rq.Limits(max_size=16, replace_waiting_after=60, recheck=0.1)
    async with rig(free=0, attached=2, limits=limits) as r:
        await r.submit("req", 1)
        await until(lambda: _async(len(r.members()) == 1), what="a member")
        r.play_composer("req-0", "Failed", reason="NoFreeDevice", error="no free A100")
        await until(
            lambda: _async(r.condition("req", rq.DEGRADED).get("reason") == "WaitingForDevice"),
            what="WaitingForDevice on the request",
        )
        assert [m["metadata"]["name"] for m in r.members()] == ["req-0"]  # kept, not churned
        r.publisher.update_inventory(inventory(["n1", "n2", "n3"], free=1, attached=1))
        r.clock[0] += 61  # the composer did not retry it within replace_waiting_after
        await until(
            lambda: _async([m["metadata"]["name"] for m in r.members()] == ["req-1"]),
            what="req-0 replaced",
        )


async def test_cohdi_members_are_adopted() -> None:
    async with rig() as r:
        r.kube.add(
            RESOURCES,
            {
                "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
                "kind": "ComposableResource",
                "metadata": {"name": "gpu-1234", "labels": {rq.MANAGED_BY: "req"}},
                "spec": {"type": "gpu", "model": A100, "target_node": "n1"},
                "status": {"state": "Online", "cdi_device_id": "gpu-0"},
            },
        )
        claim_made = {
            "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
            "kind": "ComposableResource",
            "metadata": {"name": "gpu-claimed"},  # the scaler's: no owner
            "spec": {"type": "gpu", "model": A100, "target_node": "n1"},
        }
        r.kube.add(RESOURCES, claim_made)
        req = await r.submit("req", 1, force_detach=True)

        async def adopted() -> Obj | None:
            obj = r.kube.get_obj(f"{RESOURCES}/gpu-1234") or {}
            refs = obj.get("metadata", {}).get("ownerReferences") or []
            done = refs and obj["spec"].get("force_detach") is True
            return obj if done else None

        obj = await until(adopted, what="gpu-1234 adopted")
        assert obj["metadata"]["ownerReferences"][0]["uid"] == req["metadata"]["uid"]
        assert obj["metadata"]["labels"] == rq.member_labels("req")
        st = await r.state("req", "Running")
        assert list(st["resources"]) == ["gpu-1234"]
        assert r.kube.count("create", "composableresources") == 0
        untouched = r.kube.get_obj(f"{RESOURCES}/gpu-claimed") or {}
        assert "ownerReferences" not in untouched["metadata"]
        assert r.kube.count("patch", "composableresources") == 2  # adoption, force_detach


# --- writes: order, retries, no cache writes ----------------------------------------------------


async def test_creates_are_not_repeated_while_the_informer_lags() -> None:
    """A member created but not yet delivered by the informer is counted from the controller's
    own record, not by writing into the informer's cache."""
    lagging: dict[str, FakeKube] = {}

    def own_client(kube: FakeKube) -> FakeKube:
        lagging["kube"] = kube.client()
        return lagging["kube"]

    async with rig(resources_kube=own_client) as r:
        await until(lambda: _async(r.resources.synced.is_set()), what="resources listed")
        lagging["kube"].stalled = True
        # A watch already waiting for its next line still takes one; it looks at `stalled`
        # again after each bookmark interval (0.05 s) — give it a few.
        await asyncio.sleep(0.3)
        await r.submit("req", 2)
        await until(lambda: _async(len(r.members()) == 2), what="two members")
        for _ in range(5):
            r.requester.queue.enqueue("req")
            await asyncio.sleep(0.02)
        assert r.kube.count("create", "composableresources") == 2
        assert r.resources.store == {}  # nothing written into the informer's cache
        lagging["kube"].stalled = False
        r.all_online()
        await r.state("req", "Running", within=60)
        assert r.kube.count("create", "composableresources") == 2


async def test_a_transient_create_failure_is_retried_without_writing_status_first() -> None:
    async with rig() as r:
        r.kube.fail("POST", RESOURCES, status=503, times=1)
        await r.submit("req", 2)
        await until(lambda: _async(len(r.members()) == 2), what="two members after a retry")
        r.all_online()
        await r.state("req", "Running")
        assert r.kube.count("create", "composableresources") == 3  # one failed, two made


async def test_a_refused_create_is_a_condition_not_a_silent_drop() -> None:
    def refuse(op: str, new: Obj, old: Obj | None) -> None:
        if op == "CREATE":
            raise Rejected("metadata.name: Invalid value: nope")

    async with rig() as r:
        r.kube.admit("composableresources", refuse)
        await r.submit("req", 2)
        st = await r.state("req", "Failed")
        assert "nope" in st["error"]
        assert r.condition("req", rq.DEGRADED)["reason"] == rq.CREATE_FAILED
        assert st["resources"] == {}
        await until(lambda: _async(r.events(rq.CREATE_FAILED)), what="a CreateFailed event")


async def test_a_name_taken_by_someone_else_is_skipped() -> None:
    lagging: dict[str, FakeKube] = {}

    def own_client(kube: FakeKube) -> FakeKube:
        lagging["kube"] = kube.client()
        return lagging["kube"]

    async with rig(resources_kube=own_client) as r:
        await until(lambda: _async(r.resources.synced.is_set()), what="resources listed")
        lagging["kube"].stalled = True  # the informer has not seen the stranger's req-0
        await asyncio.sleep(0.3)  # see test_creates_are_not_repeated_while_the_informer_lags
        r.kube.add(
            RESOURCES,
            {
                "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
                "kind": "ComposableResource",
                "metadata": {"name": "req-0"},
                "spec": {"type": "gpu", "model": A100, "target_node": "n2"},
            },
        )
        await r.submit("req", 1)
        await until(
            lambda: _async(r.kube.get_obj(f"{RESOURCES}/req-1") is not None),
            what="req-1 made instead of the stranger's req-0",
        )
        assert "ownerReferences" not in (r.kube.get_obj(f"{RESOURCES}/req-0") or {})["metadata"]
        lagging["kube"].stalled = False


async def test_status_is_written_once_and_the_event_after_it() -> None:
    async with rig() as r:
        r.kube.fail("PATCH", f"{REQUESTS}/req/status", status=503, times=1)
        await r.submit("req", 1)
        await until(lambda: _async(len(r.members()) == 1), what="a member")
        r.all_online()
        await r.state("req", "Running")
        await asyncio.sleep(0.2)  # let any further pass happen
        assert len(r.events(rq.RUNNING)) == 1
        assert len(r.events("Creating")) == 1


async def test_pending_creates_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    """A created member the informer never delivers (deleted before it could) stops counting."""
    monkeypatch.setattr(requesting, "PENDING_TTL", 0.0)
    async with rig() as r:
        await r.submit("req", 1)
        await until(lambda: _async(len(r.members()) == 1), what="a member")
        memory = r.requester._memory["req"]
        memory.pending["req-9"] = ({"metadata": {"name": "req-9"}}, 0.0)
        r.requester.queue.enqueue("req")
        await until(lambda: _async("req-9" not in memory.pending), what="the stale record gone")


async def test_a_replacement_is_not_repeated_while_the_informer_lags() -> None:
    """The member deleted for a replacement counts as gone (and its successor as made) until
    the informer says so: more passes neither delete nor create again."""
    lagging: dict[str, FakeKube] = {}

    def own_client(kube: FakeKube) -> FakeKube:
        lagging["kube"] = kube.client()
        return lagging["kube"]

    limits = rq.Limits(max_size=16, replace_failed_after=3600)
    async with rig(resources_kube=own_client, limits=limits) as r:
        await r.submit("req", 1)
        await until(lambda: _async(len(r.members()) == 1), what="a member")
        await until(lambda: _async(len(r.resources.store) == 1), what="the informer has it")
        r.kube.edit(  # a finalizer, as the composer's: deleting takes a while
            f"{RESOURCES}/req-0", lambda o: o["metadata"].update(finalizers=["composer"])
        )
        r.play_composer("req-0", "Failed", reason="DeviceFailed", error="gone")
        await until(
            lambda: _async(r.requester._memory["req"].failed_since != {}),
            what="the failure seen",
        )
        lagging["kube"].stalled = True
        await asyncio.sleep(0.3)  # see test_creates_are_not_repeated_while_the_informer_lags
        r.requester.limits = rq.Limits(max_size=16, replace_failed_after=0)  # due now
        r.requester.queue.enqueue("req")
        await until(
            lambda: _async(r.kube.count("create", "composableresources") == 2),
            what="the replacement made",
        )
        for _ in range(5):
            r.requester.queue.enqueue("req")
            await asyncio.sleep(0.02)
        assert r.kube.count("create", "composableresources") == 2
        assert r.kube.count("delete", "composableresources") == 1
        lagging["kube"].stalled = False


async def test_a_member_a_previous_leader_made_is_taken_over() -> None:
    """Create answers AlreadyExists for a member that is the request's (made before this
    process's informer saw it): it is counted, not made again under another name."""
    clients: dict[str, FakeKube] = {}

    def client_for(key: str) -> Callable[[FakeKube], FakeKube]:
        def make(kube: FakeKube) -> FakeKube:
            clients[key] = kube.client()
            return clients[key]

        return make

    async with rig(resources_kube=client_for("res"), requests_kube=client_for("req")) as r:
        await until(lambda: _async(r.resources.synced.is_set()), what="resources listed")
        clients["res"].stalled = clients["req"].stalled = True
        await asyncio.sleep(0.3)  # see test_creates_are_not_repeated_while_the_informer_lags
        req = await r.submit("req", 1)
        r.kube.edit(f"{REQUESTS}/req", lambda o: o["metadata"].update(finalizers=[FINALIZER]))
        r.kube.add(
            RESOURCES,
            {
                "apiVersion": "cro.hpsys.ibm.ie.com/v1alpha1",
                "kind": "ComposableResource",
                "metadata": {
                    "name": "req-0",
                    "labels": rq.member_labels("req"),
                    "ownerReferences": [
                        rq.owner_reference(
                            "cro.hpsys.ibm.ie.com/v1alpha1", "req", req["metadata"]["uid"]
                        )
                    ],
                },
                "spec": {"type": "gpu", "model": A100, "target_node": "n1"},
            },
        )
        clients["req"].stalled = False
        await until(
            lambda: _async(r.kube.count("create", "composableresources") == 1),
            what="a create answered AlreadyExists",
        )
        await until(lambda: _async("req-0" in r.status("req").get("resources", {})), what="req-0")
        assert [m["metadata"]["name"] for m in r.members()] == ["req-0"]
        clients["res"].stalled = False
        r.all_online()
        await r.state("req", "Running")


async def test_a_request_gone_is_nothing_to_do_and_a_bug_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with rig() as r:
        await r.requester.handle("ghost")  # deleted before its turn came
        assert r.kube.count("create", "composableresources") == 0
        create = r.kube.create
        calls = []

        async def buggy(path: str, body: Obj) -> Obj:
            if path == RESOURCES and not calls:
                calls.append(path)
                raise ValueError("a bug")  # not an AgentError: logged, retried by the queue
            return await create(path, body)

        monkeypatch.setattr(r.kube, "create", buggy)
        await r.submit("req", 1)
        await until(lambda: _async(len(r.members()) == 1), what="a member after the bug")
        assert calls == [RESOURCES]


async def _async(value: Any) -> Any:
    return value
