"""CoHDI's ComposabilityRequest, unchanged, reconciled into attached devices; invalid ones are
rejected by the CRD schema with the server's message; bounds, long names, scaling back up and
members waiting for a device, end to end (real API server, composer, fabric emulator)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml

from agent import errors
from agent.kube.client import Obj
from agent.kube.resources import REQUESTS, RESOURCES
from agent.model import requests as rq
from agent.model.fabric import DeviceState
from tests.cluster.conftest import A100, World
from tests.waiting import until

pytestmark = pytest.mark.controlplane

# As a CoHDI user writes it (CoHDI's own ComposabilityRequest fields), nothing of ours in it.
MANIFEST = """
apiVersion: cro.hpsys.ibm.ie.com/v1alpha1
kind: ComposabilityRequest
metadata:
  name: {name}
spec:
  resource:
    type: gpu
    model: {model}
    size: 2
    force_detach: false
    allocation_policy: samenode
    target_node: {node}
    other_spec:
      milli_cpu: 0
      memory: 0
      ephemeral_storage: 0
      allowed_pod_number: 0
"""


@pytest.mark.parametrize("world", [{"nodes": 2, "gpus": 4}], indirect=True)
async def test_cohdi_request_is_reconciled_and_cleaned_up(world: World) -> None:
    role = await world.start_role()
    await asyncio.wait_for(role.publisher.synced.wait(), 30)
    name = f"req-{world.suffix}"
    node = world.nodes[1]
    await world.kube.create(
        REQUESTS, yaml.safe_load(MANIFEST.format(name=name, model=A100, node=node))
    )

    async def running() -> dict | None:  # type: ignore[type-arg]
        req = await world.kube.get(f"{REQUESTS}/{name}")
        return req if (req.get("status") or {}).get("state") == "Running" else None

    req = await until(running, what="the request to be Running", timeout=30)
    members = req["status"]["resources"]
    assert len(members) == 2
    assert {m["node_name"] for m in members.values()} == {node}
    assert all(m["state"] == "Online" and m["cdi_device_id"] for m in members.values())
    attached = {
        d.spec.id: d.machine
        for d in world.emulator.state.devices.values()
        if d.state == DeviceState.ATTACHED
    }
    assert attached == {m["cdi_device_id"]: world.machine_of(node) for m in members.values()}
    assert req["status"]["scalarResource"]["model"] == A100

    await world.kube.delete(f"{REQUESTS}/{name}")

    async def gone() -> bool:
        try:
            await world.kube.get(f"{REQUESTS}/{name}")
        except errors.KubeNotFound:
            return all(d.state == DeviceState.FREE for d in world.emulator.state.devices.values())
        return False

    await until(gone, what="the request, its resources and attachments to be gone", timeout=30)
    left = [
        o for o in (await world.kube.get(RESOURCES))["items"] if o["spec"]["target_node"] == node
    ]
    assert left == []


@pytest.mark.parametrize("world", [{"nodes": 1, "gpus": 1}], indirect=True)
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"size": -1},
            "spec.resource.size: Invalid value: -1: "
            "spec.resource.size in body should be greater than or equal to 0",
        ),
        (
            {"type": "fpga"},
            'spec.resource.type: Unsupported value: "fpga": supported values: "gpu", "cxlmemory"',
        ),
        (
            {"model": ""},
            'spec.resource.model: Invalid value: "": '
            "spec.resource.model in body should be at least 1 chars long",
        ),
        ({"allocation_policy": "anywhere"}, "spec.resource.allocation_policy: Unsupported value"),
        (
            # Reproduction: CoHDI's CRD has no maximum; its operator made 698, then 1,824
            # ComposableResources in 25 s for this request on 8 GPUs.
            {"size": 1_000_000},
            "spec.resource.size: Invalid value: 1000000: "
            "spec.resource.size in body should be less than or equal to 1024",
        ),
    ],
)
async def test_invalid_requests_are_rejected_by_the_schema(
    world: World, change: dict, message: str
) -> None:  # type: ignore[type-arg]
    doc = yaml.safe_load(
        MANIFEST.format(name=f"bad-{world.suffix}", model=A100, node=world.nodes[0])
    )
    doc["spec"]["resource"].update(change)
    with pytest.raises(errors.KubeInvalid) as info:
        await world.kube.create(REQUESTS, doc)
    assert message in str(info.value)


# --- bounds, names, scaling back up, waiting members --------------------------------------------


def request_doc(name: str, node: str, size: int, model: str = A100) -> Obj:
    doc: Obj = yaml.safe_load(MANIFEST.format(name=name, model=model, node=node))
    doc["spec"]["resource"]["size"] = size
    return doc


@contextlib.asynccontextmanager
async def requested(world: World, doc: Obj) -> AsyncIterator[str]:
    """Create a request; at the end delete it and wait until it is gone (the role still runs),
    so no request outlives its world's nodes."""
    name = doc["metadata"]["name"]
    await world.kube.create(REQUESTS, doc)
    try:
        yield name
    finally:
        with contextlib.suppress(errors.KubeNotFound):
            await world.kube.delete(f"{REQUESTS}/{name}")

        async def gone() -> bool:
            try:
                await world.kube.get(f"{REQUESTS}/{name}")
            except errors.KubeNotFound:
                return True
            return False

        try:
            await until(gone, what=f"request {name[:40]}... gone", timeout=60)
        finally:
            with contextlib.suppress(errors.KubeNotFound):
                await world.kube.patch(f"{REQUESTS}/{name}", {"metadata": {"finalizers": None}})


