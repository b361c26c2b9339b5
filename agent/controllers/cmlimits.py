"""Per-node device limits from the FTI cluster manager (CoHDI's `USE_CM`), written where the
scaler reads node limits: the Node labels `cohdi.io/min-devices` and `cohdi.io/max-devices`.

The cluster manager bounds each model per machine; the scaler bounds the devices per node, so a
node gets the models' sums (`agent.fabric.cm.node_totals`). Only nodes whose machine is in a
node group are touched; for those the cluster manager owns the two labels (a bound it leaves
`null` removes the label, as CoHDI's driver does). Read every `interval` seconds; a failed read
is logged once and tried again at the next interval, the labels left as they were.
"""

from __future__ import annotations

import asyncio
import logging

from agent import errors, logs
from agent.controllers.publishing import NODES, Publisher
from agent.fabric.cm import ClusterManager, node_totals
from agent.kube.client import Kube
from agent.model.fabric import MachineId
from agent.model.scaling import MAX_LABEL, MIN_LABEL

logger = logging.getLogger(__name__)


class CmLimits:
    def __init__(
        self, kube: Kube, cm: ClusterManager, publisher: Publisher, *, interval: float
    ) -> None:
        self.kube = kube
        self.cm = cm
        self.publisher = publisher
        self.interval = interval
        #: the last error, "" after a good pass (logs, tests)
        self.error = ""
        self.passes = 0

    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except errors.AgentError as exc:
                if str(exc) != self.error:
                    logger.warning(
                        "cluster-manager limits not read: %s; retrying every %.0f s",
                        exc,
                        self.interval,
                        extra=logs.fields(error=str(exc)),
                    )
                self.error = str(exc)
            else:
                self.error = ""
            await asyncio.sleep(self.interval)

    async def sync(self) -> None:
        """One pass: read the cluster manager, patch the labels that differ."""
        inventory = self.publisher.inventory
        if inventory is None:
            return
        limits = await self.cm.limits([m.id for m in inventory.machines])
        for machine, node in sorted(self.publisher.node_of_machine().items()):
            bounds = limits.get(MachineId(machine))
            if bounds is None:
                continue
            low, high = node_totals(bounds)
            want = {
                MIN_LABEL: None if low is None else str(low),
                MAX_LABEL: None if high is None else str(high),
            }
            obj = self.publisher.nodes.get("", node) or {}
            have = (obj.get("metadata") or {}).get("labels") or {}
            patch = {k: v for k, v in want.items() if have.get(k) != v}
            if not patch:
                continue
            await self.kube.patch(f"{NODES}/{node}", {"metadata": {"labels": patch}})
            logger.info(
                "node %s: limits from the cluster manager %s",
                node,
                ", ".join(f"{k}={v}" for k, v in patch.items()),
                extra=logs.fields(node=node, machine=machine),
            )
        self.passes += 1
