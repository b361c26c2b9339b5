"""The DeviceClass for our GPUs, for a driver name (the RBAC is `agent.manifests.rbac`)."""

from __future__ import annotations

from typing import Any


def device_class_name(driver: str) -> str:
    """The DeviceClass that selects the driver's GPUs: `gpu.<driver>` (`gpu.composable.cohdi.io`
    for the default driver), or the driver name itself when its first label already says gpu
    (driver `gpu.example.com` -> class `gpu.example.com`, never `gpu.gpu.example.com`)."""
    return driver if driver.split(".", 1)[0] == "gpu" else f"gpu.{driver}"


def device_class(driver: str) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": device_class_name(driver)},
        "spec": {"selectors": [{"cel": {"expression": f'device.driver == "{driver}"'}}]},
    }
