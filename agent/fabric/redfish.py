"""The `redfish` backend: DMTF Redfish composition (DSP0266 protocol, DSP2050 composition).

Discovery (once, whole or not at all, retried as a whole): the service root (no session) gives
`Systems`, `CompositionService`, `Links.Sessions` and `ProtocolFeaturesSupported`; a session is
opened (`X-Auth-Token`; re-login once on 401, logout on close); the CompositionService gives
`ResourceBlocks` and `ResourceZones`. Concurrent first calls wait for one discovery and one login.
What a service lacks is said once at start, with what to configure, and the agent keeps running:
no CompositionService (machines listed, no pooled device), no zones (one implicit fabric named
after the service).

The data model, read from the standard places (`Oem.Cohdi` only where the standard has none):
- a pooled device is a ResourceBlock whose `ResourceBlockType` includes `Processor` (and neither
  `Compute` nor `ComputerSystem`) holding exactly one Processor whose `ProcessorType` is one of
  `processor_types` (GPU, Accelerator); drives, NICs, compute and the systems' own blocks are
  never offered. Its model, vendor, memory and identity are the Processor's `Model`,
  `Manufacturer`, `ProcessorMemory` (or `MemorySummary`), `SerialNumber` / `UUID`; its state the
  block's `CompositionStatus` with `Links.ComputerSystems` and `Status`;
- a machine is a ComputerSystem; its fabric is the zone of its own blocks (the blocks of type
  `Compute`/`ComputerSystem` in its `Links.ResourceBlocks` or naming it in
  `Links.ComputerSystems`), read from the blocks' `Links.Zones` and the zones'
  `Links.ResourceBlocks` (a ComputerSystem has no zone link of its own); a block's fabric is its
  zone (the first one that has a machine, when it is in several);
- the PCI address of an attached device: `Oem.Cohdi.PciAddress` (the standard omits the address
  of a fabric-attached PCIe function);
- a device's health (`PoolDevice.health`): the worst of the block's `Status.Health` and
  `HealthRollup` and its Processor's `Status.Health` ("OK" < "Warning" < "Critical"), why from
  the first `Status.Conditions[].Message`. Health does not change the composition state: a
  Critical GPU attached to a pod's node stays attached (the cluster role taints it and swaps it
  out when the pod ends). A block whose `Status.State` says it cannot be used at all (Absent,
  Disabled, UnavailableOffline, ...) is FAILED. The Processor is read again only when the block
  collection expands it inline (`$expand`); otherwise its first read stands.

Reads: collections with `$expand` only when `ProtocolFeaturesSupported.ExpandQuery` says so; a 501
to it switches this client to per-member reads for good. Every document is read conditionally
(`If-None-Match` with the last ETag): an unchanged fabric costs 304s. Every malformed answer is a
`FabricProtocolError` naming the URI and the field.

Writes: `#ComputerSystem.AddResourceBlock` / `RemoveResourceBlock` where the system has them (with
the block's ETag), else a `PATCH` of `Links.ResourceBlocks` with the Redfish array rules and
`If-Match` (412 → re-read, a bounded number of times); 202 → the task monitor is followed. Every
write is decided from a state read just before it; after an acknowledged write the block is
re-read with growing pauses (`agent.backoff.Backoff`) until the effect shows, and a write whose
effect never shows is never sent again in the same call: after `confirm_reads` re-reads it is a
`FabricProtocolError` (transient: the caller's own backoff decides when to try again).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import orjson

from agent import errors
from agent.backoff import Backoff
from agent.fabric.credentials import Secret
from agent.fabric.link import FabricLink, poll
from agent.fabric.transport import FabricHttp, Reply, check_status
from agent.model.fabric import (
    DeviceId,
    DeviceState,
    FabricId,
    Inventory,
    Machine,
    MachineId,
    PoolDevice,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

ROOT = "/redfish/v1/"
#: The ProcessorTypes pooled unless configured otherwise (`--fabric-processor-types`).
DEFAULT_PROCESSOR_TYPES = ("GPU", "Accelerator")
#: ResourceBlockTypes of blocks that are (part of) a computer system, not composed into one.
SYSTEM_BLOCK_TYPES = frozenset({"Compute", "ComputerSystem"})
#: Re-reads after an acknowledged write before "no effect" is an error.
CONFIRM_READS = 8
_MAX_412_RETRIES = 5
_MiB = 2**20


@dataclass(frozen=True, slots=True)
class Service:
    """What discovery found. Recorded only when complete."""

    systems: str
    sessions: str
    #: The ResourceBlocks collection; None when the service has no CompositionService.
    blocks: str | None
    #: The ResourceZones collection; None when the service has none.
    zones: str | None
    #: The `$expand` value collections are read with; None when the service does not expand.
    expand: str | None
    #: The ResourceBlocks collection's: two levels deep (the blocks' Processors inline) where
    #: the service expands that far, else `expand`.
    expand_blocks: str | None = None


@dataclass(frozen=True, slots=True)
class _Read:
    """A collection's members as read now, and a version that changes with any of them."""

    members: list[tuple[str, dict[str, Any]]]
    version: str


