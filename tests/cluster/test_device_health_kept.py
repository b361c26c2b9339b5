"""The node's word kept on a Node (`agent.model.health.kept_key`/`kept_value`) as the real API
server validates it: the annotation key is a qualified name for any device id (long ones
hashed), the value is taken, merge-patching null removes it, and the word reads back. And the
publisher's device-taint probe (`agent.controllers.taintprobe`) as the real API server answers
it."""

from __future__ import annotations

import uuid

import pytest

from agent.controllers import taintprobe
from agent.controllers.publishing import NODES, SLICES
from agent.kube.client import Kube
from agent.model import health as healthmodel

pytestmark = [pytest.mark.controlplane]


@pytest.mark.parametrize(
    "device", ["gpu-0", "fab.A100.free-0", "fabric0-gpu-" + "x" * 200, "GPU_1/2:3"]
)
async def test_the_api_server_takes_and_drops_a_kept_word(kube: Kube, device: str) -> None:
    node = f"kept-{uuid.uuid4().hex[:8]}"
    await kube.create(NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
    try:
        driver = "gpu.cohdi.io"
        word = healthmodel.Word(False, "Xid79", "GPU has fallen off the bus " * 40)
        key = healthmodel.kept_key(driver, device)
        value = healthmodel.kept_value(driver, device, word, 1_800_000_000.0)
        await kube.patch(f"{NODES}/{node}", {"metadata": {"annotations": {key: value}}})
        stored = (await kube.get(f"{NODES}/{node}"))["metadata"]["annotations"]
        kept = healthmodel.kept_word(key, stored[key], driver_label=driver)
        assert kept is not None
        assert kept[0] == device
        assert kept[1].reason == "Xid79"
        await kube.patch(f"{NODES}/{node}", {"metadata": {"annotations": {key: None}}})
        after = (await kube.get(f"{NODES}/{node}"))["metadata"].get("annotations") or {}
        assert key not in after
    finally:
        await kube.delete(f"{NODES}/{node}")


async def test_the_taint_probe_is_answered_and_leaves_nothing(kube: Kube) -> None:
    """The API server (DRADeviceTaints on, the 1.36 default) keeps the probe's taint; the probe
    slice, which no node could take, is gone afterwards."""
    stored, name = await taintprobe.taints_stored(kube)
    assert stored is True
    left = await kube.get(SLICES, fieldSelector=f"spec.driver={taintprobe.PROBE_DRIVER}")
    assert [s["metadata"]["name"] for s in left["items"]] == []
    assert name.startswith("cohdi-taint-probe-")
