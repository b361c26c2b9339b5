"""The pool publisher (CoHDI's Composable DRA Driver, event-driven): the fabric's inventory →
our pool ResourceSlices, and nodes labelled with the fabric they are wired to.

It recomputes the desired slices whenever something relevant changes (fabric inventory, a device
pinned or withheld by the scaler, nodes), and writes only the slices whose content changed. A pool
keeps its generation when one slice changes; when slices are added or removed the generation is
bumped and every slice of the pool carries the new one. After each write the stored object is
compared with what was sent: if the API server dropped the binding-condition or per-device
node-selection fields (feature gates off), publishing stops with a `FeatureGateOff` error; if it
dropped device taints (DRADeviceTaints off), that is said once and tainted (unhealthy) devices are
withheld instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from agent import errors, logs
from agent.controllers import metrics, taintprobe
from agent.kube.client import Kube, Obj, path_of
from agent.kube.eventing import Recorder
from agent.kube.watching import Informer
from agent.model import composing as composemodel
from agent.model import names, nodemap
from agent.model import pool as poolmodel
from agent.model import slots as slotmodel
from agent.model.fabric import DeviceState, Inventory, PoolDevice
from agent.model.objects import DRIVER_LABEL, attached_device, fabric_device, mine, spec

logger = logging.getLogger(__name__)

SLICES = path_of(group="resource.k8s.io", version="v1", plural="resourceslices")
NODES = path_of(group="", version="v1", plural="nodes")


#: Seconds the publisher waits after a change before writing, to fold a burst into one write.
COALESCE = 0.05


class FeatureGateOff(errors.PermanentError):
    fault = "kube"


SliceMap = dict[str, list[poolmodel.SliceSpec]]
_ViewCache = tuple[Inventory | None, tuple[object, ...], Inventory | None]


class Publisher:
    def __init__(
        self,
        kube: Kube,
        *,
        driver: str,
        slices: Informer,
        nodes: Informer,
        resources: Informer | None = None,
        label_driver: str = "",
    ) -> None:
        self.kube = kube
        self.driver = driver
        self.slices = slices
        self.nodes = nodes
        #: the fabric's inventory as the backend reads it
        self.inventory: Inventory | None = None
        #: ComposableResources: a slot they hold keeps its name (agent.model.slots)
        self.resources = resources
        self._view: _ViewCache = (None, (), None)
        #: device id -> why it is not offered ("scale-down", "failed", "choosing"): each user of
        #: withholding releases only its own reason, so one cannot undo another's.
        self._withheld: dict[str, set[str]] = {}
        #: withheld device id -> fabric reads in a row that did not list it (`_release_gone`)
        self._gone_reads: dict[str, int] = {}
        self.pinned: set[str] = set()
        #: device id -> its DRA device taints (`agent.model.health`: unhealthy GPUs); withheld
        #: instead while the API server drops taints (the DRADeviceTaints gate off)
        self._taints: dict[str, list[dict[str, Any]]] = {}
        self.taints_supported = True
        #: slot -> the GPU that arrived through it, until the resource's status says so
        self._arrivals: dict[str, str] = {}
        #: our deployment (cohdi.io/driver): `label_driver` when the slices' driver is another's
        #: (vendor mode: agent.controllers.vendoring)
        self._driver_label = names.label_value(label_driver or driver)
        #: (pool, device name) of another driver's device -> our fabric device behind it (vendor
        #: mode: the vendor's node-local device of a GPU we attached)
        self.aliases: dict[tuple[str, str], str] = {}
        #: (pool, device name) of every anonymous slot ever offered (`was_slot`); bounded by the
        #: largest free count a fabric has had
        self._slot_entries: set[tuple[str, str]] = set()
        #: reshapes the desired slices before they are written (vendor mode)
        self.shape: Callable[[SliceMap], SliceMap] | None = None
        #: attached device -> the node whose own pool offers it (agent.model.pool.node_pool_slices)
        self._placed: dict[str, str] = {}
        #: called with the new inventory after every fabric read (the composer retries
        #: NoFreeDevice resources from here)
        self.on_inventory: list[Callable[[Inventory], None]] = []
        #: the last error of a sync, "" when the last sync succeeded (for readiness and tests)
        self.error = ""
        self._dirty = asyncio.Event()
        #: slice name -> (resourceVersion we wrote, spec we sent): compare against our own writes,
        #: not the server's normalised copy.
        self._sent: dict[str, tuple[str, dict[str, Any]]] = {}
        self._entries: poolmodel.EntryCache = {}
        #: slice name -> our last write (name, resourceVersion, spec), until the informer shows it
        self._stored: dict[str, Obj] = {}
        self._names: dict[tuple[str, str], str] = {}
        self._names_of: Inventory | None = None
        self._writes = asyncio.Semaphore(8)
        self.synced = asyncio.Event()
        self._synced_once = asyncio.Event()
        self.syncs = 0
        #: how Nodes are matched to machines, and who hears of a Node that matches none (set
        #: by agent.controllers.running.build)
        self.node_mapping = nodemap.NodeMapping()
        self.recorder: Recorder | None = None
        self._unmapped_told: dict[str, str] = {}
        #: (machines, nodes generation, mapping) -> the map made of them: node_of_machine is
        #: asked many times per sync, and Nodes change seldom
        self._map_cache: tuple[object, int, nodemap.NodeMapping, nodemap.NodeMap] | None = None
        self._nodes_gen = 0
        nodes.add_handler(self._on_node)
        if resources is not None:
            resources.add_handler(self._on_resource)

    def changed(self) -> None:
        self._dirty.set()

    def update_inventory(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self._forget_placements()
        self._release_gone(inventory)
        self._release_freed()
        self.changed()
        for callback in self.on_inventory:
            callback(inventory)

    async def flush(self) -> None:
        """Return once a sync that started after this call has finished."""
        target = self.syncs + (2 if self._syncing else 1)
        self.changed()
        while self.syncs < target:
            self._synced_once.clear()
            await self._synced_once.wait()

    _syncing = False

    def device_changed(self, dev: PoolDevice) -> None:
        """A device the composer just attached/detached: publish at once, without waiting for the
        next fabric poll (which confirms it)."""
        if self.inventory is None or slotmodel.is_slot(dev.id):
            return  # a slot is a count, not a device: the next read brings the new count
        if dev.anonymous and dev.state == DeviceState.FREE:
            # Detached on a fabric that counts its free GPUs (FTI): the GPU is back in the count
            # and has no identity of its own any more, so it leaves the inventory (offered under
            # its own id it would be a free device the fabric cannot attach by name). Its
            # withhold stays until fabric reads stop listing it (`_release_gone`): a read that
            # was under way during the detach still shows it attached to its old node.
            devices = [d for d in self.inventory.devices if d.id != dev.id]
            self.inventory = Inventory(self.inventory.machines, tuple(devices), version="local")
            self._forget_placements()
            self.changed()
            return
        old = self.inventory.device(dev.id)
        if old is not None and not dev.fabric:  # a partial answer (FTI detach): keep what we know
            dev = PoolDevice(
                dev.id, old.fabric, old.model, dev.state, old.vendor, old.memory, old.gpu_uuid
            )
        self.inventory = slotmodel.with_arrival(self.inventory, dev)
        self._forget_placements()
        self._release_freed()
        self.changed()

    def _on_resource(self, event: Any) -> None:
        if slotmodel.is_slot(fabric_device(event.obj)):
            self._forget_placements()
            self._release_freed()
            self.changed()

    def arrived(self, slot: str, device: str) -> None:
        """The composer's word that `device` arrived through `slot`, before its resource's status
        says so: from this instant the GPU is offered only under the slot's name (never, not
        even for one sync, under its own)."""
        self._arrivals[slot] = device
        self.changed()

    def held_slots(self) -> dict[str, str | None]:
        """Slot id → the device a live resource attached through it (None until it arrived)."""
        return self._slot_state(pending=False)[0]

    def _slot_state(
        self, *, pending: bool
    ) -> tuple[dict[str, str | None], frozenset[tuple[str, str]], frozenset[str]]:
        """One pass over our resources: (`held_slots()`; with `pending`, also the (machine,
        model) of each held slot nothing has arrived through yet and the device ids any of our
        resources names — what `slots.view` needs to keep a GPU a read lists before the attach's
        answer from being offered under its own id)."""
        held: dict[str, str | None] = {}
        arriving: set[tuple[str, str]] = set()
        named: set[str] = set()
        if self.resources is None:
            return held, frozenset(), frozenset()
        machine_of: dict[str, str] | None = None
        for obj in self.resources.store.values():
            if not mine(obj, self._driver_label):
                continue
            slot, arrived = fabric_device(obj), attached_device(obj)
            if pending:
                named.update(d for d in (slot, arrived) if d and not slotmodel.is_slot(d))
            parsed = slotmodel.parse_slot(slot)
            if parsed is None or composemodel.refused(obj):
                continue
            if arrived != slot:
                self._arrivals.pop(slot, None)  # the status says it now
                held[slot] = arrived
                continue
            held[slot] = self._arrivals.get(slot)
            if pending and held[slot] is None:
                if machine_of is None:
                    machine_of = {node: m for m, node in self.node_of_machine().items()}
                machine = machine_of.get(str(spec(obj).get("target_node") or ""))
                if machine:
                    arriving.add((machine, parsed[1]))
        for slot in set(self._arrivals) - set(held):
            del self._arrivals[slot]  # its resource is gone
        # a placed GPU is recorded: the composer places a model-only resource's GPU once its
        # attach answered, while the resource's status may still name only the chosen slot
        named.update(self._placed if pending else ())
        return held, frozenset(arriving), frozenset(named)

    @property
    def view(self) -> Inventory | None:
        """The inventory with anonymous slots given stable names (`agent.model.slots.view`): what
        is published, and what claims' device names resolve against."""
        if self.inventory is None:
            return None
        slots, arriving, named = self._slot_state(pending=True)
        held = tuple(sorted(slots.items()))
        if not held:
            arriving, named = frozenset(), frozenset()
        inv, key, out = self._view
        if inv is not self.inventory or key != (held, arriving, named) or out is None:
            out = slotmodel.view(self.inventory, dict(held), arriving, named)
            self._view = (self.inventory, (held, arriving, named), out)
            for d in out.devices:
                if slotmodel.is_slot(d.id):
                    entry = (poolmodel.pool_name(d.fabric), poolmodel.device_name(d.id))
                    self._slot_entries.add(entry)
        return out

    # --- node-local pools ------------------------------------------------------------------------

    def place(self, device_id: str, node: str) -> None:
        """Offer the attached `device_id` in `node`'s pool from now on (instead of the fabric
        pool). The caller guarantees the fabric pool's identity is no longer offered and no claim
        holds it (the scaler's move: withheld, settled, checked with a fresh read)."""
        self._placed[device_id] = node
        self.changed()

    def placed_on(self, device_id: str) -> str | None:
        return self._placed.get(device_id)

    @property
    def placed(self) -> dict[str, str]:
        return dict(self._placed)

    def _release_freed(self) -> None:
        """A device withheld for a failed claim, a scale-down or a detach that came back free
        (detached) is offered again. A failed one stays out because the fabric reports it failed,
        until an operator repairs it; one the composer is choosing stays out until it says so.
        Judged on the published view: a slot is free only once no resource holds it (the raw
        inventory's placeholder of the same number is another, anonymous GPU)."""
        view = self.view
        if view is None:
            return
        for d in view.devices:
            if d.state == DeviceState.FREE and d.id in self._withheld:
                self._release_reasons(d.id, {"failed", "scale-down", "detaching"})

    def _release_gone(self, inventory: Inventory) -> None:
        """A device withheld for a detach (or a scale-down, or a failed claim) that two fabric
        reads in a row no longer list is gone from the fabric's named devices (an anonymous
        fabric's GPU back in its free count): its withhold lifts. Two reads, because one that
        was already under way when the detach finished may still list it on its old node."""
        listed = {d.id for d in inventory.devices}
        for device_id in list(self._withheld):
            if device_id in listed or slotmodel.is_slot(device_id):
                self._gone_reads.pop(device_id, None)
                continue
            reads = self._gone_reads.get(device_id, 0) + 1
            if reads >= 2:
                self._gone_reads.pop(device_id, None)
                self._release_reasons(device_id, {"failed", "scale-down", "detaching"})
            else:
                self._gone_reads[device_id] = reads

    def _forget_placements(self) -> None:
        """A placement lasts while its device stays attached to that node: detached (free),
        failed or moved, it is offered from the fabric pool again."""
        view = self.view
        if view is None:
            return
        machine_node = self.node_of_machine()
        for device, node in list(self._placed.items()):
            dev = view.device(device)
            if (
                dev is None
                or dev.state != DeviceState.ATTACHED
                or machine_node.get(dev.machine or "") != node
            ):
                del self._placed[device]

    def _recover_placements(self) -> None:
        """A new leader continues where the last one left off: devices its node-local slices
        offer (and still attached there) stay placed, so no identity changes under a claim."""
        view = self.view
        if view is None:
            return
        by_attr = {str(d.id): d for d in view.devices}
        machine_node = self.node_of_machine()
        for obj in self.slices.store.values():
            spec = obj.get("spec") or {}
            node = spec.get("nodeName")
            if spec.get("driver") != self.driver or not node:
                continue
            for entry in spec.get("devices") or []:
                raw = (entry.get("attributes") or {}).get(poolmodel.DEVICE_ID_ATTRIBUTE) or {}
                dev = by_attr.get(str(raw.get("string") or ""))
                if (
                    dev is not None
                    and dev.state == DeviceState.ATTACHED
                    and machine_node.get(dev.machine or "") == node
                ):
                    self._placed.setdefault(str(dev.id), node)

    def device(self, device_id: str) -> PoolDevice | None:
        """A device as published (a held slot with its GPU's state), else as the fabric has it."""
        view = self.view
        found = view.device(device_id) if view is not None else None
        if found is None and self.inventory is not None:
            found = self.inventory.device(device_id)
        return found

    def fabric_device(self, device_id: str) -> PoolDevice | None:
        """A device exactly as the fabric reported it (no slot naming)."""
        return self.inventory.device(device_id) if self.inventory else None

    def device_id_of(self, pool: str, name: str) -> str | None:
        """The fabric device behind a slice entry (pool, device name). Called for every claim
        event, so answered from an index rebuilt only when the inventory object changes."""
        view = self.view
        if view is None:
            return None
        if self._names_of is not view:
            machine_node = self.node_of_machine()
            names: dict[tuple[str, str], str] = {}
            for d in view.devices:
                entry = poolmodel.device_name(d.id)
                names[(poolmodel.pool_name(d.fabric), entry)] = d.id
                node = machine_node.get(d.machine or "")
                if node:  # its node pool's identity resolves too, wherever it is offered now
                    names[(poolmodel.node_pool_name(d.fabric, node), entry)] = d.id
            self._names = names
            self._names_of = view
        return self._names.get((pool, name)) or self.aliases.get((pool, name))

    def was_slot(self, pool: str, name: str) -> bool:
        """The slice entry (pool, device name) has been offered as an anonymous slot. A slot
        number can stop being offered for a moment with no GPU gone (the free count read after
        a GPU arrived, before the composer records which slot it came through): a claim holding
        it is given a grace (`agent.model.scaling.SLOT_VANISH_GRACE`) before UnknownDevice."""
        self.view  # noqa: B018 (records the slots of a changed inventory)
        return (pool, name) in self._slot_entries

    def device_index(self) -> dict[tuple[str, str], str]:
        """(pool name, device name) -> fabric device id, for every device in the inventory."""
        self.device_id_of("", "")  # rebuilds the index if the inventory changed
        return {**self._names, **self.aliases} if self.aliases else self._names

    @property
    def withheld(self) -> frozenset[str]:
        """Devices not offered to the scheduler, for whatever reason (a tainted device counts:
        no claim gets it, and no model-only resource may choose it)."""
        return frozenset(self._withheld) | frozenset(self._taints)

    # --- device taints -----------------------------------------------------------------------

    def set_taints(self, device_id: str, taints: list[dict[str, Any]]) -> None:
        """Publish `device_id` with these DRA device taints from now on ([]: none)."""
        if taints:
            if self._taints.get(device_id) != taints:
                self._taints[device_id] = taints
                self.changed()
        elif self._taints.pop(device_id, None) is not None:
            self.changed()

    @property
    def taints(self) -> dict[str, list[dict[str, Any]]]:
        return dict(self._taints)

    def _published_taints(self) -> tuple[dict[str, list[dict[str, Any]]], frozenset[str]]:
        """(taints to publish, devices to withhold instead): a GPU behind a held slot is
        published under the slot's name, so its taints go there too; with taints dropped by
        the API server every tainted device is withheld."""
        if not self._taints:
            return {}, frozenset(self._withheld)
        taints = dict(self._taints)
        for slot, gpu in self.held_slots().items():
            if gpu is not None and gpu in taints:
                taints[slot] = taints[gpu]
        if self.taints_supported:
            return taints, frozenset(self._withheld)
        return {}, frozenset(self._withheld) | frozenset(taints)

    def _taints_dropped(self, name: str) -> None:
        """The API server did not store the taints we sent (DRADeviceTaints off): said once,
        and from now on unhealthy devices are withheld instead."""
        if self.taints_supported:
            self.taints_supported = False
            logger.error(
                "the API server dropped the device taints from ResourceSlice %s: the "
                "DRADeviceTaints feature gate is off (beta and on by default from Kubernetes "
                "1.36; turn it on in kube-apiserver and kube-scheduler). Unhealthy devices are "
                "withheld from the slices instead of tainted",
                name,
            )
            self.changed()

    def withhold(self, device_id: str, *, reason: str) -> None:
        """Stop offering `device_id` for `reason` until `release(device_id, reason=reason)`."""
        self._withheld.setdefault(device_id, set()).add(reason)
        self.changed()

    def release(self, device_id: str, *, reason: str) -> None:
        self._release_reasons(device_id, {reason})

    def _release_reasons(self, device_id: str, reasons: set[str]) -> None:
        held = self._withheld.get(device_id)
        if held is None:
            return
        held -= reasons
        if not held:
            del self._withheld[device_id]
        self.changed()

    def pin(self, device_id: str) -> None:
        if device_id not in self.pinned:
            self.pinned.add(device_id)
            self.changed()

    def unpin(self, device_id: str) -> None:
        if device_id in self.pinned:
            self.pinned.discard(device_id)
            self.changed()

    def node_of_machine(self) -> dict[str, str]:
        """machine id -> Kubernetes node name, for machines whose node exists: by providerID,
        then label/annotation, then name (agent.model.nodemap, `self.node_mapping`). A node whose
        fabric identity names no machine gets one Warning Event (NodeNotMapped) per reason."""
        if self.inventory is None:
            return {}
        machines, mapping = self.inventory.machines, self.node_mapping
        cached = self._map_cache
        if (
            cached is not None
            and cached[0] is machines
            and cached[1] == self._nodes_gen
            and cached[2] == mapping
        ):
            return dict(cached[3].node_of)
        found = nodemap.map_nodes(machines, self.nodes.store.values(), mapping)
        self._map_cache = (machines, self._nodes_gen, mapping, found)
        for node, why in found.unmapped.items():
            if self._unmapped_told.get(node) != why:
                self._unmapped_told[node] = why
                self._tell_unmapped(node, why)
        for node in self._unmapped_told.keys() - found.unmapped.keys():
            del self._unmapped_told[node]  # mapped (or gone): a later relapse is told again
        return dict(found.node_of)

    def _on_node(self, _event: Any) -> None:
        self._nodes_gen += 1
        self.changed()

    def _tell_unmapped(self, node: str, why: str) -> None:
        logger.warning("node %s maps to no fabric machine: %s", node, why)
        obj = self.nodes.get("", node)
        if self.recorder is not None and obj is not None:
            self.recorder.emit(
                obj, "NodeNotMapped", f"no fabric machine for this node: {why}", warning=True
            )

    def machine_of_node(self, node: str) -> str | None:
        return next((m for m, n in self.node_of_machine().items() if n == node), None)

    async def run(self) -> None:
        await self.slices.synced.wait()
        await self.nodes.synced.wait()
        if self.resources is not None:
            # the resources' DeviceHealthy conditions are taints in the first write (a new
            # leader offers no GPU a node found broken untainted, even for a moment)
            await self.resources.synced.wait()
        recovered = False
        while True:
            await self._dirty.wait()
            # Coalesce: a burst of attaches changes many devices within milliseconds; one
            # slice write for all of them beats one write each (a 128-device slice PUT is the
            # API server's most expensive request we make).
            await asyncio.sleep(COALESCE)
            self._dirty.clear()
            if self.inventory is None:
                continue
            if not recovered:
                self._recover_placements()
                recovered = True
            self._syncing = True
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except errors.AgentError as exc:
                self._sync_failed(exc)
            else:
                if self.error:
                    logger.info("publishing works again (after: %s)", self.error)
                self.error = ""
                self._failures = 0
            finally:
                self._syncing = False
                self._synced_once.set()

    _failures = 0

    def _sync_failed(self, exc: errors.AgentError) -> None:
        """A sync that failed is retried with backoff (the desired state is recomputed then, so
        nothing is lost); a permanent error (the DRA gates off, RBAC) is retried slowly, since an
        operator may fix it while we run. One log line per new error, not one per retry."""
        self._failures += 1
        cap = 30.0 if exc.transient else 60.0
        delay = min(0.2 * 2 ** (self._failures - 1), cap)
        message = str(exc)
        if message != self.error:
            level = logging.WARNING if exc.transient else logging.ERROR
            logger.log(
                level,
                "publishing failed: %s; retrying in %.1f s",
                message,
                delay,
                extra=logs.fields(error=message),
            )
        self.error = message
        asyncio.get_running_loop().call_later(delay, self.changed)

    #: whether the API server was asked if it keeps device taints (`taintprobe`)
    _taints_probed = False

    async def sync(self) -> None:
        assert self.inventory is not None
        view = self.view
        assert view is not None
        if self._taints and not self._taints_probed:
            # asked before the first write with a taint, which would offer the device untainted
            self._taints_probed = True
            stored, probe = await taintprobe.taints_stored(self.kube)
            if stored is False:
                self._taints_dropped(probe)
        taints, withheld = self._published_taints()
        desired = poolmodel.desired_slices(
            driver=self.driver,
            inventory=view,
            node_of_machine=self.node_of_machine(),
            withheld=withheld,
            pinned=frozenset(self.pinned),
            cache=self._entries,
            placed=self._placed,
            taints=taints,
        )
        desired.update(
            poolmodel.node_pool_slices(
                driver=self.driver,
                inventory=view,
                node_of_machine=self.node_of_machine(),
                placed=self._placed,
                withheld=withheld,
                taints=taints,
            )
        )
        if self.shape is not None:
            desired = self.shape(desired)
        current: dict[str, dict[str, Obj]] = {}
        for obj in self._current_slices():
            spec = obj.get("spec", {})
            if spec.get("driver") == self.driver:
                current.setdefault(spec["pool"]["name"], {})[obj["metadata"]["name"]] = obj
        pools = sorted(set(desired) | set(current))
        # Pools that stop offering a device are written before pools that start offering one:
        # a slot name let go by one pool and taken up by another (an anonymous fabric's free
        # slot numbers), or a GPU leaving a node's pool, never stands in two pools at once.
        losing = {
            p
            for p in pools
            if _offered_ids(current.get(p, {}).values())
            - _offered_ids(w.spec for w in desired.get(p, []))
        }
        for pool in [p for p in pools if p in losing] + [p for p in pools if p not in losing]:
            await self._sync_pool(pool, desired.get(pool, []), current.get(pool, {}))
        # After the slices: a Node that lacks its label only keeps pods off free devices there
        # a moment longer, and thousands of labels no longer hold back the first slice.
        await self._label_nodes()
        self.syncs += 1
        self.synced.set()

    def _current_slices(self) -> list[Obj]:
        """Our slices as the informer shows them, or as our own last write returned them when
        that is newer (the informer lags our writes; we never write into its store)."""
        out = {key[1]: obj for key, obj in self.slices.store.items()}
        for name, written in list(self._stored.items()):
            seen = out.get(name)
            if seen is None or _newer(written, seen):
                out[name] = written
            else:
                del self._stored[name]  # the informer has caught up (or someone wrote after us)
        return list(out.values())

    def _differs(self, want: poolmodel.SliceSpec, have: Obj | None) -> bool:
        if have is None:
            return True
        rv = have["metadata"].get("resourceVersion", "")
        sent = self._sent.get(want.name)
        base = sent[1] if sent and sent[0] == rv else have.get("spec", {})
        return not poolmodel.same_content(want.spec, base)

    async def _sync_pool(
        self, pool: str, want: list[poolmodel.SliceSpec], have: dict[str, Obj]
    ) -> None:
        changed = [w for w in want if self._differs(w, have.get(w.name))]
        obsolete = [name for name in have if name not in {w.name for w in want}]
        if not changed and not obsolete:
            return
        generations = [int(o["spec"]["pool"].get("generation", 0)) for o in have.values()]
        generation = max(generations, default=0)
        lives_in = {
            d["name"]: name
            for name, o in have.items()
            for d in o.get("spec", {}).get("devices") or []
        }
        moved = any(
            lives_in.get(d["name"], w.name) != w.name for w in want for d in w.spec["devices"]
        )
        same_shape = not obsolete and all(w.name in have for w in want)
        if moved or not same_shape or len(set(generations)) > 1:
            # Devices change slices or slices come and go: a new generation, written whole, so a
            # consumer never sees one device twice or a pool half old, half new.
            generation += 1
            changed = want
        for name in obsolete:
            self._stored.pop(name, None)
            try:
                await self.kube.delete(f"{SLICES}/{name}")
                metrics.SLICE_WRITES.labels("delete").inc()
            except errors.KubeNotFound:
                pass

        async def write(w: poolmodel.SliceSpec) -> None:
            spec = {**w.spec, "pool": {**w.spec["pool"], "generation": generation}}
            async with self._writes:
                await self._write(w.name, spec, have.get(w.name))

        # All writes run to their end; the first error is the pool's error (not a group of them).
        results = await asyncio.gather(*(write(w) for w in changed), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _write(self, name: str, spec: dict[str, Any], existing: Obj | None) -> None:
        body: dict[str, Any] = {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceSlice",
            "metadata": {
                "name": name,
                "labels": {
                    "app.kubernetes.io/managed-by": "cohdi-agent",
                    DRIVER_LABEL: self._driver_label,
                },
            },
            "spec": spec,
        }
        try:
            if existing is None:
                stored = await self.kube.create(SLICES, body)
                metrics.SLICE_WRITES.labels("create").inc()
            else:
                body["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
                stored = await self.kube.replace(f"{SLICES}/{name}", body)
                metrics.SLICE_WRITES.labels("update").inc()
        except (errors.KubeConflict, errors.KubeNotFound, errors.KubeAlreadyExists):
            self._stored.pop(name, None)  # stale: the next sync starts from the server's copy
            raise
        except errors.KubeInvalid as exc:
            # With DRAPartitionableDevices off, perDeviceNodeSelection is dropped before
            # validation, which then finds no node selection at all.
            if "perDeviceNodeSelection" in str(exc):
                raise FeatureGateOff(
                    _gates_message(name, ["perDeviceNodeSelection"], str(exc))
                ) from exc
            raise
        missing = gated_fields_dropped(spec, stored.get("spec", {}))
        if missing:
            raise FeatureGateOff(_gates_message(name, missing, ""))
        if taints_dropped(spec, stored.get("spec", {})):
            self._taints_dropped(name)
        rv = stored["metadata"]["resourceVersion"]
        self._sent[name] = (rv, spec)
        # What the next sync needs of it until the informer catches up: name, resourceVersion
        # and the spec — ours, which shares its device entries with the entry cache, rather
        # than the server's copy (a third parsed copy of every device at 40,000 devices).
        self._stored[name] = {"metadata": {"name": name, "resourceVersion": rv}, "spec": spec}

    async def _label_nodes(self) -> None:
        """Label every Node wired to a fabric `cohdi.io/fabric=<fabric>` (free devices' node
        selectors match it). Only Nodes whose label differs are patched, up to 16 at a time
        (5,000 Nodes one PATCH after another took 18 s), with one INFO line for all of them.
        Raises the first failed PATCH's error after the others are done (the sync retries)."""
        assert self.inventory is not None
        fabric_of: dict[str, str] = {
            m.id: poolmodel.fabric_label(m.fabric) for m in self.inventory.machines if m.fabric
        }
        todo: list[tuple[str, str]] = []
        for machine, node in self.node_of_machine().items():
            obj = self.nodes.get("", node)
            want = fabric_of.get(machine, "")
            if obj is None or not want:
                continue
            if obj["metadata"].get("labels", {}).get(poolmodel.FABRIC_LABEL) != want:
                todo.append((node, want))
        if not todo:
            return
        limit = asyncio.Semaphore(16)

        async def label(node: str, want: str) -> None:
            async with limit:
                await self.kube.patch(
                    f"{NODES}/{node}", {"metadata": {"labels": {poolmodel.FABRIC_LABEL: want}}}
                )
            logger.debug("labelled node %s %s=%s", node, poolmodel.FABRIC_LABEL, want)

        results = await asyncio.gather(*(label(n, w) for n, w in todo), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        done = [n for (n, _), r in zip(todo, results, strict=True) if r is None]
        if done:
            shown = ", ".join(done[:5]) + (f" and {len(done) - 5} more" if len(done) > 5 else "")
            logger.info(
                "labelled %d node(s) with their fabric (%s): %s",
                len(done),
                poolmodel.FABRIC_LABEL,
                shown,
                extra=logs.fields(node=done[0] if len(done) == 1 else None),
            )
        if failed:
            raise failed[0]


def _offered_ids(slices: Iterable[Mapping[str, Any]]) -> set[str]:
    """The fabric device ids (the `fabricDeviceId` attribute) offered in `slices`: slice objects
    (with `spec`) or slice specs."""
    out: set[str] = set()
    for sl in slices:
        spec = sl.get("spec", sl)
        for d in spec.get("devices") or []:
            attr = (d.get("attributes") or {}).get(poolmodel.DEVICE_ID_ATTRIBUTE) or {}
            out.add(str(attr.get("string", d.get("name", ""))))
    return out


def _newer(a: Obj, b: Obj) -> bool:
    """`a` is a later version of the object than `b` (resourceVersions are etcd revisions: the
    API server compares them as integers for watches; anything else counts as not newer)."""
    ra, rb = a["metadata"].get("resourceVersion", ""), b["metadata"].get("resourceVersion", "")
    return bool(ra.isdigit() and rb.isdigit() and int(ra) > int(rb))


def _gates_message(name: str, missing: list[str], server: str) -> str:
    said = f" (the API server said: {server})" if server else ""
    return (
        f"the API server dropped {', '.join(missing[:5])} from ResourceSlice {name}{said}: the "
        "DRADeviceBindingConditions / DRAPartitionableDevices feature gates are off. Turn them on "
        "in kube-apiserver and kube-scheduler (default on from Kubernetes 1.36); without them the "
        "scheduler would bind pods to GPUs that were never attached"
    )


_GATED_DEVICE_FIELDS = (
    "bindsToNode",
    "bindingConditions",
    "bindingFailureConditions",
    "nodeSelector",
)


def gated_fields_dropped(sent: dict[str, Any], stored: dict[str, Any]) -> list[str]:
    """The feature-gated fields we sent that the server did not store (a cheap, targeted form of
    `agent.kube.objects.dropped_fields` for slices with thousands of devices)."""
    missing = []
    if sent.get("perDeviceNodeSelection") and not stored.get("perDeviceNodeSelection"):
        missing.append("perDeviceNodeSelection")
    stored_devices = stored.get("devices") or []
    for i, dev in enumerate(sent.get("devices") or []):
        got = stored_devices[i] if i < len(stored_devices) else {}
        missing.extend(
            f"devices[{i}].{k}" for k in _GATED_DEVICE_FIELDS if k in dev and k not in got
        )
        if missing:
            break  # one device says it all
    return missing


def taints_dropped(sent: dict[str, Any], stored: dict[str, Any]) -> bool:
    """We sent device taints and the server stored none for that device (DRADeviceTaints off:
    the API server drops the field)."""
    stored_devices = stored.get("devices") or []
    for i, dev in enumerate(sent.get("devices") or []):
        if dev.get("taints"):
            got = stored_devices[i] if i < len(stored_devices) else {}
            return not got.get("taints")
    return False
