"""The node role's link to the cluster role: it watches the ComposableResources targeting this
node, sees their GPUs arrive in the PCI tree (hot-plug events, then a scan), identifies them
(PCI address the fabric reported, UUID from NVML), and writes what it saw into the resource's
status — `NodeReady` with the PCI address and UUID — which the scaler waits for. Before a detach
it removes the device safely (no compute process, no open handle, then `remove` in sysfs, off the
loop) and writes `NodeReleased`, which the composer waits for; a busy device is refused with the
reason (`NodeReleased=False, reason=Busy`).

It also reports each ready GPU's health as the `DeviceHealthy` condition: False with the fault's
reason (`Xid79`, `DoubleBitEcc`... from NVML's events on a thread of their own, see
agent/node/health.py) or `FellOffBus` (the PCI function gone while attached, not being
released); True again once the fault has cleared. A GPU never found unhealthy gets no condition
(absent means healthy), so healthy attaches cost no write.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import shutil
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from agent import errors, health, logs, settings
from agent.backoff import Backoff
from agent.errors import NvmlError
from agent.kube.client import MERGE_PATCH, Kube, Obj
from agent.kube.resources import (
    NODE_READY,
    NODE_RELEASED,
    RESOURCES,
    condition,
    deleting,
    spec,
    state,
)
from agent.kube.watching import Event, Informer
from agent.model.composing import adopted_in_use
from agent.model.objects import DEVICE_HEALTHY, devices_of
from agent.model.pci import PciFunction
from agent.model.pool import device_name
from agent.native import scanning
from agent.native.nvml import AsyncNvml, Nvml, NvmlEvent
from agent.node import health as gpuhealth
from agent.node.hotplug import KernelPciMonitor, PciEvent, TreePciWatcher

logger = logging.getLogger(__name__)

#: How often a faulty GPU is probed (NVML) to see whether its fault has cleared, at most (s).
PROBE_INTERVAL = 1.0


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class NodeReporter:
    def __init__(
        self,
        kube: Kube,
        cfg: settings.NodeSettings,
        *,
        node: str,
        dev_root: str = "/dev",
        proc_root: str = "/proc",
    ) -> None:
        """`dev_root` holds the device nodes (`nvidia<minor>`) and `proc_root` the processes whose
        open files the safe removal checks; other roots are for tests."""
        self.kube = kube
        self.cfg = cfg
        self.node = node
        self.functions: dict[str, PciFunction] = {}
        self.resources = Informer(
            kube, RESOURCES, name=f"resources@{node}", field_selector=f"spec.target_node={node}"
        )
        self.resources.add_handler(self._on_resource)
        self.nvml = AsyncNvml(Nvml(cfg.nvml_path))
        self._sysfs = ThreadPoolExecutor(1, thread_name_prefix="sysfs")  # blocking sysfs I/O
        self._pending: set[str] = set()
        self.synthetic = os.path.realpath(cfg.sysfs_root) != "/sys"
        self.dev_root = dev_root
        self.proc_root = proc_root
        self._wake = asyncio.Event()
        self._timers: set[asyncio.TimerHandle] = set()
        #: Set once the first PCI scan has finished (the node role's readiness).
        self.scanned = asyncio.Event()
        #: resource name -> retry delay after failures, and the class of its last failure
        self._backoff: Backoff[str] = Backoff(base=1.0, cap=30.0)
        self._failing: dict[str, type[BaseException]] = {}
        #: set by the kubelet plugin: the claims prepared on this node with any of these device
        #: names (a device prepared for a pod is in use before any process opens it)
        self.prepared_for: Callable[[set[str]], Awaitable[list[str]]] | None = None
        #: (resource name -> monotonic time its function was first seen), for benchmarks
        self.reported: dict[str, float] = {}
        self.events_seen: dict[str, float] = {}
        #: the GPUs' faults (NVML events), and the reason each resource is reported unhealthy for
        self.health = gpuhealth.HealthBook(gpuhealth.parse_xids(cfg.fatal_xids), cfg.health_hold)
        self._unhealthy: dict[str, str] = {}
        #: resources with a probe timer pending (a faulty GPU is probed until its fault clears)
        self._probing: set[str] = set()
        self._events_stop = threading.Event()

    # --- inputs ----------------------------------------------------------------------------------

    def _on_resource(self, event: Event) -> None:
        if event.type != "DELETED":
            self._pending.add(event.obj["metadata"]["name"])
            self._wake.set()

    def _on_pci(self, ev: PciEvent) -> None:
        source = "inotify" if self.synthetic else "kernel"
        health.HOTPLUG_EVENTS.labels(source, ev.action or "unknown").inc()
        if ev.address:
            self.events_seen.setdefault(ev.address, ev.received)
        fault = gpuhealth.pcie_fault(ev.action, ev.properties, ev.address)
        if fault is not None:
            self.health.hold_fault(ev.address, fault)
            logger.warning(
                "node %s: %s: %s",
                self.node,
                fault.reason,
                fault.message,
                extra=logs.fields(decision="gpu-fault", node=self.node, reason=fault.reason),
            )
        self._rescan_wanted = True
        self._pending.update(n for _, n in self.resources.store)
        self._wake.set()

    _rescan_wanted = True

    def _on_nvml_event(self, ev: NvmlEvent) -> None:
        """An NVML event (on the loop): a fault is held for its GPU and the resources at that
        address are looked at again."""
        fault = self.health.record(ev)
        names = [n for (_, n), o in self.resources.store.items() if _pci_address(o) == ev.bus_id]
        if fault is None:
            logger.debug(
                "node %s: NVML event 0x%x (%d) on %s is not a fault",
                self.node,
                ev.event_type,
                ev.data,
                ev.bus_id,
            )
            return
        logger.warning(
            "node %s: %s: %s",
            self.node,
            fault.reason,
            fault.message,
            extra=logs.fields(
                decision="gpu-fault",
                resource=",".join(names),
                node=self.node,
                reason=fault.reason,
            ),
        )
        self._pending.update(names)
        self._wake.set()

    async def _scan(self) -> None:
        """Read the PCI tree into `functions`. The wish for a rescan is cleared before reading:
        an event that arrives while the tree is being read asks again."""
        self._rescan_wanted = False
        fns = await asyncio.get_running_loop().run_in_executor(
            self._sysfs, scanning.scan, self.cfg.sysfs_root
        )
        self.functions = {f.address: f for f in fns}
        self.scanned.set()

    # --- main loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: the informer of this node's ComposableResources and the reconcile
        loop, in one TaskGroup (either failing stops both)."""
        source: TreePciWatcher | KernelPciMonitor = (
            TreePciWatcher(self.cfg.sysfs_root, self._on_pci)
            if self.synthetic
            else KernelPciMonitor(self._on_pci)
        )
        source.start()
        try:
            has_nvml = await self.nvml.start()
            logger.info(
                "node role on %s: sysfs %s, NVML %s",
                self.node,
                self.cfg.sysfs_root,
                "loaded" if has_nvml else "absent",
            )
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.resources.run(), name=f"informer:{self.resources.name}")
                tg.create_task(self._reconcile(), name=f"node-reporter:{self.node}")
                if has_nvml:
                    self._events_stop.clear()
                    tg.create_task(
                        self.nvml.watch_events(self._on_nvml_event, self._events_stop),
                        name=f"nvml-events:{self.node}",
                    )
        finally:
            self._events_stop.set()
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()
            self._probing.clear()
            source.stop()
            await self.nvml.close()
            self._sysfs.shutdown(wait=False)

    async def _reconcile(self) -> None:
        await self._scan()
        await self.resources.synced.wait()
        self._pending.update(n for _, n in self.resources.store)
        next_resync = time.monotonic() + self.cfg.resync
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_resync - time.monotonic())):
                    await self._wake.wait()
            self._wake.clear()
            if time.monotonic() >= next_resync:
                self._rescan_wanted = True
                self._pending.update(n for _, n in self.resources.store)
                next_resync = time.monotonic() + self.cfg.resync
            if self._rescan_wanted:
                await self._scan()
                if self._rescan_wanted:
                    continue  # the tree changed while it was read: read it again first
            pending, self._pending = self._pending, set()
            async with asyncio.TaskGroup() as tg:
                for name in pending:
                    tg.create_task(self._handle(name), name=f"resource:{name}")

    async def _handle(self, name: str) -> None:
        obj = self.resources.get("", name)
        if obj is None:
            self._backoff.forget(name)
            self._failing.pop(name, None)
            self._count_unhealthy(name, None)
            return
        try:
            if deleting(obj):
                self._count_unhealthy(name, None)
                if condition(obj, NODE_READY) and not condition(obj, NODE_RELEASED):
                    await self._release(obj)
                elif adopted_in_use(obj):
                    # CoHDI's GPU, deleted before we reported it: report it (its update brings
                    # us back to release it safely); never leave the composer without an answer
                    await self._identify(obj)
            elif state(obj) == "Online" and not condition(obj, NODE_READY):
                await self._identify(obj)
            elif state(obj) == "Online":
                await self._health(obj)
        except errors.AgentError as exc:
            # Retried with backoff (1 s doubling to 30 s); one line when the failures start or
            # change kind, DEBUG while they repeat, INFO when the resource is handled again.
            loud = self._failing.get(name) is not type(exc)
            self._failing[name] = type(exc)
            delay = self._backoff.delay(name)
            logger.log(
                logging.WARNING if loud else logging.DEBUG,
                "node %s: resource %s: %s; retry in %.1f s%s",
                self.node,
                name,
                exc,
                delay,
                " (with backoff; repeats logged at DEBUG)" if loud else "",
                extra=logs.fields(resource=name, node=self.node, error=str(exc)),
            )
            self._retry_later(delay, name)
            return
        self._backoff.forget(name)
        if self._failing.pop(name, None) is not None:
            logger.info(
                "node %s: resource %s handled again after failures",
                self.node,
                name,
                extra=logs.fields(resource=name, node=self.node),
            )

    def _retry(self, name: str) -> None:
        self._probing.discard(name)
        self._pending.add(name)
        self._wake.set()

    def _retry_later(self, delay: float, name: str) -> None:
        """Look at `name` again in `delay` seconds (a timer run() cancels when it ends)."""
        loop = asyncio.get_running_loop()
        self._timers = {t for t in self._timers if t.when() > loop.time()}  # drop those run
        self._timers.add(loop.call_later(delay, self._retry, name))

    # --- arrival ---------------------------------------------------------------------------------

    async def _identify(self, obj: Obj) -> None:
        st = obj.get("status") or {}
        bdf = st.get("pci_address") or ""
        if not bdf and st.get("device_id") and self.nvml.available:
            # a GPU CoHDI attached: its resource has the UUID, not the PCI address
            bdf = await self._nvml_bus_id(str(st["device_id"]))
            if bdf and bdf not in self.functions:
                await self._scan()
        fn = self.functions.get(bdf)
        if fn is None:
            await self._maybe_rescan(obj)
            return
        uuid = st.get("device_id") or ""
        if self.nvml.available:
            uuid = await self._nvml_uuid(bdf) or uuid
        self.health.forget(bdf)  # a GPU arrived at this address: an earlier one's fault is not its
        await self._conditions(
            obj,
            NODE_READY,
            "True",
            "Seen",
            f"{bdf} ({fn.vendor:04x}:{fn.device:04x}, driver {fn.driver or 'none'}) "
            f"is present{', UUID ' + uuid if uuid else ''}",
            extra={"pci_address": bdf, "device_id": uuid},
        )
        self.reported[obj["metadata"]["name"]] = time.monotonic()

    async def _nvml_bus_id(self, uuid: str) -> str:
        """The PCI address of the GPU NVML knows by `uuid` (case as NVML reports it, or upper
        case), "" when none (after one re-init: NVML snapshots GPUs at init)."""
        n = self.nvml.nvml

        def lookup() -> str:
            for attempt in (1, 2):
                for candidate in dict.fromkeys((uuid, _nvml_form(uuid))):
                    try:
                        return str(n.pci_info(n.handle_by_uuid(candidate))[0])
                    except NvmlError:
                        health.NVML_ERRORS.inc()
                if attempt == 1:
                    n.reinit()
            return ""

        return str(await self.nvml.call(lookup))

    async def _nvml_uuid(self, bdf: str) -> str:
        n = self.nvml.nvml

        def lookup() -> str:
            try:
                return n.uuid(n.handle_by_bus_id(bdf))
            except NvmlError:
                health.NVML_ERRORS.inc()
                n.reinit()  # NVML snapshots GPUs at init: a hot-added one needs a re-init
                try:
                    return n.uuid(n.handle_by_bus_id(bdf))
                except NvmlError:
                    health.NVML_ERRORS.inc()
                    return ""

        return str(await self.nvml.call(lookup))

    async def _maybe_rescan(self, obj: Obj) -> None:
        if self.cfg.rescan == "never":
            return
        if self.cfg.rescan == "auto":
            await asyncio.sleep(self.cfg.rescan_after)
            await self._scan()
            if (obj.get("status") or {}).get("pci_address") in self.functions:
                self._retry(obj["metadata"]["name"])
                return
        path = os.path.join(self.cfg.sysfs_root, "bus", "pci", "rescan")
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(self._sysfs, _write_if_exists, path, "1"):
            logger.info("node %s: wrote %s (no hot-plug interrupt seen)", self.node, path)
            self._retry(obj["metadata"]["name"])

    # --- health ----------------------------------------------------------------------------------

    def verdict(self, obj: Obj) -> tuple[str, str, str] | None:
        """(status, reason, message) of the GPU of a resource this node reported ready:
        ("False", "FellOffBus", ...) when its PCI function is gone, ("False", <fault>, ...) while
        a fault is held, ("True", "Healthy", ...) when NVML watches it, else None (cannot tell:
        no NVML, or NVML cannot report its events)."""
        bdf = _pci_address(obj)
        if not bdf:
            return None
        if bdf not in self.functions:
            return (
                gpuhealth.UNHEALTHY,
                "FellOffBus",
                f"the PCI function {bdf} is gone from the node while attached",
            )
        fault = self.health.fault(bdf)
        if fault is not None:
            return gpuhealth.UNHEALTHY, fault.reason, fault.message
        if self.nvml.available and bdf in self.nvml.nvml.watched:
            return gpuhealth.HEALTHY, "Healthy", f"{bdf}: present, no fatal NVML event held"
        return None

    async def _health(self, obj: Obj) -> None:
        """Write the GPU's DeviceHealthy condition when the verdict differs from it (absent
        counts as True); a faulty GPU is probed, and looked at again until its fault clears."""
        name = obj["metadata"]["name"]
        bdf = _pci_address(obj)
        if bdf in self.functions and self.health.fault(bdf) is not None:
            answered = True
            if self.nvml.available:
                answered = bool(await self.nvml.call(gpuhealth.probe, self.nvml.nvml, bdf))
            self.health.probed(bdf, answered)
        verdict = self.verdict(obj)
        if verdict is not None:
            status, reason, message = verdict
            current = next(
                (
                    c
                    for c in (obj.get("status") or {}).get("conditions") or []
                    if c.get("type") == DEVICE_HEALTHY
                ),
                None,
            )
            was = (current.get("status"), current.get("reason")) if current else None
            if was != (status, reason) and (was is not None or status != gpuhealth.HEALTHY):
                await self._conditions(obj, DEVICE_HEALTHY, status, reason, message)
                self.health.notify()
            self._count_unhealthy(name, reason if status == gpuhealth.UNHEALTHY else None)
        if self.health.fault(bdf) is not None and name not in self._probing:
            wait = self.health.clears_in(bdf) or PROBE_INTERVAL
            self._probing.add(name)  # one timer per resource, however often it is handled
            self._retry_later(max(0.05, min(PROBE_INTERVAL, wait)), name)

    def _count_unhealthy(self, name: str, reason: str | None) -> None:
        """Keep cohdi_node_unhealthy_devices{reason} in step with what `name` is reported as."""
        before = self._unhealthy.pop(name, None)
        if reason is not None:
            self._unhealthy[name] = reason
        if before == reason:
            return
        if before is not None:
            health.NODE_UNHEALTHY_DEVICES.labels(before).dec()
        if reason is not None:
            health.NODE_UNHEALTHY_DEVICES.labels(reason).inc()

    # --- departure -------------------------------------------------------------------------------

    async def _release(self, obj: Obj) -> None:
        st = obj.get("status") or {}
        bdf = st.get("pci_address") or ""
        if not spec(obj).get("force_detach"):
            busy = await self._busy(bdf)
            if not busy and self.prepared_for is not None:
                names = {device_name(d) for d in devices_of(obj)}
                claims = await self.prepared_for(names)
                if claims:  # kubelet prepared it for a pod that has not ended (maybe not started)
                    busy = f"prepared for claim {', '.join(claims)}"
            if busy:
                await self._conditions(obj, NODE_RELEASED, "False", "Busy", busy)
                self._retry_later(5.0, obj["metadata"]["name"])
                return
        if bdf in self.functions:
            await asyncio.get_running_loop().run_in_executor(self._sysfs, self._remove, bdf)
            await self._scan()
        await self._conditions(
            obj,
            NODE_RELEASED,
            "True",
            "Removed",
            f"{bdf or 'the device'} removed from the PCI tree; safe to detach",
        )

    async def _busy(self, bdf: str) -> str:
        """Why the device cannot go now, or "" when it can."""
        if not bdf or not self.nvml.available:
            return ""
        n = self.nvml.nvml

        def check() -> tuple[list[tuple[int, int]], int]:
            try:
                h = n.handle_by_bus_id(bdf)
            except NvmlError:
                health.NVML_ERRORS.inc()
                return [], -1
            return n.compute_processes(h), n.minor(h)

        procs, minor = await self.nvml.call(check)
        if procs:
            pids = ", ".join(str(p) for p, _ in procs)
            return f"{len(procs)} compute process(es) use {bdf}: pids {pids}"
        if minor >= 0:
            device = os.path.join(self.dev_root, f"nvidia{minor}")
            holders = await asyncio.get_running_loop().run_in_executor(
                self._sysfs, open_handles, device, self.proc_root
            )
            if holders:
                return f"{device} is open in pids {', '.join(map(str, holders))}"
        return ""

    def _remove(self, bdf: str) -> None:
        d = os.path.join(self.cfg.sysfs_root, "bus", "pci", "devices", bdf)
        remove = os.path.join(d, "remove")
        if os.path.exists(remove):
            _write(remove, "1")  # the kernel unbinds the driver and drops the function
        elif self.synthetic:
            shutil.rmtree(d, ignore_errors=True)  # a synthetic tree: do what the kernel would

    async def _conditions(
        self,
        obj: Obj,
        ctype: str,
        status: str,
        reason: str,
        message: str,
        extra: dict[str, Any] | None = None,
    ) -> None:
        before = [
            c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == ctype
        ]
        conds = [
            c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") != ctype
        ]
        conds.append(
            {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": message[:1000],
                "lastTransitionTime": _now(),
            }
        )
        body: dict[str, Any] = {"conditions": conds}
        for key, value in (extra or {}).items():
            if value:
                body[key] = value
        name = obj["metadata"]["name"]
        await self.kube.patch(
            f"{RESOURCES}/{name}/status", {"status": body}, content_type=MERGE_PATCH
        )
        report = ctype if status == "True" else reason
        if ctype == DEVICE_HEALTHY:
            report = "DeviceHealthy" if status == "True" else "DeviceUnhealthy"
        health.NODE_REPORTS.labels(report).inc()
        changed = not before or (before[0].get("status"), before[0].get("reason")) != (
            status,
            reason,
        )
        level = logging.WARNING if report == "DeviceUnhealthy" else logging.INFO
        logger.log(  # one line when the report changes, not one per retry (Busy: every 5 s)
            level if changed else logging.DEBUG,
            "node %s: %s %s=%s (%s): %s",
            self.node,
            name,
            ctype,
            status,
            reason,
            message,
            extra=logs.fields(
                decision={
                    "NodeReady": "node-ready",
                    "NodeReleased": "released",
                    "DeviceHealthy": "healthy",
                    "DeviceUnhealthy": "unhealthy",
                }.get(report, report.lower()),
                resource=name,
                device=(obj.get("status") or {}).get("cdi_device_id"),
                node=self.node,
                reason=reason,
            ),
        )


