"""Per-node device limits from the FTI cluster manager (CoHDI's `USE_CM`), written where the
scaler reads node limits: the Node labels `cohdi.io/min-devices` and `cohdi.io/max-devices`.

The cluster manager bounds each model per machine; the scaler bounds the devices per node, so a
node gets the models' sums (`agent.fabric.cm.node_totals`). Only nodes whose machine is in a
node group are touched; for those the cluster manager owns the two labels (a bound it leaves
`null` removes the label, as CoHDI's driver does), and the node is annotated
`cohdi.io/limits-from=cluster-manager`: when its machine leaves every node group, the two labels
and the annotation are removed. A node never so annotated keeps its own labels. Read every
`interval` seconds; a failed read is logged once and tried again at the next interval, the labels
left as they were.
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

#: On a Node whose limits labels the cluster manager gave: when its machine leaves every node
#: group, they are removed (a node never so marked keeps its own labels).
SOURCE_ANNOTATION = "cohdi.io/limits-from"
SOURCE = "cluster-manager"


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
            obj = self.publisher.nodes.get("", node) or {}
            meta = obj.get("metadata") or {}
            ours = (meta.get("annotations") or {}).get(SOURCE_ANNOTATION) == SOURCE
            bounds = limits.get(MachineId(machine))
            if bounds is None and not ours:
                continue  # in no node group, and never was: the node's own labels
            if bounds is None:  # it left its node group: the bounds we wrote are no one's
                want: dict[str, str | None] = {MIN_LABEL: None, MAX_LABEL: None}
            else:
                low, high = node_totals(bounds)
                want = {
                    MIN_LABEL: None if low is None else str(low),
                    MAX_LABEL: None if high is None else str(high),
                }
            have = meta.get("labels") or {}
            patch = {k: v for k, v in want.items() if have.get(k) != v}
            mark = None if bounds is None else SOURCE
            if not patch and ours == (mark is not None):
                continue
            await self.kube.patch(
                f"{NODES}/{node}",
                {"metadata": {"labels": patch, "annotations": {SOURCE_ANNOTATION: mark}}},
            )
            logger.info(
                "node %s: %s %s",
                node,
                "limits from the cluster manager"
                if bounds is not None
                else "its machine left its node group: the cluster manager's limits removed",
                ", ".join(f"{k}={v}" for k, v in patch.items()),
                extra=logs.fields(node=node, machine=machine),
            )
        self.passes += 1
