"""Vendor-driver mode on the real kube-apiserver + kube-scheduler and the fabric emulator: a pod
that asks for the vendor's DeviceClass is allocated one of our pool devices (published under the
vendor's driver name), the GPU is attached once, the stand-in vendor driver publishes it in its
node-local slice (as NVIDIA's kubelet plugin does for a GPU it finds), we set
`FabricDeviceReschedule` once, and the scheduler reallocates the claim onto the vendor's device
and binds the pod."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.controllers.publishing import SLICES
from agent.fabric.emulator.state import Device, MachineSpec
from agent.kube.client import Obj
from agent.kube.resources import RESOURCES
from agent.kube.watching import Event, Informer
from agent.model import vendoring as vm
from agent.model.cohdi import PoolAttributes, parse_devices
from agent.model.fabric import DeviceState
from agent.model.objects import fabric_device
from tests.cluster.conftest import A100, BACKENDS, CLAIMS, PODS, World, world_config
from tests.waiting import until

pytestmark = [
    pytest.mark.controlplane,
    pytest.mark.parametrize("backend", BACKENDS, indirect=True),
]

DEVICE_CLASSES = "/apis/resource.k8s.io/v1/deviceclasses"


class StandInVendor:
    """The vendor's kubelet plugin, as far as the cluster sees it: when a GPU appears on a
    node's machine (the emulator's hot-plug hook), a node-local ResourceSlice of the vendor's
    driver lists it with its `uuid` attribute."""

    def __init__(self, w: World, vendor: str, product: str = A100) -> None:
        self.w = w
        self.vendor = vendor
        self.product = product
        self.node_of = {w.machine_of(n): n for n in w.nodes}
        self.tasks: list[asyncio.Task[Any]] = []
        w.emulator.state.on_appear.append(self._appeared)

    def _appeared(self, dev: Device, machine: MachineSpec) -> None:
        node = self.node_of.get(machine.id)
        if node is not None:
            self.tasks.append(asyncio.get_running_loop().create_task(self._publish(node, dev)))

    async def _publish(self, node: str, dev: Device) -> None:
        await self.w.kube.create(
            SLICES,
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "ResourceSlice",
                "metadata": {"name": f"{node}-{self.vendor}"},
                "spec": {
                    "driver": self.vendor,
                    "nodeName": node,
                    "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
                    "devices": [
                        {
                            "name": "gpu-0",
                            "attributes": {
                                "uuid": {"string": dev.spec.serial},
                                "type": {"string": "gpu"},
                                "productName": {"string": self.product},
                            },
                        }
                    ],
                },
            },
        )


def vendor_claim(name: str, vendor: str, *, node_first: bool = False, product: str = A100) -> Obj:
    """A claim for one GPU of the vendor's DeviceClass; `node_first` writes it the way CoHDI's
    chart tells users to: `firstAvailable` [a GPU already on a node (`uuid != ""`), any GPU] —
    kube-scheduler then scores the node where the first alternative fits higher, so the second
    allocation goes where the GPU was attached."""
    by_model = {"cel": {"expression": f'device.attributes["{vendor}"].productName == "{product}"'}}
    request: dict[str, Any] = {
        "name": "gpu",
        "exactly": {"deviceClassName": vendor, "selectors": [by_model]},
    }
    if node_first:
        on_node = {"cel": {"expression": f'device.attributes["{vendor}"].uuid != ""'}}
        request = {
            "name": "gpu",
            "firstAvailable": [
                {"name": "node-gpu", "deviceClassName": vendor, "selectors": [by_model, on_node]},
                {"name": "fabric-gpu", "deviceClassName": vendor, "selectors": [by_model]},
            ],
        }
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name},
        "spec": {"devices": {"requests": [request]}},
    }


def vendor_pod(name: str, suffix: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [
                {"name": "cuda", "image": "nvidia/cuda", "resources": {"claims": [{"name": "gpu"}]}}
            ],
            "resourceClaims": [{"name": "gpu", "resourceClaimName": name}],
            "nodeSelector": {"test-world": suffix},
        },
    }


class Reschedules:
    """How many times the claim's status came to carry FabricDeviceReschedule=True, from a
    watch (every version the API server sent)."""

    def __init__(self, w: World, claim: str) -> None:
        self.claim = claim
        self.count = 0
        self.had = False
        self.informer = Informer(w.kube, CLAIMS, name="reschedules")
        self.informer.add_handler(self._on)

    def _on(self, event: Event) -> None:
        if event.obj["metadata"]["name"] != self.claim:
            return
        has = any(
            c.get("type") == vm.RESCHEDULE and c.get("status") == "True"
            for e in (event.obj.get("status") or {}).get("devices") or []
            for c in e.get("conditions") or []
        )
        if has and not self.had:
            self.count += 1
        self.had = has


@pytest.mark.parametrize("world", [{"nodes": 1, "gpus": 4}], indirect=True)
async def test_pod_ends_on_the_vendors_device_with_one_attach(world: World) -> None:
    await vendor_case(world, node_first=False)


@pytest.mark.parametrize("world", [{"nodes": 3, "gpus": 6}], indirect=True)
async def test_cohdis_claim_pattern_lands_on_the_node_that_got_the_gpu(world: World) -> None:
    """With several nodes, nothing in KEP-5007 pins the second allocation to the node the GPU
    was attached to; CoHDI's claim pattern (`firstAvailable`, the node's GPU first) makes the
    scheduler prefer it."""
    await vendor_case(world, node_first=True)


@pytest.mark.parametrize("world", [{"nodes": 1, "gpus": 4}], indirect=True)
async def test_cohdis_dra_attributes_let_its_claims_match_the_pool(world: World) -> None:
    """CoHDI's claims select the vendor's productName (`NVIDIA A100 80GB PCIe`), which the
    vendor's devices carry and CoHDI's ConfigMap gives the pool devices (`dra-attributes`); the
    fabric's model string is another (here `NVIDIA-A100-PCIE-40GB`). With the ConfigMap's
    attributes on the pool the claim's selector matches it, and the pod ends bound as before."""
    attributes = PoolAttributes()
    attributes.set(
        parse_devices(
            "cohdi.io",
            [
                {
                    "index": 0,
                    "cdi-model-name": A100,
                    "dra-attributes": {"productName": VENDOR_NAME, "type": "gpu", "uuid": ""},
                    "driver-name": "gpu.nvidia.com",
                    "k8s-device-name": "nvidia-a100",
                    "cannot-coexist-with": [],
                }
            ],
            where="ConfigMap composable-dra/composable-dra-dds",
        )
    )
    await vendor_case(world, node_first=True, product=VENDOR_NAME, pool_attributes=attributes)