async def status_of(world: World, name: str) -> dict[str, Any]:
    return dict((await world.kube.get(f"{REQUESTS}/{name}")).get("status") or {})


def condition(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), {})


async def reaches(
    world: World, name: str, state: str, *, within: float = 60, size: int | None = None
) -> dict[str, Any]:
    """The request's status once it is `state` (and, given `size`, for that many members)."""

    async def probe() -> dict[str, Any] | None:
        st = await status_of(world, name)
        if size is not None and len(st.get("resources") or {}) != size:
            return None
        return st if st.get("state") == state else None

    return await until(probe, what=f"{name[:40]} {state}", timeout=within)


async def owned(world: World, name: str, uid: str) -> list[Obj]:
    items = (await world.kube.get(RESOURCES))["items"]
    return [o for o in items if rq.owned_by(o, name, uid)]


async def events_of(world: World, name: str) -> list[Obj]:
    found = await world.kube.get(
        "/api/v1/namespaces/default/events", fieldSelector=f"involvedObject.name={name}"
    )
    return list(found["items"])


def attached(world: World) -> set[str]:
    return {
        d.spec.id for d in world.emulator.state.devices.values() if d.state == DeviceState.ATTACHED
    }


@pytest.mark.parametrize("world", [{"nodes": 1, "gpus": 8}], indirect=True)
async def test_a_size_over_the_setting_is_refused_with_a_condition(world: World) -> None:
    world.cfg = dataclasses.replace(
        world.cfg, cluster=dataclasses.replace(world.cfg.cluster, request_max_size=4)
    )
    role = await world.start_role()
    await asyncio.wait_for(role.publisher.synced.wait(), 30)
    async with requested(world, request_doc(f"big-{world.suffix}", world.nodes[0], 5)) as name:
        st = await reaches(world, name, "Failed")
        refused = condition(st, rq.REFUSED)
        assert (refused["status"], refused["reason"]) == ("True", rq.TOO_LARGE)
        assert "above this agent's limit of 4 (--request-max-size)" in st["error"]
        warning = await until(
            lambda: _events(world, name, rq.TOO_LARGE), what="the TooLarge Warning Event"
        )
        assert warning[0]["type"] == "Warning"
        uid = (await world.kube.get(f"{REQUESTS}/{name}"))["metadata"]["uid"]
        assert await owned(world, name, uid) == []
        assert attached(world) == set()
        print(
            f"\nsize 5 over --request-max-size 4: {st['state']}, {refused['reason']}: {st['error']}"
        )