def _nvml_form(uuid: str) -> str:
    """A GPU UUID as NVML writes it (`GPU-` then lower-case hex): CoHDI copies the fabric's serial
    number, whose case may differ."""
    prefix, sep, rest = uuid.partition("-")
    return f"GPU-{rest.lower()}" if sep and prefix.upper() == "GPU" else uuid.lower()


def _pci_address(obj: Obj) -> str:
    """The PCI address the fabric reported for the resource's GPU ("" before the attach)."""
    return str((obj.get("status") or {}).get("pci_address") or "")


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def _write_if_exists(path: str, text: str) -> bool:
    if not os.path.exists(path):
        return False
    _write(path, text)
    return True


def open_handles(device: str, proc_root: str = "/proc") -> list[int]:
    """Pids with `device` open, from `<proc_root>/<pid>/fd/*` (what fuser does): an fd whose
    target has the device's st_rdev and st_ino. Empty if the device does not exist; processes and
    fds that vanish or are not ours to read while we look are skipped."""
    try:
        target = os.stat(device)
    except OSError:
        return []
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return []
    pids = []
    for pid in filter(str.isdigit, entries):
        fd_dir = os.path.join(proc_root, pid, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if st.st_rdev == target.st_rdev and st.st_ino == target.st_ino:
                pids.append(int(pid))
                break
    return sorted(pids)