VENDOR_NAME = "NVIDIA A100 80GB PCIe"


async def vendor_case(
    world: World, *, node_first: bool, product: str = A100, pool_attributes: Any = None
) -> None:
    vendor = f"gpu.v{world.suffix}.example"
    await world.kube.create(
        DEVICE_CLASSES,
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "DeviceClass",
            "metadata": {"name": vendor},
            "spec": {
                "selectors": [
                    {
                        "cel": {
                            "expression": f'device.driver == "{vendor}" && '
                            f'device.attributes["{vendor}"].type == "gpu"'
                        }
                    }
                ]
            },
        },
    )
    world.cfg = world_config(world.driver, world.suffix, vendor_driver=vendor, claim_deadline=120)
    stand_in = StandInVendor(world, vendor, product)
    name = f"v{world.suffix}"
    seen = Reschedules(world, name)
    world.tasks.append(asyncio.create_task(seen.informer.run()))
    role = await world.start_role(pool_attributes=pool_attributes)
    await asyncio.wait_for(role.publisher.synced.wait(), 30)
    try:
        await world.kube.create(
            CLAIMS, vendor_claim(name, vendor, node_first=node_first, product=product)
        )
        await world.kube.create(PODS, vendor_pod(name, world.suffix))

        async def bound() -> str | None:
            pod = await world.kube.get(f"{PODS}/{name}")
            return pod["spec"].get("nodeName")

        node = await until(bound, what="the pod bound", timeout=120)
        claim = await world.kube.get(f"{CLAIMS}/{name}")
        (result,) = claim["status"]["allocation"]["devices"]["results"]
        attached = [d for d in world.emulator.state.devices.values() if d.state != DeviceState.FREE]
        written = role.vendoring.written if role.vendoring is not None else None
        print(
            f"pod bound to {node} on {result['driver']} {result['pool']}/{result['device']}; "
            f"attaches started: {world.emulator.state.attach_started}; "
            f"FabricDeviceReschedule set {seen.count}x (written by us {written}x)"
        )
        assert [d.machine for d in attached] == [world.machine_of(node)], "on the pod's node"
        assert (result["driver"], result["pool"], result["device"]) == (vendor, node, "gpu-0")
        assert "bindingConditions" not in result, "the vendor's node-local device, not our pool"
        if node_first:
            assert result["request"] == "gpu/node-gpu"
        assert world.emulator.state.attach_started == 1
        assert seen.count == 1
        assert role.vendoring is not None
        assert role.vendoring.written == 1
        # the vendor's device is our GPU: the claim holds it, so scale-down leaves it attached
        (resource,) = [
            o
            for o in (await world.kube.get(RESOURCES))["items"]
            if o["spec"].get("target_node") == node
        ]
        assert fabric_device(resource) in role.scaler._held_devices()
    finally:
        for t in stand_in.tasks:
            t.cancel()
        for slice_ in (await world.kube.get(SLICES))["items"]:
            if slice_["spec"]["driver"] == vendor:
                await world.kube.delete(f"{SLICES}/{slice_['metadata']['name']}")
        await world.kube.delete(f"{DEVICE_CLASSES}/{vendor}")
