"""The DRA kubelet plugin: plugin registration (v1), the DRA service (v1 and v1beta1, one
implementation) and the resource-health service (dra-health v1alpha1) on unix sockets under the
kubelet directory, sockets 0600.

NodePrepareResources, per claim: checkpoint says PrepareCompleted → the same answer again;
otherwise record PrepareStarted, read the claim from the API server (our allocation results),
map each (pool, device) to the PCI function the node saw arrive, write the claim's CDI spec,
record PrepareCompleted, and answer the CDI ids. Every claim is in the response; a claim that
fails carries its error there (a gRPC error is only for a malformed request); an empty request is
fine. NodeUnprepareResources removes the spec and the record, also for claims long deleted.
A checkpoint that cannot be read does not stop the plugin: every claim's answer carries its error
until an operator moves the file away. Checkpoint and CDI file work runs on worker threads.
Sockets appear whole and private, and a process removes only sockets it bound (`KubeletPlugin`).

NodeWatchResources (kubelet 1.36 calls it on the DRA socket when ResourceHealthStatus is on, and
logs an error every 5 s when it is Unimplemented; 1.37 only when the registration lists the
service, `SUPPORTED`): a stream of the health of every device
prepared on this node, each response the complete list, sent at once, again whenever a health
fact or the set of prepared devices changes, and every `HEALTH_RESEND` seconds (kubelet turns a
device it has not heard of for `HEALTH_TIMEOUT` seconds to Unknown). Healthy/Unhealthy come from
the node reporter's verdict on the GPU (NVML events, the PCI function gone); Unknown when it cannot
tell (no NVML, or the device is not a ready GPU of this node).

Both sockets also serve the standard gRPC health service, grpc.health.v1.Health (gRPC's own
servicer from grpcio-health-checking; `PluginHealth`): Check and Watch for "" (the socket's server)
and for each service it serves; SERVING while the plugin serves and the node role is ready,
NOT_SERVING before, when it is not ready (an unreadable checkpoint: every prepare fails) and for
good once stopping. kubelet does not call it; it is for operators and node-local probes
(`grpc_health_probe -addr unix://<socket>`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import socket as socketlib
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent import errors, health, logs
from agent._proto.dra.v1 import api_pb2 as v1
from agent._proto.dra.v1 import api_pb2_grpc as v1_grpc
from agent._proto.dra.v1beta1 import api_pb2 as v1beta1
from agent._proto.dra.v1beta1 import api_pb2_grpc as v1beta1_grpc
from agent._proto.drahealth.v1alpha1 import api_pb2 as drahealth
from agent._proto.drahealth.v1alpha1 import api_pb2_grpc as drahealth_grpc
from agent._proto.pluginregistration.v1 import api_pb2 as reg
from agent._proto.pluginregistration.v1 import api_pb2_grpc as reg_grpc
from agent.kube.client import Kube, path_of
from agent.model.objects import NODE_READY, condition, deleting, devices_of
from agent.model.pool import device_name
from agent.node import cdi
from agent.node import health as gpuhealth
from agent.node.checkpoint import COMPLETED, STARTED, Checkpoint, PreparedClaim
from agent.node.reporting import NodeReporter

logger = logging.getLogger(__name__)

#: The gRPC services the registration announces, "<proto package>.<service>": kubelet picks the
#: first DRA service it knows; from 1.37 it opens the resource-health stream only to a plugin
#: that lists a DRAResourceHealth service here (1.36 always tried it). kubelet 1.37-1.39 take
#: v1alpha1, which 1.40 drops for v1 (the same messages under package v1).
SUPPORTED = ["v1.DRAPlugin", "v1beta1.DRAPlugin", "v1alpha1.DRAResourceHealth"]
#: Kubelet turns a device's health to Unknown after this long without news of it (s); we say so
#: on every device and repeat the full list every HEALTH_RESEND seconds.
HEALTH_TIMEOUT = 30
HEALTH_RESEND = 10.0
#: kubelet truncates longer messages (dra-health v1alpha1)
HEALTH_MESSAGE_MAX = 1024
#: How often the gRPC health status is re-evaluated (s): the verdict reads in-memory state only
#: (and stats the checkpoint while it is unreadable), and nothing signals every change it
#: follows (an unreadable checkpoint moved away by an operator, the first PCI scan done).
GRPC_HEALTH_RECHECK = 1.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Preparer:
    """What both DRA service versions call; owns the checkpoint and the CDI files.

    The checkpoint's file lock, reads, fsyncs and renames, and the CDI file writes, run on a
    worker thread (`asyncio.to_thread`), never on the event loop. One prepare or unprepare runs at
    a time in this process (`_lock`); the file lock orders them with any other process.
    """

    def __init__(
        self, kube: Kube, *, driver: str, reporter: NodeReporter, plugin_dir: Path, cdi_dir: Path
    ) -> None:
        self.kube = kube
        self.driver = driver
        self.reporter = reporter
        self.cdi_dir = cdi_dir
        self.checkpoint = Checkpoint(plugin_dir / "checkpoint.json")
        self._lock = asyncio.Lock()
        #: why the last read of the checkpoint failed ("" when it did not): the node is not ready
        self.checkpoint_error = ""
        # safe removal asks us: a device prepared for a claim is in use even with no process yet
        reporter.prepared_for = self.prepared_for

    async def prepared_for(self, devices: set[str]) -> list[str]:
        """`<namespace>/<name>` of the claims prepared on this node with any of `devices` (device
        names as published). An unreadable checkpoint counts as in use (the safe answer)."""

        def read() -> list[str]:
            with self.checkpoint.locked():
                claims = self.checkpoint.load()
            return sorted(
                f"{c.namespace}/{c.name}"
                for c in claims.values()
                if any(d.get("device") in devices for d in c.devices)
            )

        try:
            return await asyncio.to_thread(read)
        except errors.CheckpointError as exc:
            return [f"(checkpoint unreadable: {exc})"]

    # --- on a worker thread ----------------------------------------------------------------------

    def _load(self) -> dict[str, PreparedClaim]:
        """The checkpoint's claims (the caller holds its lock). Entries of an earlier boot are
        dropped from the result and their CDI files removed: the reboot reset the devices, and
        their specs must not outlive them. Raises CheckpointError (unreadable checkpoint), and
        remembers it for readiness (`checkpoint_error`) until a read succeeds."""
        try:
            claims = self.checkpoint.load()
        except errors.CheckpointError as exc:
            self.checkpoint_error = str(exc)
            raise
        self.checkpoint_error = ""
        for old in self.checkpoint.stale:
            cdi.remove(self.cdi_dir, self.driver, old.uid)
            logger.info(
                "dropped claim %s/%s prepared before the last reboot", old.namespace, old.name
            )
        return claims

    def clean_stale(self) -> None:
        """At start: forget the claims of an earlier boot. An unreadable checkpoint does not stop
        the plugin: it is logged here, and every prepare and unprepare reports it for its claim
        until an operator moves the file away (kubelet retries them)."""
        with self.checkpoint.locked():
            try:
                claims = self._load()
            except errors.CheckpointError as exc:
                logger.error("%s", exc)
                return
            if self.checkpoint.stale:
                self.checkpoint.save(claims)

    def _begin(self, namespace: str, uid: str, name: str) -> list[dict[str, Any]] | None:
        """The devices of a claim already prepared, or None after recording PrepareStarted."""
        with self.checkpoint.locked():
            claims = self._load()
            done = claims.get(uid)
            if done is not None and done.state == COMPLETED:
                return done.devices
            claims[uid] = PreparedClaim(uid, namespace, name, STARTED)
            self.checkpoint.save(claims)
            return None

    def _complete(self, claim: PreparedClaim, spec_doc: dict[str, Any]) -> None:
        """Write the claim's CDI spec, then record PrepareCompleted."""
        claim.cdi_file = str(cdi.write(self.cdi_dir, self.driver, claim.uid, spec_doc))
        with self.checkpoint.locked():
            claims = self._load()
            claims[claim.uid] = claim
            self.checkpoint.save(claims)

    def _forget(self, uid: str) -> None:
        """Remove the claim's CDI spec, then its record (both may be gone already)."""
        cdi.remove(self.cdi_dir, self.driver, uid)
        with self.checkpoint.locked():
            claims = self._load()
            if claims.pop(uid, None) is not None or self.checkpoint.stale:
                self.checkpoint.save(claims)

    # --- on the event loop -----------------------------------------------------------------------

    async def prepare(self, namespace: str, uid: str, name: str) -> list[dict[str, Any]]:
        """[{"request_names", "pool", "device", "cdi_ids"}] per device of the claim for this
        driver. Raises AgentError (PrepareError, CheckpointError, KubeError), ValueError or
        OSError; a claim whose prepare failed stays PrepareStarted and is done again next time."""
        async with self._lock:
            done = await asyncio.to_thread(self._begin, namespace, uid, name)
            if done is not None:
                return done
            devices, spec_doc = await self._devices(namespace, uid, name)
            claim = PreparedClaim(uid, namespace, name, COMPLETED, devices)
            await asyncio.to_thread(self._complete, claim, spec_doc)
            self.reporter.health.notify()  # the health stream names one more device
            return devices

    async def unprepare(self, uid: str) -> None:
        async with self._lock:
            await asyncio.to_thread(self._forget, uid)
            self.reporter.health.notify()

    async def prepared_devices(self) -> list[tuple[str, str]]:
        """(pool, device) of every device of a claim prepared on this node, sorted; empty when
        the checkpoint cannot be read (kubelet then turns them Unknown after its timeout)."""

        def read() -> list[tuple[str, str]]:
            with self.checkpoint.locked():
                claims = self.checkpoint.load()
            return sorted(
                {
                    (str(d.get("pool") or ""), str(d.get("device") or ""))
                    for c in claims.values()
                    if c.state == COMPLETED
                    for d in c.devices
                }
            )

        try:
            return await asyncio.to_thread(read)
        except errors.CheckpointError as exc:
            logger.debug("health stream: checkpoint unreadable: %s", exc)
            return []

    def device_health(self, device: str) -> tuple[drahealth.HealthStatus, str]:
        """(dra-health HealthStatus, message) of a published device name on this node."""
        obj = self.resource_of(device)
        if obj is None:
            return drahealth.UNKNOWN, f"{device} is not attached to this node"
        if deleting(obj) or not condition(obj, NODE_READY):
            return drahealth.UNKNOWN, f"{device} is being attached or released"
        verdict = self.reporter.verdict(obj)
        if verdict is None:
            return drahealth.UNKNOWN, f"{device}: no health source (NVML absent or not watching it)"
        status, reason, message = verdict
        if status == gpuhealth.UNHEALTHY:
            return drahealth.UNHEALTHY, f"{reason}: {message}"[:HEALTH_MESSAGE_MAX]
        return drahealth.HEALTHY, message[:HEALTH_MESSAGE_MAX]

    async def health_response(self) -> Any:
        """One NodeWatchResourcesResponse: every prepared device and its health now."""
        now = int(time.time())
        response = drahealth.NodeWatchResourcesResponse()
        for pool, device in await self.prepared_devices():
            status, message = self.device_health(device)
            response.devices.append(
                drahealth.DeviceHealth(
                    device=drahealth.DeviceIdentifier(pool_name=pool, device_name=device),
                    health=status,
                    last_updated_time=now,
                    health_check_timeout_seconds=HEALTH_TIMEOUT,
                    message=message,
                )
            )
        return response

    def measured(
        self,
        operation: str,
        claim: Any,
        started: float,
        *,
        devices: list[str] | None = None,
        error: BaseException | None = None,
    ) -> None:
        """The decision line and the metrics of one prepare/unprepare of `claim` (a kubelet
        request's Claim: namespace, name, uid) that began at `started` (monotonic)."""
        took = time.monotonic() - started
        outcome = "ok" if error is None else "error"
        health.NODE_CLAIM_SECONDS.labels(operation, outcome).observe(took)
        fields = logs.fields(
            decision=f"{operation}d" if error is None else f"{operation}-failed",
            claim=f"{claim.namespace}/{claim.name}",
            device=",".join(devices or []),
            node=self.reporter.node,
            duration=took,
            error=str(error) if error is not None else "",
        )
        if error is not None:
            health.NODE_CLAIM_ERRORS.labels(operation).inc()
            logger.warning(
                "%s %s/%s failed: %s", operation, claim.namespace, claim.name, error, extra=fields
            )
            return
        health.NODE_CLAIMS.labels(operation).inc()
        logger.info(
            "%sd claim %s/%s%s in %.3f s",
            operation,
            claim.namespace,
            claim.name,
            f" ({', '.join(devices)})" if devices else "",
            took,
            extra=fields,
        )

    async def _devices(
        self, namespace: str, uid: str, name: str
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        claim = await self.kube.get(
            path_of(
                group="resource.k8s.io",
                version="v1",
                plural="resourceclaims",
                namespace=namespace,
                name=name,
            )
        )
        if claim["metadata"].get("uid") != uid:
            raise errors.PrepareError(
                f"claim {namespace}/{name} was replaced "
                f"(uid {claim['metadata'].get('uid')}, asked {uid})"
            )
        allocation = (claim.get("status") or {}).get("allocation")
        if not allocation:
            raise errors.PrepareError(f"claim {namespace}/{name} is not allocated")
        results = [r for r in allocation["devices"]["results"] if r["driver"] == self.driver]
        if not results:
            raise errors.PrepareError(
                f"claim {namespace}/{name} has no device of driver {self.driver}"
            )
        out, cdi_devices = [], []
        for r in results:
            bdf, serial, minor = await self._local(r["pool"], r["device"])
            fn = self.reporter.functions.get(bdf)
            if fn is None:
                raise errors.PrepareError(
                    f"device {r['pool']}/{r['device']} ({bdf}) is not on this node's PCI bus"
                )
            nodes = cdi.device_nodes(fn, minor=minor)
            env = {"COHDI_GPU_BDF": bdf}
            if serial:
                env["NVIDIA_VISIBLE_DEVICES"] = serial
            cdi_devices.append((r["device"], nodes, env))
            out.append({"request_names": [r["request"]], "pool": r["pool"], "device": r["device"]})
        spec_doc = cdi.build(self.driver, uid, cdi_devices)
        for entry, cdi_id in zip(out, cdi.qualified_ids(spec_doc), strict=True):
            entry["cdi_ids"] = [cdi_id]
        return out, spec_doc

    async def _local(self, pool: str, device: str) -> tuple[str, str, int | None]:
        """(PCI address, GPU UUID, minor) of a pool device, from the ComposableResource the node
        reported on."""
        obj = self.resource_of(device)
        if obj is None:
            raise errors.PrepareError(f"no attached device {pool}/{device} on this node")
        st = obj.get("status") or {}
        bdf = st.get("pci_address") or ""
        return bdf, st.get("device_id") or "", await self._minor(bdf)

    def resource_of(self, device: str) -> dict[str, Any] | None:
        """The ComposableResource of this node whose device is published as `device`."""
        for obj in self.reporter.resources.store.values():
            # The claim holds the name the device was published under: the resource's identity
            # (for an anonymous slot, the slot — not the GPU that arrived through it).
            if device in {device_name(d) for d in devices_of(obj)}:
                return obj
        return None

    async def _minor(self, bdf: str) -> int | None:
        if not self.reporter.nvml.available or not bdf:
            return None
        n = self.reporter.nvml.nvml

        def get() -> int | None:
            try:
                return n.minor(n.handle_by_bus_id(bdf))
            except errors.NvmlError:
                health.NVML_ERRORS.inc()
                n.reinit()
                try:
                    return n.minor(n.handle_by_bus_id(bdf))
                except errors.NvmlError:
                    health.NVML_ERRORS.inc()
                    return None

        result = await self.reporter.nvml.call(get)
        return result if isinstance(result, int) else None


def _servicer(pb: Any, base: Any, preparer: Preparer) -> Any:
    class Servicer(base):  # type: ignore[misc]
        async def NodePrepareResources(self, request: Any, context: Any) -> Any:
            response = pb.NodePrepareResourcesResponse()
            for claim in request.claims:
                entry = response.claims[claim.uid]
                started = time.monotonic()
                try:
                    devices = await preparer.prepare(claim.namespace, claim.uid, claim.name)
                    for d in devices:
                        entry.devices.append(
                            pb.Device(
                                request_names=d["request_names"],
                                pool_name=d["pool"],
                                device_name=d["device"],
                                cdi_device_ids=d["cdi_ids"],
                            )
                        )
                except (errors.AgentError, ValueError, OSError) as exc:
                    preparer.measured("prepare", claim, started, error=exc)
                    entry.error = str(exc)
                else:
                    preparer.measured(
                        "prepare", claim, started, devices=[d["device"] for d in devices]
                    )
            return response

        async def NodeUnprepareResources(self, request: Any, context: Any) -> Any:
            response = pb.NodeUnprepareResourcesResponse()
            for claim in request.claims:
                entry = response.claims[claim.uid]
                started = time.monotonic()
                try:
                    await preparer.unprepare(claim.uid)
                except (errors.AgentError, OSError) as exc:
                    preparer.measured("unprepare", claim, started, error=exc)
                    entry.error = str(exc)
                else:
                    preparer.measured("unprepare", claim, started)
            return response

    return Servicer()


class ResourceHealth(drahealth_grpc.DRAResourceHealthServicer):  # type: ignore[misc]
    """kubelet's NodeWatchResources: the health of every prepared device, as a stream."""

    def __init__(self, preparer: Preparer) -> None:
        self.preparer = preparer
        #: set by `close`: every stream ends (kubelet sees the end and dials again, 5 s later)
        self.closing = False

    def close(self) -> None:
        """End the open streams now, so that stopping the server need not wait out its grace."""
        self.closing = True
        self.preparer.reporter.health.notify()

    async def NodeWatchResources(self, request: Any, context: Any) -> AsyncIterator[Any]:
        book = self.preparer.reporter.health
        logger.info("kubelet watches the health of this node's devices")
        while not self.closing:
            changed = book.changes()  # before reading: a change while we send is not missed
            yield await self.preparer.health_response()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEALTH_RESEND):
                    await changed.wait()


