"""CoHDI's `dra-attributes` on our pool devices, against the real API server's ResourceSlice
validation: every key our ConfigMap check accepts is a device attribute the server takes (32 of
them on one device, values cut to 64 bytes), and the label-style keys CoHDI's own check lets
through but the server refuses are the ones our check refuses, naming the key."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from agent import errors
from agent.controllers.publishing import SLICES
from agent.kube.client import Kube
from agent.model import cohdi
from agent.model import vendoring as vm

pytestmark = pytest.mark.controlplane

W = "ConfigMap composable-dra/composable-dra-dds"
ACCEPTED = ["productName", "type", "uuid", "gpu.nvidia.com/architecture", "x_1", "c" * 32]
REFUSED = ["product-name", "a.b", "c" * 33, "gpu.nvidia.com/pci-bus"]


def _item(attributes: dict[str, str]) -> dict[str, Any]:
    return {
        "index": 0,
        "cdi-model-name": "a100",
        "dra-attributes": {"productName": "NVIDIA A100 80GB PCIe", **attributes},
        "driver-name": "gpu.nvidia.com",
        "k8s-device-name": "nvidia-a100",
        "cannot-coexist-with": [],
    }


def _slice(driver: str, attributes: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": f"{driver}-{uuid.uuid4().hex[:6]}"},
        "spec": {
            "driver": driver,
            "allNodes": True,
            "pool": {"name": "p", "generation": 1, "resourceSliceCount": 1},
            "devices": [{"name": "d", "attributes": attributes}],
        },
    }


async def _server_takes(kube: Kube, driver: str, key: str) -> str:
    """ "" when the API server takes a slice with attribute `key`, else its answer."""
    try:
        created = await kube.create(SLICES, _slice(driver, {key: {"string": "v"}}))
    except errors.KubeError as exc:
        return str(exc)
    await kube.delete(f"{SLICES}/{created['metadata']['name']}")
    return ""


def _we_take(key: str) -> str:
    """ "" when our ConfigMap check takes `key`, else the setting it names."""
    try:
        cohdi.parse_devices("cohdi.io", [_item({key: "v"})], where=W)
    except errors.ConfigError as exc:
        return exc.setting
    return ""


async def test_our_check_of_attribute_names_is_the_api_servers(kube: Kube) -> None:
    driver = f"a{uuid.uuid4().hex[:6]}.cohdi.io"
    for key in ACCEPTED:
        assert await _server_takes(kube, driver, key) == "", key
        assert _we_take(key) == "", key
    for key in REFUSED:
        assert await _server_takes(kube, driver, key) != "", key
        assert _we_take(key) == f"{W} device-info[0].dra-attributes.{key}"


async def test_a_pool_device_with_cohdis_attributes_is_taken(kube: Kube) -> None:
    """The chart's attributes, 31 more (CoHDI's limit is 32 with productName), a value of 64
    characters that is more than 64 bytes, and ours beside them: the server takes the entry."""
    many = {f"a{i}": "é" * 64 for i in range(31)}
    devices = cohdi.parse_devices("cohdi.io", [_item(many)], where=W)
    entry = vm.vendor_entry(
        {
            "name": "d",
            "attributes": {
                "productName": {"string": "a100"},
                "fabric": {"string": "0"},
                "attached": {"bool": False},
            },
            "bindsToNode": True,
        },
        devices.devices[0].attributes,
    )
    driver = f"a{uuid.uuid4().hex[:6]}.cohdi.io"
    created = await kube.create(SLICES, _slice(driver, entry["attributes"]))
    try:
        got = created["spec"]["devices"][0]["attributes"]
        assert got["productName"] == {"string": "NVIDIA A100 80GB PCIe"}
        assert len(got) == 32
    finally:
        await kube.delete(f"{SLICES}/{created['metadata']['name']}")
