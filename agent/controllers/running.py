"""The cluster role, as the leader runs it: informers, the fabric watch, the publisher, the scaler,
the composer, the requester and the event recorder, each a supervised loop (agent.supervision):
one that fails is logged, counted (`cohdi_loop_restarts_total{loop,error}`) and restarted with
backoff while the others go on. Only cancelling `run()` — the Lease lost, or shutdown — stops
them all."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent import settings
from agent.controllers import metrics
from agent.controllers.composing import Composer
from agent.controllers.publishing import NODES, SLICES, Publisher, SliceMap
from agent.controllers.requesting import Requester
from agent.controllers.scaling import Scaler
from agent.controllers.vendoring import Vendoring, VendorScaler
from agent.fabric.protocol import FabricManager
from agent.kube.client import Kube
from agent.kube.eventing import Recorder
from agent.kube.resources import REQUESTS, RESOURCES
from agent.kube.watching import Informer
from agent.model import nodemap
from agent.model import vendoring as vendormodel
from agent.model.cohdi import PoolAttributes
from agent.model.names import label_value
from agent.model.objects import DRIVER_LABEL
from agent.model.requests import Limits
from agent.supervision import Policy, Supervisor

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
    supervisor: Supervisor = field(default_factory=lambda: Supervisor("loop"))
    #: vendor-driver mode's hand-off to the vendor's driver (None when --vendor-driver is off)
    vendoring: Vendoring | None = None
    #: more loops of the term by name (the cluster manager's node limits with --fabric-cm-cluster)
    extra: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """Loop name -> how to (re)start it. Restarting a loop reuses its object: queues, caches
        and informer stores survive, so a restart resumes rather than starts over."""
        loops: dict[str, Callable[[], Awaitable[None]]] = {
            f"informer:{inf.name}": inf.run for inf in self.informers
        }
        loops |= {
            "fabric-watch": self._watch_fabric,
            "publisher": self._publish,
            "scaler": self.scaler.run,
            "composer": self.composer.run,
            "requester": self.requester.run,
            "events": self.recorder.run,
        }
        if self.vendoring is not None:
            loops["vendoring"] = self.vendoring.run
        return loops | self.extra

    async def run(self) -> None:
        """Run every loop until cancelled; never returns or raises on a loop's behalf.
        `cohdi_leader` is 1 meanwhile (the term runs only while the Lease is held)."""
        metrics.LEADER.set(1)
        try:
            await self.supervisor.run(self.loops())
        finally:
            metrics.LEADER.set(0)
            metrics.pool_devices(None)

    def not_ready(self) -> list[str]:
        """Why this term is not ready, one reason a line: an informer not synced yet (or not
        getting answers from the API server), the fabric manager unreachable, publishing failing
        (the DRA feature gates off, RBAC, an API server that times out), a loop failed and not
        settled again. Empty when ready."""
        reasons = [
            f"informer {inf.name} not synced"
            if not inf.synced.is_set()
            else f"informer {inf.name} gets no answer from the API server"
            for inf in self.informers
            if not inf.healthy
        ]
        if (why := self.fabric.link.reason) is not None:
            reasons.append(why)
        if self.publisher.error:
            reasons.append(f"publishing failed: {self.publisher.error}")
        reasons += [f"loop {name}: {why}" for name, why in self.supervisor.problems().items()]
        return reasons

    async def _watch_fabric(self) -> None:
        async for inventory in self.fabric.watch():
            self.publisher.update_inventory(inventory)
            metrics.pool_devices(inventory)

    async def _publish(self) -> None:
        # A restart after a failed write must write again: the change that failed was already
        # taken off the publisher's dirty flag.
        self.publisher.changed()
        await self.publisher.run()


def build(
    kube: Kube,
    fabric: FabricManager,
    cfg: settings.Settings,
    *,
    identity: str,
    policy: Policy | None = None,
    pool_attributes: PoolAttributes | None = None,
    wall: Callable[[], float] = time.time,
    mono: Callable[[], float] = time.monotonic,
) -> ClusterRole:
    """The parts of one leadership term, wired together; `policy` sets how failed loops are
    restarted (the default: agent.supervision.Policy); `pool_attributes`: CoHDI's per-model
    `dra-attributes` (`--cohdi-config-namespace`), put on the pool devices in vendor mode;
    `wall` (epoch seconds) and `mono` (monotonic seconds): the controllers' clocks (tests run
    the role on a virtual-time loop with that loop's clocks)."""
    c, k = cfg.cluster, cfg.kube

    def informer(
        path: str, name: str, field_selector: str = "", label_selector: str = ""
    ) -> Informer:
        return Informer(
            kube,
            path,
            name=name,
            field_selector=field_selector,
            label_selector=label_selector,
            watch_timeout=k.kube_watch_timeout,
            backoff_max=k.kube_backoff_max,
        )

    claims = informer("/apis/resource.k8s.io/v1/resourceclaims", "claims")
    # vendor-driver mode: our pool slices go under the vendor's name, beside the vendor's own
    # (told apart by our deployment's label); our resources keep our own --driver's label
    vendor = c.vendor_driver
    slices = informer(
        SLICES,
        "slices",
        f"spec.driver={vendor or c.driver}",
        f"{DRIVER_LABEL}={label_value(c.driver)}" if vendor else "",
    )
    nodes = informer(NODES, "nodes")
    resources = informer(RESOURCES, "composableresources")
    requests = informer(REQUESTS, "composabilityrequests")
    recorder = Recorder(kube, component="cohdi-agent", instance=identity)
    publisher = Publisher(
        kube,
        driver=vendor or c.driver,
        slices=slices,
        nodes=nodes,
        resources=resources,
        label_driver=c.driver,
    )
    publisher.node_mapping = nodemap.NodeMapping(
        schemes=_csv(c.machine_provider_schemes), keys=_csv(c.machine_keys)
    )
    publisher.recorder = recorder
    scaler = (VendorScaler if vendor else Scaler)(
        kube,
        driver=vendor or c.driver,
        claims=claims,
        resources=resources,
        nodes=nodes,
        publisher=publisher,
        recorder=recorder,
        deadline=c.claim_deadline,
        idle_grace=c.idle_grace,
        settle=c.scale_down_settle,
        warm=c.warm_devices,
        workers=c.workers,
        health_grace=c.health_grace,
        health_evict=c.health_fatal_effect == "NoExecute",
        wall=wall,
        mono=mono,
    )
    composer = Composer(
        kube,
        fabric=fabric,
        resources=resources,
        publisher=publisher,
        recorder=recorder,
        workers=c.workers,
        node_gone_grace=c.node_gone_grace,
        driver=c.driver,
        fresh=scaler.fresh,
        choose_settle=min(1.0, c.scale_down_settle),
        wall=wall,
        mono=mono,
    )
    requester = Requester(
        kube,
        requests=requests,
        resources=resources,
        nodes=nodes,
        publisher=publisher,
        recorder=recorder,
        limits=Limits(max_size=c.request_max_size),
        driver=c.driver,
        claims=claims,
        clock=wall,
        mono=mono,
    )
    informers = [claims, slices, nodes, resources, requests]
    vendoring = None
    if vendor:
        if isinstance(scaler, VendorScaler):
            scaler.label_as(c.driver)
        attributes = pool_attributes

        def shape(desired: SliceMap) -> SliceMap:
            return vendormodel.vendor_slices(
                desired, attributes.by_model if attributes is not None else None
            )

        publisher.shape = shape
        if attributes is not None:
            attributes.listen(publisher.changed)
        vendor_slices = informer(SLICES, "vendor-slices", f"spec.driver={vendor}")
        informers.append(vendor_slices)
        vendoring = Vendoring(
            kube,
            vendor=vendor,
            driver=c.driver,
            claims=claims,
            resources=resources,
            vendor_slices=vendor_slices,
            publisher=publisher,
            recorder=recorder,
            wall=wall,
        )
    return ClusterRole(
        publisher,
        scaler,
        composer,
        requester,
        recorder,
        informers,
        fabric,
        Supervisor("loop", policy=policy),
        vendoring,
        _cm_loops(kube, fabric, cfg, publisher),
    )


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _cm_loops(
    kube: Kube, fabric: FabricManager, cfg: settings.Settings, publisher: Publisher
) -> dict[str, Callable[[], Awaitable[None]]]:
    """The cluster manager's node-limits loop when --fabric-cm-cluster is set (FTI only)."""
    from agent.controllers.cmlimits import CmLimits
    from agent.fabric.cm import ClusterManager
    from agent.fabric.fti import FtiFabric

    inner = getattr(fabric, "inner", fabric)  # under agent.fabric.metering
    if not cfg.fabric.cm_cluster or not isinstance(inner, FtiFabric):
        return {}
    cm = ClusterManager(inner, cfg.fabric.cm_cluster)
    return {"cm-limits": CmLimits(kube, cm, publisher, interval=cfg.fabric.poll_interval).run}