class Registration(reg_grpc.RegistrationServicer):  # type: ignore[misc]
    def __init__(self, driver: str, endpoint: str) -> None:
        self.driver = driver
        self.endpoint = endpoint
        self.registered = asyncio.Event()
        #: why kubelet refused the plugin, when its last word was a refusal ("" otherwise)
        self.refused = ""

    async def GetInfo(self, request: Any, context: Any) -> Any:
        return reg.PluginInfo(
            type="DRAPlugin", name=self.driver, endpoint=self.endpoint, supported_versions=SUPPORTED
        )

    async def NotifyRegistrationStatus(self, request: Any, context: Any) -> Any:
        if request.plugin_registered:
            logger.info("kubelet registered the %s plugin", self.driver)
            self.refused = ""
            self.registered.set()
        else:
            logger.error("kubelet refused the %s plugin: %s", self.driver, request.error)
            self.refused = request.error or "no reason given"
            self.registered.clear()
        return reg.RegistrationStatusResponse()


def service_names(*modules: Any) -> tuple[str, ...]:
    """The full gRPC names of the services of generated `_pb2` modules, e.g.
    ("k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin",): the names a health check may ask about."""
    return tuple(s.full_name for m in modules for s in m.DESCRIPTOR.services_by_name.values())


class PluginHealth:
    """grpc.health.v1.Health on the plugin's gRPC servers: one gRPC `HealthServicer` (asyncio)
    per server, all with the same status for "" and for each service the server serves.

    NOT_SERVING from the start until the first verdict; then SERVING exactly while `not_ready()`
    gives no reason (re-evaluated every GRPC_HEALTH_RECHECK seconds; each change logged once with
    its reasons); after `stop()` NOT_SERVING for good (the servicers' graceful shutdown: a later
    set is ignored), so a watcher hears NOT_SERVING before its server closes. A service name the
    server does not serve is NOT_FOUND to Check and SERVICE_UNKNOWN to Watch (gRPC's servicer).
    """

    def __init__(self, not_ready: Callable[[], list[str]]) -> None:
        self.not_ready = not_ready
        self.status: int = NOT_SERVING
        #: why NOT_SERVING, as last evaluated (empty while SERVING)
        self.reasons: list[str] = ["not started"]
        self._servicers: list[tuple[Any, tuple[str, ...]]] = []
        self._task: asyncio.Task[None] | None = None

    async def add_to(self, server: grpc.aio.Server, services: tuple[str, ...]) -> None:
        """Serve the health service on `server` (before it starts), NOT_SERVING for now."""
        servicer = grpc_health.aio.HealthServicer()
        for name in ("", *services):
            await servicer.set(name, NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        self._servicers.append((servicer, services))

    def start(self) -> None:
        """Follow `not_ready()` from now on (the servers serve)."""
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="plugin-grpc-health")

    async def stop(self) -> None:
        """NOT_SERVING for good on every server; stop following."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for servicer, _ in self._servicers:
            await servicer.enter_graceful_shutdown()
        self._servicers.clear()
        if self.status != NOT_SERVING:
            logger.info("gRPC health of the kubelet plugin: NOT_SERVING (stopping)")
        self.status, self.reasons = NOT_SERVING, ["stopping"]

    async def _follow(self) -> None:
        while True:
            try:
                reasons = self.not_ready()
            except Exception as exc:  # a verdict that cannot be had is no SERVING
                reasons = [f"readiness unknown: {exc!r}"]
            await self._apply(reasons)
            await asyncio.sleep(GRPC_HEALTH_RECHECK)

    async def _apply(self, reasons: list[str]) -> None:
        status = NOT_SERVING if reasons else SERVING
        changed = status != self.status
        self.status, self.reasons = status, reasons
        if not changed:
            return
        if reasons:
            logger.warning(
                "gRPC health of the kubelet plugin: NOT_SERVING",
                extra=logs.fields(reason="; ".join(reasons)),
            )
        else:
            logger.info("gRPC health of the kubelet plugin: SERVING")
        for servicer, services in self._servicers:
            for name in ("", *services):
                await servicer.set(name, status)


#: Where, beside its public name, a socket is bound before it is renamed there (`KubeletPlugin`).
BIND_DIR = ".cohdi"
#: A socket file's identity: (st_dev, st_ino).
Identity = tuple[int, int]
#: sun_path is 108 bytes with its NUL.
MAX_SOCKET_PATH = 107


class KubeletPlugin:
    """The two gRPC servers on their unix sockets.

    Each process registers with kubelet under names of its own — `plugins_registry/<driver>-
    <instance>-reg.sock`, endpoint `plugins/<driver>/dra-<instance>.sock` (`<instance>`: 8 random
    hex digits) — so while a DaemonSet's surge pod starts beside the old one, kubelet holds two
    plugins for the driver (its DRA manager keeps a list per driver and calls the newest
    connected one) and the old one's leaving drops only its own: the driver is never
    unregistered. One socket path for both would not do: kubelet unregisters the plugin of a
    registration socket that is replaced, then registers the new one (no plugin in between),
    and refuses a second registration naming an endpoint already registered. The DRA service
    also answers on `plugins/<driver>/dra.sock` (`local_socket`, the newest process's), for
    node-local tools. At start, sockets of this driver that no process answers any more (an
    instance killed before its stop) are removed: kubelet keeps a registration until its socket
    file goes.

    A socket is bound under a private name — `<dir>/.cohdi/<random>/s`, in a directory only we
    can enter, which kubelet's plugin watcher ignores as it starts with a dot — made 0600, then
    renamed onto its public name, so it appears whole, already private, and atomically replaces
    the socket of an earlier process. `<dir>/.cohdi` (`BIND_DIR`) is made once and never removed:
    kubelet's watcher stats every new entry of plugins_registry before it looks at the name, and
    logs an error for one already gone, as a short-lived private directory there would be.
    `stop()` removes a public name only while it is still the socket this process bound (same
    st_dev/st_ino): a replacement that started before this process stopped keeps its sockets.
    (gRPC itself unlinks a unix socket's bind path at shutdown; that path is the private one,
    gone by then.)
    """

    def __init__(
        self,
        kube: Kube,
        *,
        driver: str,
        kubelet_dir: Path,
        cdi_dir: Path,
        reporter: NodeReporter,
        not_ready: Callable[[], list[str]] | None = None,
    ) -> None:
        """`not_ready`: why the node role is not ready, one reason a line (the gRPC health
        service says NOT_SERVING while it gives any); None: the plugin's own reasons only (its
        checkpoint unreadable)."""
        self.plugin_dir = kubelet_dir / "plugins" / driver
        self.driver = driver
        self.instance = secrets.token_hex(_INSTANCE // 2)
        #: the endpoint registered with kubelet: this process's own
        self.dra_socket = self.plugin_dir / f"dra-{self.instance}.sock"
        #: the DRA service of the newest process, for node-local tools (not registered)
        self.local_socket = self.plugin_dir / "dra.sock"
        self.reg_socket = kubelet_dir / "plugins_registry" / f"{driver}-{self.instance}-reg.sock"
        self.preparer = Preparer(
            kube, driver=driver, reporter=reporter, plugin_dir=self.plugin_dir, cdi_dir=cdi_dir
        )
        self.registration = Registration(driver, str(self.dra_socket))
        self.health = ResourceHealth(self.preparer)
        self.grpc_health = PluginHealth(not_ready or self._not_ready)
        self._servers: list[grpc.aio.Server] = []
        #: public socket path -> the identity of the socket this process bound there
        self._sockets: dict[Path, Identity] = {}

    async def start(self) -> None:
        """Serve the DRA service, then the registration service. On failure, what had started is
        stopped again before the error is raised."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        await asyncio.to_thread(self._prepare_dirs)
        dra = grpc.aio.server()
        v1_grpc.add_DRAPluginServicer_to_server(
            _servicer(v1, v1_grpc.DRAPluginServicer, self.preparer), dra
        )
        v1beta1_grpc.add_DRAPluginServicer_to_server(
            _servicer(v1beta1, v1beta1_grpc.DRAPluginServicer, self.preparer), dra
        )
        self.health.closing = False
        drahealth_grpc.add_DRAResourceHealthServicer_to_server(self.health, dra)
        await self.grpc_health.add_to(dra, service_names(v1, v1beta1, drahealth))
        # the DRA service first, then announce it
        await self._serve(dra, self.dra_socket, self.local_socket)
        registration = grpc.aio.server()
        reg_grpc.add_RegistrationServicer_to_server(self.registration, registration)
        await self.grpc_health.add_to(registration, service_names(reg))
        await self._serve(registration, self.reg_socket)
        self.grpc_health.start()

    def _not_ready(self) -> list[str]:
        """The plugin's own reasons not to be ready: its checkpoint cannot be read (every
        prepare fails until an operator moves it away)."""
        error = self.preparer.checkpoint_error
        if error and self.preparer.checkpoint.path.exists():
            return [f"kubelet plugin checkpoint unreadable (every prepare fails): {error}"]
        return []

    def _prepare_dirs(self) -> None:
        for directory in (self.plugin_dir, self.reg_socket.parent):
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError) as exc:
                raise _in_the_way(directory, exc) from exc
        self.preparer.cdi_dir.mkdir(parents=True, exist_ok=True)
        self.preparer.clean_stale()
        self._remove_dead_sockets()

    def _remove_dead_sockets(self) -> None:
        """Unlink this driver's registration and DRA sockets that no process answers (see the
        class docstring); the names of the earlier single-socket layout too."""
        driver = re.escape(self.driver)
        patterns = (
            (self.reg_socket.parent, re.compile(rf"{driver}(-[0-9a-f]{{{_INSTANCE}}})?-reg\.sock")),
            (self.plugin_dir, re.compile(rf"dra-[0-9a-f]{{{_INSTANCE}}}\.sock")),
        )
        for directory, pattern in patterns:
            for path in directory.iterdir():
                if pattern.fullmatch(path.name) and not _answers(path):
                    logger.info("removing %s: no process serves it any more", path)
                    path.unlink(missing_ok=True)

    async def _serve(self, server: grpc.aio.Server, *sockets: Path) -> None:
        """Serve `server` on each of `sockets` (bound privately, then published)."""
        # checked before anything is made: the bind path as `_private_dir` will name it
        for socket in sockets:
            for path in (socket, socket.parent / BIND_DIR / ("x" * _PRIVATE_NAME) / "s"):
                if len(str(path).encode()) > MAX_SOCKET_PATH:
                    raise errors.ConfigError(
                        "--node-kubelet-dir",
                        str(path),
                        f"gives a socket path over {MAX_SOCKET_PATH} bytes; use a shorter "
                        "directory",
                    )
        privates = [
            await asyncio.to_thread(_private_dir, socket.parent / BIND_DIR) for socket in sockets
        ]
        try:
            binds = [private / "s" for private in privates]
            for bind in binds:
                server.add_insecure_port(f"unix://{bind}")
            await server.start()
            self._servers.append(server)
            for bind, socket in zip(binds, sockets, strict=True):
                self._sockets[socket] = await asyncio.to_thread(_publish, bind, socket)
        finally:
            for private in privates:
                await asyncio.to_thread(shutil.rmtree, private, True)

    async def stop(self) -> None:
        await self.grpc_health.stop()  # NOT_SERVING first, while the sockets still answer
        self.health.close()
        for server in reversed(self._servers):
            await server.stop(grace=1.0)
        self._servers.clear()
        sockets, self._sockets = self._sockets, {}
        await asyncio.to_thread(_unlink_own, sockets)


