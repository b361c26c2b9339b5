"""The main job on the embedded default, as far as the product has come: start the local control
plane and prove that the Kubernetes side of the design is there — resource.k8s.io/v1 served, a
DeviceClass for our driver accepted, and a pool ResourceSlice with per-device node selection and
binding conditions stored *without dropped fields* (the feature gates are on). The fabric, the
cluster role and the simulated nodes join this flow as they land.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import time
from typing import Any

from agent import errors, settings
from agent.devcluster import local
from agent.devcluster.controlplane import ControlPlane
from agent.kube.client import Kube, path_of
from agent.kube.objects import dropped_fields

DRIVER = "composable.cohdi.io"


def _say(text: str) -> None:
    print(text, flush=True)


def probe_slice(fabric: str) -> dict[str, Any]:
    """A pool slice with one free fabric device, shaped exactly as the pool publisher writes it."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": f"demo-probe-{fabric}"},
        "spec": {
            "driver": DRIVER,
            "pool": {"name": fabric, "generation": 1, "resourceSliceCount": 1},
            "perDeviceNodeSelection": True,
            "devices": [
                {
                    "name": "gpu-probe-0",
                    "attributes": {"productName": {"string": "NVIDIA-A100-PCIE-40GB"}},
                    "bindsToNode": True,
                    "bindingConditions": ["FabricDeviceReady"],
                    "bindingFailureConditions": ["FabricDeviceFailed"],
                    "nodeSelector": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "cohdi.io/fabric", "operator": "In", "values": [fabric]}
                                ]
                            }
                        ]
                    },
                }
            ],
        },
    }


async def run(cfg: settings.Settings, *, keep: bool) -> int:
    started = time.monotonic()
    binaries = await asyncio.to_thread(local.binaries, cfg.cache_dir)
    state_dir = cfg.dev_state_dir.parent / "demo"
    shutil.rmtree(state_dir, ignore_errors=True)  # every demo starts from an empty cluster
    cp = ControlPlane(
        binaries=binaries,
        state_dir=state_dir,
        binding_timeout_s=cfg.dev.binding_timeout,
        progress=local.progress,
    )
    try:
        await asyncio.to_thread(cp.start)
        async with await Kube.connect(kubeconfig=str(cp.kubeconfig)) as kube:
            await _check(kube)
        _say(f"\nembedded default is up in {time.monotonic() - started:.1f} s: {cp.server}")
        _say(f"  export KUBECONFIG={cp.kubeconfig}")
        if keep:
            _say("  running until Ctrl-C")
            await asyncio.Event().wait()
    finally:
        await asyncio.to_thread(cp.stop)
        _say("control plane stopped")
    return 0


async def _check(kube: Kube) -> None:
    version = await kube.get("/version")
    _say(f"kube-apiserver {version.get('gitVersion')} ({version.get('platform')})")
    resources = await kube.get("/apis/resource.k8s.io/v1")
    served = sorted(r["name"] for r in resources["resources"] if "/" not in r["name"])
    _say(f"resource.k8s.io/v1 serves: {', '.join(served)}")
    device_class = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": f"gpu.{DRIVER}"},
        "spec": {"selectors": [{"cel": {"expression": f'device.driver == "{DRIVER}"'}}]},
    }
    classes = path_of(group="resource.k8s.io", version="v1", plural="deviceclasses")
    with contextlib.suppress(errors.KubeAlreadyExists):
        await kube.create(classes, device_class)
    _say(f"DeviceClass gpu.{DRIVER} selects driver {DRIVER}")
    slices = path_of(group="resource.k8s.io", version="v1", plural="resourceslices")
    sent = probe_slice("demo-fabric")
    stored = await kube.create(slices, sent)
    try:
        missing = dropped_fields(sent["spec"], stored["spec"])
        if missing:
            print(
                "the API server dropped fields of a pool ResourceSlice: "
                + ", ".join(missing)
                + "\n"
                "turn on the feature gates DRADeviceBindingConditions and DRAPartitionableDevices "
                "on kube-apiserver and kube-scheduler (default on from Kubernetes 1.36)",
                file=sys.stderr,
            )
            raise errors.DevClusterError("binding conditions are not served by this API server")
        _say("pool ResourceSlice with perDeviceNodeSelection + bindingConditions stored intact")
    finally:
        await kube.delete(f"{slices}/{sent['metadata']['name']}")