class RedfishFabric:
    backend = "redfish"

    def __init__(
        self,
        http: FabricHttp,
        *,
        user: str,
        password: Secret,
        operation_timeout: float = 300.0,
        poll_interval: float = 2.0,
        processor_types: Iterable[str] = DEFAULT_PROCESSOR_TYPES,
        confirm_reads: int = CONFIRM_READS,
    ) -> None:
        self.http = http
        self.user = user
        self._password = password
        self.operation_timeout = operation_timeout
        self.poll_interval = poll_interval
        self.processor_types = frozenset(t.strip() for t in processor_types if t.strip())
        self.confirm_reads = confirm_reads
        self._service: Service | None = None
        self._discovery_lock = asyncio.Lock()
        self._token: str | None = None
        self._session_uri: str | None = None
        self._login_lock = asyncio.Lock()
        #: False once the service answered 501 to `$expand`.
        self._expand_ok = True
        #: URI -> (ETag, document) of the last conditional reads.
        self._docs: dict[str, tuple[str, dict[str, Any]]] = {}
        #: Processor URI -> document: hardware facts, read once.
        self._processors: dict[str, dict[str, Any]] = {}
        #: From the last inventory: device -> block URI and fabric, machine -> system URI.
        self._block_uri: dict[str, str] = {}
        self._fabric_of: dict[str, FabricId] = {}
        self._system_uri: dict[str, str] = {}
        self._version = ""
        #: Things said once (a block or system left out, and why).
        self._told: set[str] = set()
        #: Whether the fabric manager answered the watch's last read (readiness, logs).
        self.link = FabricLink(http.base_url)

    # --- discovery and session -------------------------------------------------------------------

    async def service(self) -> Service:
        """The service's links, discovered once: root, login, CompositionService, as one unit
        retried as a whole; callers arriving meanwhile wait for the same discovery."""
        if self._service is not None:
            return self._service
        async with self._discovery_lock:
            if self._service is None:
                self._service = await self.http.retrying("Redfish discovery", self._discover)
        return self._service

    async def _discover(self) -> Service:
        root_reply = await self.http.call("GET", ROOT, headers={"OData-Version": "4.0"})
        if root_reply.status in (404, 405):
            raise errors.ConfigError(
                "--fabric-url",
                self.http.base_url,
                f"no Redfish service root at {self.http.base_url}{ROOT} (GET answered "
                f"{root_reply.status}); give the scheme, host and port of the fabric manager",
            )
        check_status(root_reply, f"GET {ROOT}", _message(root_reply))
        root = _object(root_reply.json(f"GET {ROOT}"), ROOT, "")
        systems = _ref(root.get("Systems"), ROOT, "Systems")
        sessions_link = _object(root.get("Links"), ROOT, "Links").get("Sessions")
        sessions = (
            _ref(sessions_link, ROOT, "Links.Sessions")
            if sessions_link is not None
            else "/redfish/v1/SessionService/Sessions"
        )
        await self._login(sessions, None)
        blocks = zones = None
        if root.get("CompositionService") is None:
            logger.warning(
                "the Redfish service at %s has no CompositionService: it composes nothing, so "
                "no device is offered (its systems are listed). Enable DSP2050 composition "
                "(CompositionService with ResourceBlocks) on the fabric manager, or use "
                "--fabric-backend fti for an FTI fabric manager",
                self.http.base_url,
            )
        else:
            comp_uri = _ref(root["CompositionService"], ROOT, "CompositionService")
            comp = await self._get_once(comp_uri)
            if comp.get("ServiceEnabled") is False:
                raise errors.FabricRejected(
                    f"{comp_uri}: ServiceEnabled is false: composition is switched off on the "
                    f"fabric manager at {self.http.base_url}"
                )
            blocks = _ref(comp.get("ResourceBlocks"), comp_uri, "ResourceBlocks")
            if comp.get("ResourceZones") is not None:
                zones = _ref(comp["ResourceZones"], comp_uri, "ResourceZones")
        expand = _expand_value(root.get("ProtocolFeaturesSupported"))
        deep = _expand_value(root.get("ProtocolFeaturesSupported"), levels=2)
        if expand is None:
            logger.info(
                "the Redfish service at %s does not support $expand: each member is read on "
                "its own (conditionally)",
                self.http.base_url,
            )
        return Service(systems, sessions, blocks, zones, expand, deep or expand)

    async def _login(self, sessions: str, stale: str | None) -> None:
        async with self._login_lock:
            if self._token is not None and self._token != stale:
                return  # someone else logged in while we waited
            reply = await self.http.call(
                "POST",
                sessions,
                json={"UserName": self.user, "Password": self._password.reveal()},
                headers={"OData-Version": "4.0"},
            )
            if reply.status in (400, 401, 403):
                raise errors.FabricAuthError(
                    f"Redfish login as {self.user!r} at {self.http.base_url} was refused "
                    f"({reply.status}); check --fabric-user and the password"
                )
            if reply.status in (404, 405):
                raise errors.ConfigError(
                    "--fabric-url",
                    self.http.base_url,
                    f"POST {self.http.base_url}{sessions} (the service root's Links.Sessions) "
                    f"answered {reply.status}: no Redfish SessionService there to log in to",
                )
            check_status(reply, f"POST {sessions}", _message(reply))
            token = reply.headers.get("X-Auth-Token")
            if not token:
                raise errors.FabricProtocolError(
                    f"POST {sessions}: the login answered {reply.status} without X-Auth-Token"
                )
            self._token = token
            self._session_uri = reply.headers.get("Location")
            logger.info("redfish session opened", extra={"fabric": self.http.base_url})

    async def _request(
        self, method: str, path: str, *, json: Any = None, headers: dict[str, str] | None = None
    ) -> Reply:
        """An authenticated call (after discovery); a 401 (expired session) logs in again once."""
        sessions = (await self.service()).sessions
        for attempt in (1, 2):
            token = self._token
            if token is None:
                await self._login(sessions, None)
                token = self._token
            hdrs = {"X-Auth-Token": token or "", "OData-Version": "4.0", **(headers or {})}
            reply = await self.http.call(method, path, json=json, headers=hdrs)
            if reply.status == 401 and attempt == 1:
                logger.info("redfish session expired; logging in again")
                await self._login(sessions, token)
                continue
            return reply
        return reply

    async def _get_once(self, path: str) -> dict[str, Any]:
        """GET during discovery (the session is open, the Service not yet recorded)."""
        hdrs = {"X-Auth-Token": self._token or "", "OData-Version": "4.0"}
        reply = await self.http.call("GET", path, headers=hdrs)
        check_status(reply, f"GET {path}", _message(reply))
        return _object(reply.json(f"GET {path}"), path, "")

    async def _get_json(self, path: str) -> dict[str, Any]:
        async def op() -> dict[str, Any]:
            reply = await self._request("GET", path)
            check_status(reply, f"GET {path}", _message(reply))
            return _object(reply.json(f"GET {path}"), path, "")

        result: dict[str, Any] = await self.http.retrying(f"GET {path}", op)
        return result

    async def _get(self, path: str) -> tuple[dict[str, Any], str]:
        read = await self._get_cached(path)
        assert read is not None
        return read

    async def _get_cached(
        self, path: str, *, unsupported_ok: bool = False
    ) -> tuple[dict[str, Any], str] | None:
        """GET with `If-None-Match` of the last read (304 → the document kept); returns the
        document and its version (ETag, else a digest of the body). With `unsupported_ok`, a
        501 (a query parameter the service does not support, DSP0266) returns None."""
        cached = self._docs.get(path)

        async def op() -> Reply:
            hdrs = {"If-None-Match": cached[0]} if cached else {}
            reply = await self._request("GET", path, headers=hdrs)
            if reply.status != 304 and not (unsupported_ok and reply.status == 501):
                check_status(reply, f"GET {path}", _message(reply))
            return reply

        reply: Reply = await self.http.retrying(f"GET {path}", op)
        if reply.status == 501:
            return None
        if reply.status == 304 and cached:
            return cached[1], cached[0]
        doc = _object(reply.json(f"GET {path}"), path, "")
        etag = reply.headers.get("ETag") or ""
        if etag:
            self._docs[path] = (etag, doc)
        return doc, etag or hashlib.sha1(reply.body).hexdigest()  # noqa: S324 -- a version

    async def close(self) -> None:
        if self._session_uri and self._token:
            try:
                await self.http.call(
                    "DELETE", self._session_uri, headers={"X-Auth-Token": self._token}
                )
            except errors.AgentError as exc:
                logger.warning("redfish logout failed: %s", exc)
        self._token = self._session_uri = None
        await self.http.close()

    # --- reads -----------------------------------------------------------------------------------

    async def inventory(self) -> Inventory:
        inv = await self._read_inventory(False)
        assert inv is not None
        return inv

    def watch(self) -> AsyncIterator[Inventory]:
        """The inventory now, then on every change: conditional reads every poll interval (304
        while unchanged). Never raises for an unreachable or refusing fabric manager, the first
        read included: `self.link` says."""
        return poll(self._read_inventory, self.link, self.poll_interval)

    async def _collection(self, svc: Service, uri: str, expand: str | None) -> _Read:
        """The members of a collection: one read with `$expand=<expand>` where the service
        expands, else the collection and each member, every read conditional."""
        if expand is not None and self._expand_ok:
            path = f"{uri}?$expand={expand}"
            expanded = await self._get_cached(path, unsupported_ok=True)
            if expanded is None:
                if self._expand_ok:  # said once, though concurrent reads may all get a 501
                    logger.warning(
                        "the Redfish service at %s answered 501 to $expand although its service "
                        "root advertises it; reading each member from now on",
                        self.http.base_url,
                    )
                self._expand_ok = False
            else:
                doc, version = expanded
                members = []
                for i, m in enumerate(_list(doc, path, "Members")):
                    field = f"Members[{i}]"
                    member_uri = _ref(m, path, field)
                    if set(_object(m, path, field)) <= {"@odata.id"}:  # not expanded after all
                        member, mv = await self._get(member_uri)
                        version += mv
                    else:
                        member = m
                    members.append((member_uri, member))
                return _Read(members, version)
        doc, version = await self._get(uri)
        uris = [_ref(m, uri, f"Members[{i}]") for i, m in enumerate(_list(doc, uri, "Members"))]
        reads = await _all([self._get(u) for u in uris])
        return _Read(
            [(u, d) for u, (d, _) in zip(uris, reads, strict=True)],
            version + "".join(v for _, v in reads),
        )

    async def _read_inventory(self, conditional: bool) -> Inventory | None:
        svc = await self.service()
        empty = _Read([], "")
        # One after the other: each is one request (or 304) where the service expands, and a
        # failure stops the read at once.
        blocks = await self._collection(svc, svc.blocks, svc.expand_blocks) if svc.blocks else empty
        systems = await self._collection(svc, svc.systems, svc.expand)
        zones = await self._collection(svc, svc.zones, svc.expand) if svc.zones else empty
        version = hashlib.sha1(  # noqa: S324 -- a version, not a secret
            f"{systems.version}|{blocks.version}|{zones.version}".encode()
        ).hexdigest()
        if conditional and version == self._version:
            return None
        inv = await self._build(systems, blocks, zones, version)
        self._version = version
        return inv

    async def _build(self, systems: _Read, blocks: _Read, zones: _Read, version: str) -> Inventory:
        """The inventory from one read of the three collections (see the module docstring for
        where each fact comes from); records where each device and machine lives."""
        zones_of = _zone_index(blocks, zones)
        block_docs = dict(blocks.members)
        index = _block_index(block_docs)
        implicit = FabricId("") if any(zones_of.values()) else self._implicit_fabric()
        machines: list[Machine] = []
        system_uri: dict[str, str] = {}
        for uri, doc in systems.members:
            own = _own_blocks(uri, doc, block_docs, index)
            machine_zones = [z for b in own for z in zones_of.get(b, [])]
            fallback = str(_oem(doc, uri).get("Fabric") or "") or implicit
            fabric = FabricId(machine_zones[0] if machine_zones else fallback)
            if not fabric:
                self._tell(
                    uri,
                    "%s is in no resource zone (none of its own blocks is): nothing can be "
                    "composed to it; it is not offered as a machine",
                    uri,
                )
                continue
            machine_id = _segment(uri)
            system_uri[machine_id] = uri
            host = _string(doc, uri, "HostName")
            machines.append(
                Machine(
                    id=MachineId(machine_id),
                    name=host or _string(doc, uri, "Name") or machine_id,
                    fabric=fabric,
                    node_name=host,
                )
            )
        with_machine = {m.fabric for m in machines}
        devices: list[PoolDevice] = []
        block_uri: dict[str, str] = {}
        fabric_of: dict[str, FabricId] = {}
        for uri, doc in blocks.members:
            processor = await self._pooled_processor(uri, doc)
            if processor is None:
                continue
            candidates = zones_of.get(uri, [])
            fabric = FabricId(
                next((z for z in candidates if z in with_machine), None)
                or (candidates[0] if candidates else implicit)
            )
            if not fabric:
                self._tell(uri, "%s is in no resource zone: it is not offered", uri)
                continue
            dev = _device(uri, doc, *processor, fabric)
            devices.append(dev)
            block_uri[dev.id], fabric_of[dev.id] = uri, fabric
        self._block_uri, self._fabric_of, self._system_uri = block_uri, fabric_of, system_uri
        return Inventory(tuple(machines), tuple(devices), version=version)

    def _implicit_fabric(self) -> FabricId:
        """The one fabric of a service without zones: named after the service (its host)."""
        name = urlsplit(self.http.base_url).netloc or self.http.base_url
        if "implicit-fabric" not in self._told:
            self._told.add("implicit-fabric")
            logger.warning(
                "the Redfish service at %s has no resource zones: all its systems and blocks "
                "are taken as one fabric named %r; configure ResourceZones on the fabric manager "
                "to keep blocks to the systems they can reach",
                self.http.base_url,
                name,
            )
        return FabricId(name)

    def _tell(self, key: str, message: str, *args: object) -> None:
        if key not in self._told:
            self._told.add(key)
            logger.warning(message, *args)

    async def _pooled_processor(
        self, uri: str, block: dict[str, Any]
    ) -> tuple[str, dict[str, Any]] | None:
        """The block's one Processor of a pooled type (URI, document), or None when the block is
        not a pooled device (another kind of block, no such processor, or several)."""
        types = {str(t) for t in _list(block, uri, "ResourceBlockType", default=[])}
        if "Processor" not in types or types & SYSTEM_BLOCK_TYPES:
            return None
        refs = block.get("Processors")
        where, field = uri, "Processors"
        if isinstance(refs, dict):  # a link to a ProcessorCollection rather than an array
            where = _ref(refs, uri, "Processors")
            refs, field = (await self._processor(where)).get("Members"), "Members"
        if refs is not None and not isinstance(refs, list):
            raise _malformed(where, field, f"expected an array of links, got {refs!r}"[:200])
        uris = [_ref(r, where, f"{field}[{i}]") for i, r in enumerate(refs or [])]
        for u, r in zip(uris, refs or [], strict=True):
            if set(r) - {"@odata.id", "@odata.etag"}:  # expanded inline: the current one
                self._processors[u] = r
        procs = [await self._processor(u) for u in uris]
        pooled = [
            (u, p)
            for u, p in zip(uris, procs, strict=True)
            if str(p.get("ProcessorType")) in self.processor_types
        ]
        if len(pooled) > 1:
            self._tell(
                uri,
                "%s holds %d processors of pooled types: one device a block is supported, it "
                "is not offered",
                uri,
                len(pooled),
            )
            return None
        if pooled:
            return pooled[0]
        if not uris and _oem(block, uri).get("Model"):
            return uri, {}  # a block described only by OEM fields (the emulator's, formerly)
        return None

    async def _processor(self, uri: str) -> dict[str, Any]:
        if uri not in self._processors:
            self._processors[uri] = await self._get_json(uri)
        return self._processors[uri]

    async def _block(self, device: DeviceId) -> tuple[PoolDevice, dict[str, Any], str]:
        """The device as its block says now (fresh read): (device, block, block URI)."""
        svc = await self.service()
        if svc.blocks is None:
            raise errors.DeviceNotFound(
                f"device {device}: the Redfish service at {self.http.base_url} has no "
                "CompositionService"
            )
        uri = self._block_uri.get(device) or f"{svc.blocks}/{device}"
        doc = await self._get_json(uri)
        processor = await self._pooled_processor(uri, doc)
        if processor is None:
            raise errors.DeviceNotFound(
                f"{uri} is not a pooled device (ResourceBlockType {doc.get('ResourceBlockType')}, "
                f"pooled processor types {sorted(self.processor_types)})"
            )
        dev = _device(uri, doc, *processor, self._fabric_of.get(device, FabricId("")))
        return dev, doc, uri

    # --- writes ----------------------------------------------------------------------------------

    async def attach(self, device: DeviceId, machine: MachineId, *, model: str = "") -> PoolDevice:
        async with self.http.device(device):
            return await self._converge(device, machine, attach=True)

    async def detach(self, device: DeviceId) -> PoolDevice:
        async with self.http.device(device):
            return await self._converge(device, None, attach=False)

    async def _converge(
        self, device: DeviceId, machine: MachineId | None, *, attach: bool
    ) -> PoolDevice:
        """Read → decide → (write) → follow, until the device is where we want it. A write is
        only sent from a state read just before it, and once acknowledged never again in this
        call: the block is re-read, with growing pauses, until the effect shows."""
        what = "attach" if attach else "detach"
        deadline = time.monotonic() + self.operation_timeout
        pauses: Backoff[str] = Backoff(base=0.02, cap=0.5)
        conflicts = 0
        unconfirmed: int | None = None  # re-reads since an acknowledged write, None: no write
        while True:
            if time.monotonic() > deadline:
                raise errors.FabricTimeout(
                    f"{what} of {device} did not finish within {self.operation_timeout:.0f} s"
                )
            dev, block, uri = await self._block(device)
            if attach:
                if dev.state == DeviceState.ATTACHED and dev.machine == machine:
                    return dev
                if dev.machine not in (None, machine):
                    raise errors.DeviceBusy(
                        f"device {device} is {dev.state} to machine {dev.machine}, not {machine}"
                    )
                if dev.state == DeviceState.FAILED:
                    raise errors.DeviceFailed(
                        f"device {device} has failed: {dev.reason or 'see the fabric manager'}"
                    )
            elif dev.state == DeviceState.FREE or dev.machine is None:
                return dev
            if dev.state in (DeviceState.ATTACHING, DeviceState.DETACHING):
                # a transition in flight (ours, or one from before a crash): watch it land
                unconfirmed = None  # the write took effect: what follows is a new decision
                await asyncio.sleep(pauses.delay("transition"))
                continue
            if unconfirmed is not None:
                # our write was acknowledged, yet the block shows nothing of it
                unconfirmed += 1
                if unconfirmed > self.confirm_reads:
                    raise errors.FabricProtocolError(
                        f"{what} of {device}: the fabric manager acknowledged the write but it "
                        f"had no effect: {uri} still shows {dev.state} after "
                        f"{self.confirm_reads} re-reads; not sent again"
                    )
                await asyncio.sleep(pauses.delay("confirm"))
                continue
            target = machine if attach else dev.machine
            assert target is not None
            try:
                reply = await self._compose(block, uri, target, add=attach)
            except errors.TransientError as exc:
                if isinstance(exc, errors.FabricProtocolError):
                    raise
                logger.warning("%s of %s: %s; re-reading its state", what, device, exc)
                await asyncio.sleep(pauses.delay("failure"))
                continue
            if reply.status == 412:
                conflicts += 1
                if conflicts > _MAX_412_RETRIES:
                    raise errors.FabricUnavailable(
                        f"{device}: ETag conflicts {conflicts} times in a row"
                    )
                continue
            if reply.status >= 500:
                logger.warning("compose of %s answered %d; re-reading", device, reply.status)
                await asyncio.sleep(pauses.delay("failure"))
                continue
            check_status(reply, f"{what} {device}", _message(reply))
            if reply.status == 202:
                await self._follow(reply, device, deadline)
            unconfirmed = 0

    async def _compose(
        self, block: dict[str, Any], block_uri: str, machine: MachineId, *, add: bool
    ) -> Reply:
        svc = await self.service()
        system_uri = self._system_uri.get(machine) or f"{svc.systems}/{machine}"
        system = await self._request("GET", system_uri)
        check_status(system, f"GET {system_uri}", _message(system))
        sys_doc = _object(system.json(f"GET {system_uri}"), system_uri, "")
        sys_etag = system.headers.get("ETag") or str(sys_doc.get("@odata.etag") or "")
        name = "#ComputerSystem.AddResourceBlock" if add else "#ComputerSystem.RemoveResourceBlock"
        action = _object(
            _object(sys_doc.get("Actions"), system_uri, "Actions").get(name),
            system_uri,
            f"Actions.{name}",
        )
        block_ref = str(block.get("@odata.id") or block_uri)
        if action.get("target"):
            target = _string(action, system_uri, f"Actions.{name}.target")
            # The action is atomic on the service, so only the block's ETag is sent: it fails the
            # add if the block changed since we read it free. The system's ETag would make every
            # concurrent add to one server fail all but one (412) for no benefit.
            body: dict[str, Any] = {"ResourceBlock": {"@odata.id": block_ref}}
            if block.get("@odata.etag"):
                body["ResourceBlockETag"] = block["@odata.etag"]
            return await self._request("POST", target, json=body)
        field = "Links.ResourceBlocks"
        links = [
            _ref(r, system_uri, f"{field}[{i}]")
            for i, r in enumerate(
                _list(
                    _object(sys_doc.get("Links"), system_uri, "Links"),
                    system_uri,
                    "ResourceBlocks",
                    default=[],
                    field=field,
                )
            )
        ]
        wanted = _norm(block_ref)
        if add:
            patch: list[Any] = [{} for _ in links] + [{"@odata.id": block_ref}]
        else:
            patch = [None if _norm(u) == wanted else {} for u in links]
        headers = {"If-Match": sys_etag} if sys_etag else {}
        return await self._request(
            "PATCH", system_uri, json={"Links": {"ResourceBlocks": patch}}, headers=headers
        )

    async def _follow(self, accepted: Reply, device: DeviceId, deadline: float) -> None:
        """Poll a task monitor (202 + Location) until it stops answering 202. Whatever it ends
        with — done, an error, a lost monitor, a failed poll — the caller re-reads the block,
        whose state is the truth (a failed composition shows as CompositionState Failed)."""
        monitor = accepted.headers.get("Location")
        if not monitor:
            return
        pause = 0.005  # grows to the service's Retry-After: quick tasks are seen quickly
        while time.monotonic() < deadline:
            await asyncio.sleep(min(pause, _retry_after(accepted)))
            pause *= 2
            try:
                reply = await self._request("GET", monitor)
            except errors.TransientError as exc:
                logger.debug("task monitor of %s: %s; re-reading the block", device, exc)
                return
            if reply.status != 202:
                if reply.status >= 400:
                    logger.info(
                        "task for %s ended with %d: %s", device, reply.status, _message(reply)
                    )
                return
            accepted = reply