#: the length of a private directory's random name (hex digits)
_PRIVATE_NAME = 8
#: the length of a process's instance name in its socket names (hex digits)
_INSTANCE = 8


def _answers(path: Path) -> bool:
    """Whether a process accepts connections on the unix socket `path`; True for anything but
    a socket nobody listens on (refused) or a path gone, so only a dead socket is removed."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return True
        with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True
    return True


def _private_dir(base: Path) -> Path:
    """A new directory only we can enter (0700), named by `_PRIVATE_NAME` random hex digits, in
    `base` (made 0700 if missing, and kept)."""
    base.mkdir(mode=0o700, exist_ok=True)
    while True:
        private = base / secrets.token_hex(_PRIVATE_NAME // 2)
        try:
            private.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return private


def _publish(bind: Path, public: Path) -> Identity:
    """Make the bound socket 0600 and move it onto its public name; its identity."""
    os.chmod(bind, 0o600)
    st = os.stat(bind)
    try:
        os.replace(bind, public)
    except (IsADirectoryError, NotADirectoryError) as exc:
        raise _in_the_way(public, exc) from exc
    return st.st_dev, st.st_ino


def _in_the_way(path: Path, exc: OSError) -> errors.ConfigError:
    """The error for something not ours (a directory where a socket goes, a file where a
    directory goes) at a path the plugin needs under --node-kubelet-dir."""
    return errors.ConfigError(
        "--node-kubelet-dir",
        str(path),
        f"something else is there ({exc.strerror}); move it away, the kubelet plugin needs "
        "this path for its sockets",
    )


def _unlink_own(sockets: dict[Path, Identity]) -> None:
    """Unlink each public socket path that is still the socket we bound there."""
    for path, identity in sockets.items():
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) != identity:
            logger.info("%s now belongs to another plugin process; left in place", path)
            continue
        path.unlink(missing_ok=True)
