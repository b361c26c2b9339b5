"""The cluster role, as the leader runs it: informers, the fabric watch, the publisher, the scaler,
the composer and the event recorder in one TaskGroup. Cancelling it (lost Lease, shutdown) stops
all of them; any one crashing stops all of them (and the process supervisor restarts us)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from agent import settings
from agent.controllers.composing import Composer
from agent.controllers.publishing import NODES, SLICES, Publisher
from agent.controllers.requesting import Requester
from agent.controllers.scaling import Scaler
from agent.fabric.protocol import FabricManager
from agent.kube.client import Kube
from agent.kube.eventing import Recorder
from agent.kube.resources import REQUESTS, RESOURCES
from agent.kube.watching import Informer

logger = logging.getLogger(__name__)


@dataclass
class ClusterRole:
    """Built once per leadership term; tests reach into the parts."""

    publisher: Publisher
    scaler: Scaler
    composer: Composer
    requester: Requester
    recorder: Recorder
    informers: list[Informer]
    fabric: FabricManager

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for inf in self.informers:
                tg.create_task(inf.run(), name=f"informer:{inf.name}")
            tg.create_task(self._watch_fabric(), name="fabric-watch")
            tg.create_task(self.publisher.run(), name="publisher")
            tg.create_task(self.scaler.run(), name="scaler")
            tg.create_task(self.composer.run(), name="composer")
            tg.create_task(self.requester.run(), name="requester")
            tg.create_task(self.recorder.run(), name="events")

    async def _watch_fabric(self) -> None:
        async for inventory in self.fabric.watch():
            self.publisher.update_inventory(inventory)


def build(
    kube: Kube, fabric: FabricManager, cfg: settings.Settings, *, identity: str
) -> ClusterRole:
    c, k = cfg.cluster, cfg.kube

    def informer(path: str, name: str, field_selector: str = "") -> Informer:
        return Informer(
            kube,
            path,
            name=name,
            field_selector=field_selector,
            watch_timeout=k.kube_watch_timeout,
            backoff_max=k.kube_backoff_max,
        )

    claims = informer("/apis/resource.k8s.io/v1/resourceclaims", "claims")
    slices = informer(SLICES, "slices", f"spec.driver={c.driver}")
    nodes = informer(NODES, "nodes")
    resources = informer(RESOURCES, "composableresources")
    requests = informer(REQUESTS, "composabilityrequests")
    recorder = Recorder(kube, component="cohdi-agent", instance=identity)
    publisher = Publisher(kube, driver=c.driver, slices=slices, nodes=nodes)
    scaler = Scaler(
        kube,
        driver=c.driver,
        claims=claims,
        resources=resources,
        nodes=nodes,
        publisher=publisher,
        recorder=recorder,
        deadline=c.claim_deadline,
        idle_grace=c.idle_grace,
        settle=c.scale_down_settle,
        workers=c.workers,
    )
    composer = Composer(
        kube,
        fabric=fabric,
        resources=resources,
        publisher=publisher,
        recorder=recorder,
        workers=c.workers,
        node_gone_grace=c.node_gone_grace,
    )
    requester = Requester(
        kube,
        requests=requests,
        resources=resources,
        nodes=nodes,
        publisher=publisher,
        recorder=recorder,
    )
    return ClusterRole(
        publisher,
        scaler,
        composer,
        requester,
        recorder,
        [claims, slices, nodes, resources, requests],
        fabric,
    )
