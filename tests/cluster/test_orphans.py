"""Nothing stranded, on the real API server and both fabric backends: a GPU the emulator attaches
behind the agent's back (no ComposableResource names it) is adopted and detached after the idle
grace, with an Event saying so."""

from __future__ import annotations

import pytest

from agent.model.fabric import DeviceState
from tests.cluster.conftest import BACKENDS, World
from tests.waiting import until

pytestmark = [
    pytest.mark.controlplane,
    pytest.mark.parametrize("backend", BACKENDS, indirect=True),
]


@pytest.mark.parametrize(
    "world", [{"nodes": 2, "gpus": 3, "idle_grace": 2.0, "settle": 0.5}], indirect=True
)
async def test_a_gpu_attached_behind_our_back_is_adopted_and_detached(world: World) -> None:
    w = world
    role = await w.start_role()
    role.scaler.orphan_grace = 1.0
    await until(lambda: _published(role), what="the pool published", timeout=30)
    device = sorted(w.emulator.state.devices)[0]
    w.emulator.state.attach(device, w.machine_of(w.nodes[1]))  # the fabric's own console, say

    async def attached() -> bool:
        return w.emulator.state.devices[device].state == DeviceState.ATTACHED

    await until(attached, what="the out-of-band attach", timeout=10)

    async def detached() -> bool:
        return w.emulator.state.devices[device].state == DeviceState.FREE

    await until(detached, what="the orphan detached", timeout=60)
    events = await w.kube.get("/api/v1/namespaces/default/events")
    adopted = [
        e for e in events["items"] if e["reason"] == "OrphanAdopted" and device in e["message"]
    ]
    assert adopted, "an Event says what happened"
    assert adopted[0]["type"] == "Warning"


async def _published(role: object) -> bool:
    return bool(getattr(role, "publisher").synced.is_set())  # noqa: B009