@pytest.mark.parametrize("world", [{"nodes": 1, "gpus": 2}], indirect=True)
async def test_a_request_with_a_253_character_name_runs(world: World) -> None:
    # Reproduction: a name of 64+ characters made `app.kubernetes.io/managed-by=<name>`, which
    # the API server refuses (422); the request then did nothing at all.
    role = await world.start_role()
    await asyncio.wait_for(role.publisher.synced.wait(), 30)
    long = f"r{world.suffix}-" + "x" * 245
    assert len(long) == 253
    async with requested(world, request_doc(long, world.nodes[0], 2)) as name:
        st = await reaches(world, name, "Running")
        assert all(m["state"] == "Online" for m in st["resources"].values())
        uid = (await world.kube.get(f"{REQUESTS}/{name}"))["metadata"]["uid"]
        members = await owned(world, name, uid)
        assert len(members) == 2
        for m in members:
            assert len(m["metadata"]["name"]) <= 253
            assert m["metadata"]["labels"][rq.OWNER_LABEL] == rq.owner_label(name)
            assert m["metadata"]["labels"][rq.MANAGED_BY] == "cohdi-agent"
        assert len(attached(world)) == 2
        running = await until(lambda: _events(world, name, rq.RUNNING), what="Running Event")
        print(
            f"\n253-character request: {st['state']}, members "
            f"{[m['metadata']['name'][-16:] for m in members]}, "
            f"label {rq.owner_label(name)}, Event {running[0]['reason']}"
        )


@pytest.mark.parametrize("world", [{"nodes": 1, "gpus": 1}], indirect=True)
async def test_a_request_scales_to_zero_and_back_up(world: World) -> None:
    # Reproduction: size 1 -> 0 -> 1 ended `Failed NoFreeDevice` while the fabric showed the
    # GPU free.
    role = await world.start_role()
    await asyncio.wait_for(role.publisher.synced.wait(), 30)
    async with requested(world, request_doc(f"again-{world.suffix}", world.nodes[0], 1)) as name:
        await reaches(world, name, "Running")
        path = f"{REQUESTS}/{name}"
        await world.kube.patch(path, {"spec": {"resource": {"size": 0}}})

        async def emptied() -> bool:
            st = await status_of(world, name)
            return st.get("state") == "Running" and not st.get("resources") and not attached(world)

        await until(emptied, what="size 0: no member, the GPU detached", timeout=60)
        await world.kube.patch(path, {"spec": {"resource": {"size": 1}}})
        st = await reaches(world, name, "Running", size=1)
        (member,) = st["resources"].values()
        assert member["state"] == "Online"
        assert attached(world) == {member["cdi_device_id"]}
        print(f"\n1 -> 0 -> 1: {st['state']}, member {member['state']} {member['cdi_device_id']}")


@pytest.mark.parametrize("world", [{"nodes": 1, "gpus": 8}], indirect=True)
async def test_eight_of_eight_free_gpus_are_all_attached(world: World) -> None:
    # Reproduction: with 8 free A100s a request for 8 got 6.
    role = await world.start_role()
    await asyncio.wait_for(role.publisher.synced.wait(), 30)
    async with requested(world, request_doc(f"all-{world.suffix}", world.nodes[0], 8)) as name:
        st = await reaches(world, name, "Running", within=90)
        devices = {m["cdi_device_id"] for m in st["resources"].values()}
        assert len(devices) == 8
        assert attached(world) == devices
        print(f"\n8 of 8: {st['state']}, {len(devices)} distinct devices attached")


@pytest.mark.parametrize("world", [{"nodes": 2, "gpus": 1}], indirect=True)
async def test_a_member_waiting_for_a_device_goes_online_when_one_frees(world: World) -> None:
    role = await world.start_role()
    await asyncio.wait_for(role.publisher.synced.wait(), 30)
    first_doc = request_doc(f"first-{world.suffix}", world.nodes[0], 1)
    async with requested(world, first_doc) as first:
        await reaches(world, first, "Running")
        async with requested(
            world, request_doc(f"second-{world.suffix}", world.nodes[1], 1)
        ) as second:

            async def waiting() -> dict[str, Any] | None:
                st = await status_of(world, second)
                degraded = condition(st, rq.DEGRADED)
                return st if degraded.get("reason") == rq.WAITING_FOR_DEVICE else None

            st = await until(waiting, what="the second request waiting for a device", timeout=60)
            (before,) = st["resources"]
            assert st["resources"][before]["state"] == "Failed"
            print(f"\nwaiting: {condition(st, rq.DEGRADED)['message']}")
            await world.kube.delete(f"{REQUESTS}/{first}")  # its GPU comes free
            st = await reaches(world, second, "Running", within=120)
            (after,) = st["resources"]
            assert st["resources"][after]["state"] == "Online"
            assert attached(world) == {st["resources"][after]["cdi_device_id"]}
            how = "retried by the composer" if after == before else f"replaced by {after}"
            print(f"NoFreeDevice member {before}: Online, {how}")


async def _events(world: World, name: str, reason: str) -> list[Obj]:
    return [e for e in await events_of(world, name) if e["reason"] == reason]