# --- the data model ------------------------------------------------------------------------------

_STATE = {
    "Unused": DeviceState.FREE,
    "Composing": DeviceState.ATTACHING,
    "Composed": DeviceState.ATTACHED,
    "ComposedAndAvailable": DeviceState.ATTACHED,
    "Failed": DeviceState.FAILED,
}
#: `Status.State` values of a block that cannot be used whatever its composition says.
_UNUSABLE = frozenset({"Absent", "Disabled", "UnavailableOffline", "Deferring", "Quiesced"})


def _device(
    uri: str, block: dict[str, Any], proc_uri: str, proc: dict[str, Any], fabric: FabricId
) -> PoolDevice:
    """A pooled block as a PoolDevice: the Processor's facts, the block's composition."""
    oem = _oem(block, uri)
    status = _object(block.get("CompositionStatus"), uri, "CompositionStatus")
    raw = status.get("CompositionState")
    if not isinstance(raw, str):
        raise errors.FabricProtocolError(
            f"{uri}: CompositionStatus.CompositionState: missing or not a string ({raw!r})"
        )
    links = _object(block.get("Links"), uri, "Links")
    systems = [
        _segment(_ref(s, uri, f"Links.ComputerSystems[{i}]"))
        for i, s in enumerate(
            _list(links, uri, "ComputerSystems", default=[], field="Links.ComputerSystems")
        )
    ]
    health = _object(block.get("Status"), uri, "Status")
    reason = _condition(health) or str(oem.get("Reason") or "")
    state = _STATE.get(raw)
    machine = systems[0] if systems else None
    if len(systems) > 1:
        state, reason = (
            DeviceState.FAILED,
            (
                f"composed to {len(systems)} systems at once (shared): a device is offered to one "
                "machine at a time"
            ),
        )
    elif raw == "Unavailable":
        state = DeviceState.DETACHING if machine else DeviceState.FAILED
        reason = reason or "the service says it is unavailable for composition"
    elif state is None:
        raise errors.FabricProtocolError(
            f"{uri}: CompositionStatus.CompositionState: {raw!r} is not a DMTF CompositionState"
        )
    elif state == DeviceState.FREE:
        machine = None
    elif state == DeviceState.ATTACHED and machine is None:
        state, reason = DeviceState.FAILED, f"{raw} to no system (Links.ComputerSystems is empty)"
    if state != DeviceState.FAILED and health.get("State") in _UNUSABLE:
        state = DeviceState.FAILED
        reason = reason or f"Status {health.get('State')}/{health.get('Health')}"
    raw_status = proc.get("Status")
    proc_status: dict[str, Any] = raw_status if isinstance(raw_status, dict) else {}
    worst, why = _health(health, proc_status)
    return PoolDevice(
        id=DeviceId(_segment(uri)),
        fabric=fabric,
        model=_string(proc, proc_uri, "Model")
        or str(oem.get("Model") or "")
        or _string(proc, proc_uri, "Name")
        or _string(block, uri, "Name"),
        state=state,
        vendor=_string(proc, proc_uri, "Manufacturer") or str(oem.get("Manufacturer") or ""),
        memory=_memory(proc) or int(oem.get("MemoryBytes") or 0),
        gpu_uuid=_string(proc, proc_uri, "SerialNumber")
        or _string(proc, proc_uri, "UUID")
        or str(oem.get("SerialNumber") or ""),
        machine=MachineId(machine) if machine else None,
        pci_address=str(oem.get("PciAddress") or "") if machine else "",
        reason=reason if state == DeviceState.FAILED else "",
        health=worst,
        health_reason=why,
    )


