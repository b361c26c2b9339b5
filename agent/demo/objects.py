"""Kubernetes objects the demo, the full-stack test and the benchmarks create the same way: a
simulated kubelet's Node, a one-GPU ResourceClaim with its Pod, and the clean-up kubelet and
kube-controller-manager would do when a pod ends (neither runs on the local control plane)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from typing import Any

from agent import errors
from agent.kube.client import Kube, Obj, path_of
from agent.manifests.cluster import device_class_name
from agent.model.pool import ATTACHED_ATTRIBUTE

NS = "default"
NODES = path_of(group="", version="v1", plural="nodes")
CLAIMS = path_of(group="resource.k8s.io", version="v1", plural="resourceclaims", namespace=NS)
PODS = path_of(group="", version="v1", plural="pods", namespace=NS)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def make_node(
    kube: Kube, name: str, labels: dict[str, str] | None = None, *, pods: int = 110
) -> None:
    """A Node as a kubelet registers it, Ready and untainted. NB: the TaintNodesByCondition
    admission plugin gives a new Node a not-ready taint that only the node lifecycle controller
    (kube-controller-manager, not running here) would lift; we lift it."""
    with contextlib.suppress(errors.KubeAlreadyExists):
        await kube.create(
            NODES,
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": labels or {}},
            },
        )
    await kube.patch(f"{NODES}/{name}", {"spec": {"taints": None}})
    cap = {"pods": str(pods), "cpu": "256", "memory": "1Ti"}
    await kube.patch(
        f"{NODES}/{name}/status",
        {
            "status": {
                "capacity": cap,
                "allocatable": cap,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "simulated",
                        "lastHeartbeatTime": _now(),
                        "lastTransitionTime": _now(),
                    }
                ],
            }
        },
    )


def gpu_claim(name: str, driver: str, model: str, *, prefer_attached: bool = False) -> Obj:
    """A claim for one GPU of `model`. `prefer_attached` writes it as a prioritized list
    (`firstAvailable`): first a GPU already on a node (`attached == true`), else any. Then
    kube-scheduler's DynamicResources score ranks nodes where the first choice fits higher, so
    a burst goes to the nodes holding idle attached (warm) GPUs; with a plain `exactly` request
    every feasible node scores the same and the node is a coin toss."""
    klass = device_class_name(driver)
    by_model = {"cel": {"expression": f'device.attributes["{driver}"].productName == "{model}"'}}
    request: dict[str, Any] = {
        "name": "gpu",
        "exactly": {"deviceClassName": klass, "selectors": [by_model]},
    }
    if prefer_attached:
        on_node = {"cel": {"expression": f'device.attributes["{driver}"].{ATTACHED_ATTRIBUTE}'}}
        request = {
            "name": "gpu",
            "firstAvailable": [
                {"name": "attached", "deviceClassName": klass, "selectors": [by_model, on_node]},
                {"name": "any", "deviceClassName": klass, "selectors": [by_model]},
            ],
        }
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name},
        "spec": {"devices": {"requests": [request]}},
    }


def gpu_pod(name: str, node_selector: dict[str, str] | None = None) -> Obj:
    spec: dict[str, Any] = {
        "containers": [
            {"name": "cuda", "image": "nvidia/cuda", "resources": {"claims": [{"name": "gpu"}]}}
        ],
        "resourceClaims": [{"name": "gpu", "resourceClaimName": name}],
    }
    if node_selector:
        spec["nodeSelector"] = node_selector
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


async def submit(
    kube: Kube,
    name: str,
    driver: str,
    model: str,
    node_selector: dict[str, str] | None = None,
    *,
    prefer_attached: bool = False,
) -> None:
    """A pod asking for one GPU of `model` through its own ResourceClaim (`gpu_claim`)."""
    await kube.create(CLAIMS, gpu_claim(name, driver, model, prefer_attached=prefer_attached))
    await kube.create(PODS, gpu_pod(name, node_selector))


async def finish(kube: Kube, name: str) -> None:
    """The pod is done: delete it at once, drop it from the claim, deallocate and delete the claim
    (kubelet's and kube-controller-manager's work)."""
    with contextlib.suppress(errors.KubeNotFound):
        await kube.request("DELETE", f"{PODS}/{name}", body={"gracePeriodSeconds": 0})
    for _ in range(8):
        claim = await kube.get(f"{CLAIMS}/{name}")
        claim["status"] = {
            **(claim.get("status") or {}),
            "reservedFor": None,
            "allocation": None,
            "devices": None,
        }
        try:
            await kube.replace(f"{CLAIMS}/{name}/status", claim)
            break
        except errors.KubeConflict:  # the scaler wrote meanwhile: read again
            await asyncio.sleep(0.05)
    await kube.patch(f"{CLAIMS}/{name}", {"metadata": {"finalizers": None}})
    with contextlib.suppress(errors.KubeNotFound):
        await kube.delete(f"{CLAIMS}/{name}")