_HEALTH_ORDER: Final = ("OK", "Warning", "Critical")


def _health(block: dict[str, Any], proc: dict[str, Any]) -> tuple[str, str]:
    """(worst health, why) of a block's `Status` and its Processor's: `Health`, `HealthRollup`
    (DMTF Resource.Health: OK, Warning, Critical; anything else or absent counts as OK)."""
    worst, why = "OK", ""
    for status, fields in ((block, ("Health", "HealthRollup")), (proc, ("Health",))):
        for field in fields:
            value = status.get(field)
            if value in _HEALTH_ORDER and _HEALTH_ORDER.index(value) > _HEALTH_ORDER.index(worst):
                worst = str(value)
                why = _condition(status) or f"Status.{field} {value}"
    return worst, why


def _zone_index(blocks: _Read, zones: _Read) -> dict[str, list[str]]:
    """block URI -> the ids of its zones: its `Links.Zones` and every zone listing it."""
    out: dict[str, list[str]] = {}
    for uri, doc in blocks.members:
        links = doc.get("Links")
        refs = links.get("Zones") if isinstance(links, dict) else None
        if isinstance(refs, list):
            out[_norm(uri)] = [
                _segment(_ref(z, uri, f"Links.Zones[{i}]")) for i, z in enumerate(refs)
            ]
    for zone_uri, zone in zones.members:
        links = _object(zone.get("Links"), zone_uri, "Links")
        for i, b in enumerate(
            _list(links, zone_uri, "ResourceBlocks", default=[], field="Links.ResourceBlocks")
        ):
            block = _norm(_ref(b, zone_uri, f"Links.ResourceBlocks[{i}]"))
            if _segment(zone_uri) not in out.setdefault(block, []):
                out[block].append(_segment(zone_uri))
    return {uri: out.get(_norm(uri), []) for uri, _ in blocks.members}


def _block_index(
    blocks: dict[str, dict[str, Any]],
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(normalised block URI -> the URI as listed, normalised system URI -> the normalised URIs
    of the blocks naming it in their `Links.ComputerSystems`, in block order): made once per
    inventory, so that finding every system's own blocks is linear in systems + blocks, not
    their product (a fabric of 5,000 systems and 45,000 blocks would take minutes)."""
    by_norm = {_norm(u): u for u in blocks}
    naming: dict[str, list[str]] = {}
    for block_uri, doc in blocks.items():
        bl = doc.get("Links")
        names = bl.get("ComputerSystems") if isinstance(bl, dict) else None
        if not isinstance(names, list):
            continue
        systems = {_norm(str(s.get("@odata.id", ""))) for s in names if isinstance(s, dict)}
        for system in systems:
            naming.setdefault(system, []).append(_norm(block_uri))
    return by_norm, naming


def _own_blocks(
    uri: str,
    system: dict[str, Any],
    blocks: dict[str, dict[str, Any]],
    index: tuple[dict[str, str], dict[str, list[str]]],
) -> list[str]:
    """A system's own blocks (type Compute or ComputerSystem): those in its
    `Links.ResourceBlocks`, and those naming it in their `Links.ComputerSystems` (`index`:
    `_block_index(blocks)`)."""
    by_norm, naming = index
    links = system.get("Links")
    listed = links.get("ResourceBlocks") if isinstance(links, dict) else None
    found = [
        _norm(r["@odata.id"])
        for r in (listed if isinstance(listed, list) else [])
        if isinstance(r, dict) and isinstance(r.get("@odata.id"), str)
    ]
    found += naming.get(_norm(uri), [])
    out = []
    for b in dict.fromkeys(found):
        block = blocks.get(by_norm.get(b, ""))
        types = block.get("ResourceBlockType") if block else None
        if isinstance(types, list) and SYSTEM_BLOCK_TYPES & {str(t) for t in types}:
            out.append(by_norm[b])
    return out


def _expand_value(features: Any, *, levels: int = 1) -> str | None:
    """The `$expand` a service supports for reading a collection's members `levels` deep, from
    its `ProtocolFeaturesSupported.ExpandQuery`: `.` (no links), with `($levels=n)` when levels
    are supported; `*` when only everything can be expanded; None when it does not expand (or
    not that deep: more than one level needs `Levels` and `MaxLevels` >= `levels`)."""
    expand = features.get("ExpandQuery") if isinstance(features, dict) else None
    if not isinstance(expand, dict):
        return None
    with_levels = expand.get("Levels") is True
    max_levels = expand.get("MaxLevels")
    if levels > 1 and not (with_levels and isinstance(max_levels, int) and max_levels >= levels):
        return None
    suffix = f"($levels={levels})" if with_levels else ""
    if expand.get("NoLinks") is True:
        return "." + suffix
    if expand.get("ExpandAll") is True:
        return "*" + suffix
    return None


def _memory(proc: dict[str, Any]) -> int:
    """Device memory in bytes: the Processor's `ProcessorMemory` that is not cache or integrated
    (MiB), else `MemorySummary.TotalMemorySizeMiB`; 0 when it says nothing."""
    mib = 0
    entries = proc.get("ProcessorMemory")
    for m in entries if isinstance(entries, list) else []:
        if isinstance(m, dict) and not m.get("IntegratedMemory") and m.get("MemoryType") != "Cache":
            cap = m.get("CapacityMiB")
            mib += cap if isinstance(cap, int) and not isinstance(cap, bool) else 0
    if not mib:
        summary = proc.get("MemorySummary")
        total = summary.get("TotalMemorySizeMiB") if isinstance(summary, dict) else None
        mib = total if isinstance(total, int) and not isinstance(total, bool) else 0
    return mib * _MiB


def _condition(status: dict[str, Any]) -> str:
    """The first `Status.Conditions[].Message`, if any."""
    conditions = status.get("Conditions")
    for c in conditions if isinstance(conditions, list) else []:
        if isinstance(c, dict) and isinstance(c.get("Message"), str):
            return str(c["Message"])
    return ""


# --- typed access to documents -------------------------------------------------------------------


def _malformed(uri: str, field: str, what: str) -> errors.FabricProtocolError:
    return errors.FabricProtocolError(f"{uri}: {field or 'the document'}: {what}")


def _object(value: Any, uri: str, field: str) -> dict[str, Any]:
    """`value` as an object; missing (None) is an empty one."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _malformed(uri, field, f"expected an object, got {type(value).__name__}")
    return value


def _list(
    doc: dict[str, Any], uri: str, key: str, *, default: list[Any] | None = None, field: str = ""
) -> list[Any]:
    value = doc.get(key)
    if value is None and default is not None:
        return default
    if not isinstance(value, list):
        raise _malformed(uri, field or key, f"expected an array, got {value!r}"[:200])
    return value


def _ref(value: Any, uri: str, field: str) -> str:
    """A reference (`{"@odata.id": "<uri>"}`) as its URI."""
    target = value.get("@odata.id") if isinstance(value, dict) else None
    if not isinstance(target, str) or not target:
        raise _malformed(uri, f"{field}.@odata.id", f"missing or not a URI in {value!r}"[:200])
    return target


def _string(doc: dict[str, Any], uri: str, field: str) -> str:
    """A string property ("" when absent or null); `field` is its path in the document (the
    key is its last part)."""
    value = doc.get(field.rsplit(".", 1)[-1])
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _malformed(uri, field, f"expected a string, got {value!r}"[:200])
    return value


def _oem(doc: dict[str, Any], uri: str) -> dict[str, Any]:
    """`Oem.Cohdi` (the emulator's extension), or {}."""
    return _object(_object(doc.get("Oem"), uri, "Oem").get("Cohdi"), uri, "Oem.Cohdi")


def _norm(uri: str) -> str:
    return uri.split("?", 1)[0].rstrip("/")


def _segment(uri: str) -> str:
    """The id of a resource: the last segment of its URI (what a client addresses; DMTF's own
    mockups have documents whose `Id` differs from it)."""
    return _norm(uri).rsplit("/", 1)[-1]


async def _all(reads: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Await every read at once; on the first failure the others are cancelled (not left
    running) and the failure raised."""
    tasks = [asyncio.ensure_future(r) for r in reads]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _retry_after(reply: Reply) -> float:
    """The monitor's Retry-After (seconds), within [0.005, 2]."""
    try:
        return min(max(float(reply.headers.get("Retry-After", "0.5")), 0.005), 2.0)
    except ValueError:
        return 0.5


def _message(reply: Reply) -> str:
    """The human message of a Redfish error body, if there is one."""
    try:
        doc = orjson.loads(reply.body)
        err = doc.get("error", {})
        info = err.get("@Message.ExtendedInfo") or [{}]
        return str(info[0].get("Message") or err.get("message") or doc)[:300]
    except (ValueError, AttributeError, TypeError, IndexError):
        return reply.body[:200].decode(errors="replace")
