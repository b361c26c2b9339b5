"""The `redfish` backend: DMTF Redfish composition (DSP0266, DSP2050 "expandable systems").

- Discovery from the service root: Systems, CompositionService → ResourceBlocks / ResourceZones,
  SessionService sessions (`Links.Sessions`).
- Login with a session (`X-Auth-Token`), re-login once on 401, logout on close.
- A pooled GPU is a ResourceBlock; its machine is `Links.ComputerSystems[0]`, its fabric the
  zone in `Links.Zones[0]`; `CompositionStatus.CompositionState` gives the state.
- Attach/detach: `#ComputerSystem.AddResourceBlock` / `RemoveResourceBlock` when the system
  advertises them (with both ETags), else `PATCH Links.ResourceBlocks` with the Redfish array
  rules and `If-Match`; 412 → re-read and retry; 202 → follow the task monitor.
- Changes: conditional GET of the expanded ResourceBlocks collection with `If-None-Match`
  every poll interval (304 while nothing changed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from agent import errors
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

ROOT = "/redfish/v1/"
_STATE = {
    "Unused": DeviceState.FREE,
    "Composing": DeviceState.ATTACHING,
    "Composed": DeviceState.ATTACHED,
    "ComposedAndAvailable": DeviceState.ATTACHED,
    "Failed": DeviceState.FAILED,
}
_MAX_412_RETRIES = 5


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
    ) -> None:
        self.http = http
        self.user = user
        self._password = password
        self.operation_timeout = operation_timeout
        self.poll_interval = poll_interval
        self._token: str | None = None
        self._session_uri: str | None = None
        self._login_lock = asyncio.Lock()
        self._root_links: dict[str, str] = {}
        self._links: dict[str, str] = {}
        self._blocks_etag = ""
        self._last: Inventory | None = None
        #: Whether the fabric manager answered the watch's last read (readiness, logs).
        self.link = FabricLink(http.base_url)

    # --- session ---------------------------------------------------------------------------------

    async def _discover_root(self) -> dict[str, str]:
        """The service root's links (no session needed); read once."""
        if self._root_links:
            return self._root_links

        async def read_root() -> Any:
            reply = await self.http.call("GET", ROOT)
            check_status(reply, "GET /redfish/v1/", _message(reply))
            return reply.json("GET /redfish/v1/")

        root = await self.http.retrying("GET service root", read_root)
        try:
            self._root_links = {
                "systems": root["Systems"]["@odata.id"],
                "composition": root["CompositionService"]["@odata.id"],
                "sessions": (root.get("Links", {}).get("Sessions") or {}).get("@odata.id")
                or "/redfish/v1/SessionService/Sessions",
            }
        except (KeyError, TypeError) as exc:
            raise errors.FabricRejected(
                f"the Redfish service at {self.http.base_url} has no {exc} in its service root: "
                "it does not offer composition (CompositionService) or systems"
            ) from None
        return self._root_links

    async def _discover(self) -> None:
        """Root links, then the composition service's ResourceBlocks link (with a session).
        Recorded only once complete, so a read that failed half-way is simply read again."""
        if self._links:
            return
        links = await self._discover_root()
        comp = await self._get_json(links["composition"])
        if comp.get("ServiceEnabled") is False:
            raise errors.FabricRejected(f"{links['composition']}: ServiceEnabled is false")
        try:
            blocks = comp["ResourceBlocks"]["@odata.id"]
        except (KeyError, TypeError):
            raise errors.FabricRejected(
                f"{links['composition']} has no ResourceBlocks collection"
            ) from None
        self._links = {**links, "blocks": blocks}

    async def _login(self, stale: str | None) -> None:
        async with self._login_lock:
            if self._token is not None and self._token != stale:
                return  # someone else logged in while we waited
            links = await self._discover_root()
            reply = await self.http.call(
                "POST",
                links["sessions"],
                json={"UserName": self.user, "Password": self._password.reveal()},
            )
            if reply.status in (400, 401, 403):
                raise errors.FabricAuthError(
                    f"Redfish login as {self.user!r} at {self.http.base_url} was refused "
                    f"({reply.status}); check --fabric-user and the password"
                )
            check_status(reply, "POST SessionService/Sessions")
            token = reply.headers.get("X-Auth-Token")
            if not token:
                raise errors.FabricProtocolError("Redfish login answered without X-Auth-Token")
            self._token = token
            self._session_uri = reply.headers.get("Location")
            logger.info("redfish session opened", extra={"fabric": self.http.base_url})

    async def _request(
        self, method: str, path: str, *, json: Any = None, headers: dict[str, str] | None = None
    ) -> Reply:
        """An authenticated call; a 401 (expired session) logs in again once."""
        if self._token is None:
            await self._login(None)
        for attempt in (1, 2):
            token = self._token
            hdrs = {"X-Auth-Token": token or "", "OData-Version": "4.0", **(headers or {})}
            reply = await self.http.call(method, path, json=json, headers=hdrs)
            if reply.status == 401 and attempt == 1:
                logger.info("redfish session expired; logging in again")
                await self._login(token)
                continue
            return reply
        return reply

    async def _get_json(self, path: str) -> Any:
        async def op() -> Any:
            reply = await self._request("GET", path)
            check_status(reply, f"GET {path}", _message(reply))
            return reply.json(f"GET {path}")

        return await self.http.retrying(f"GET {path}", op)

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

    async def _read_inventory(self, conditional: bool) -> Inventory | None:
        await self._discover()
        path = self._links["blocks"] + "?$expand=.($levels=1)"

        async def op() -> Reply:
            hdrs = {"If-None-Match": self._blocks_etag} if conditional and self._blocks_etag else {}
            reply = await self._request("GET", path, headers=hdrs)
            if reply.status != 304:
                check_status(reply, f"GET {path}", _message(reply))
            return reply

        reply = await self.http.retrying("GET ResourceBlocks", op)
        if reply.status == 304:
            return None
        doc = reply.json(f"GET {path}")
        members = doc.get("Members")
        if not isinstance(members, list):
            raise errors.FabricProtocolError(f"GET {path}: no Members list in the collection")
        if members and set(members[0]) == {"@odata.id"}:  # no $expand support: read each block
            members = await asyncio.gather(*(self._get_json(m["@odata.id"]) for m in members))
        devices = tuple(_device(b) for b in members)
        machines = await self._machines()
        self._blocks_etag = reply.headers.get("ETag", "")
        self._last = Inventory(machines, devices, version=self._blocks_etag)
        return self._last

    async def _machines(self) -> tuple[Machine, ...]:
        coll = await self._get_json(self._links["systems"])
        docs = await asyncio.gather(
            *(self._get_json(m["@odata.id"]) for m in coll.get("Members", []))
        )
        return tuple(
            Machine(
                id=MachineId(d["Id"]),
                name=d.get("HostName") or d.get("Name") or d["Id"],
                fabric=FabricId((d.get("Oem", {}).get("Cohdi") or {}).get("Fabric", "")),
                node_name=d.get("HostName") or "",
            )
            for d in docs
        )

    async def _block(self, device: DeviceId) -> tuple[PoolDevice, dict[str, Any]]:
        await self._discover()
        doc = await self._get_json(f"{self._links['blocks']}/{device}")
        return _device(doc), doc

    def watch(self) -> AsyncIterator[Inventory]:
        """The inventory now, then on every change: a conditional GET of the expanded
        ResourceBlocks every poll interval (304 while unchanged). Never raises for an
        unreachable or refusing fabric manager, the first read included: `self.link` says."""
        return poll(self._read_inventory, self.link, self.poll_interval)

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
        only sent from a state read just before; an unknown outcome leads back to a read."""
        deadline = time.monotonic() + self.operation_timeout
        conflicts = 0
        pause = 0.005
        while True:
            if time.monotonic() > deadline:
                raise errors.FabricTimeout(
                    f"{'attach' if attach else 'detach'} of {device} did not finish within "
                    f"{self.operation_timeout:.0f} s"
                )
            dev, block = await self._block(device)
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
                if dev.state in (DeviceState.ATTACHING, DeviceState.DETACHING):
                    # someone's transition is in flight (ours from before a crash?): watch it land
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.5)
                    continue
                target = machine
            else:
                if dev.state == DeviceState.FREE or dev.machine is None:
                    return dev
                if dev.state in (DeviceState.ATTACHING, DeviceState.DETACHING):
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.5)
                    continue
                target = dev.machine
            assert target is not None
            try:
                reply = await self._compose(block, target, add=attach)
            except errors.TransientError as exc:
                logger.warning(
                    "%s of %s: %s; re-reading its state",
                    "attach" if attach else "detach",
                    device,
                    exc,
                )
                await asyncio.sleep(0.1)
                continue
            if reply.status == 412:
                conflicts += 1
                if conflicts > _MAX_412_RETRIES:
                    raise errors.FabricUnavailable(
                        f"{device}: ETag conflicts {conflicts} times in a row"
                    )
                continue
            if reply.status == 202:
                await self._follow(reply, device, deadline)
                continue
            if reply.status >= 500:
                logger.warning("compose of %s answered %d; re-reading", device, reply.status)
                await asyncio.sleep(0.1)
                continue
            check_status(reply, f"compose {device}", _message(reply))

    async def _compose(self, block: dict[str, Any], machine: MachineId, *, add: bool) -> Reply:
        system_uri = f"{self._links['systems']}/{machine}"
        system = await self._request("GET", system_uri)
        check_status(system, f"GET {system_uri}", _message(system))
        sys_doc = system.json(f"GET {system_uri}")
        sys_etag = system.headers.get("ETag") or sys_doc.get("@odata.etag", "")
        action = sys_doc.get("Actions", {}).get(
            "#ComputerSystem.AddResourceBlock" if add else "#ComputerSystem.RemoveResourceBlock"
        )
        block_uri = block["@odata.id"]
        if action and action.get("target"):
            # The action is atomic on the service, so only the block's ETag is sent: it fails the
            # add if the block changed since we read it free. The system's ETag would make every
            # concurrent add to one server fail all but one (412) for no benefit.
            body: dict[str, Any] = {"ResourceBlock": {"@odata.id": block_uri}}
            if block.get("@odata.etag"):
                body["ResourceBlockETag"] = block["@odata.etag"]
            return await self._request("POST", action["target"], json=body)
        links = [m["@odata.id"] for m in sys_doc.get("Links", {}).get("ResourceBlocks", [])]
        if add:
            patch: list[Any] = [{} for _ in links] + [{"@odata.id": block_uri}]
        else:
            patch = [None if uri == block_uri else {} for uri in links]
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


def _retry_after(reply: Reply) -> float:
    """The monitor's Retry-After (seconds), within [0.005, 2]."""
    try:
        return min(max(float(reply.headers.get("Retry-After", "0.5")), 0.005), 2.0)
    except ValueError:
        return 0.5


def _device(block: dict[str, Any]) -> PoolDevice:
    """A ResourceBlock as a PoolDevice (standard fields first, the emulator's Oem for extras)."""
    try:
        status = block.get("CompositionStatus") or {}
        oem = (block.get("Oem") or {}).get("Cohdi") or {}
        systems = (block.get("Links") or {}).get("ComputerSystems") or []
        zones = (block.get("Links") or {}).get("Zones") or []
        machine = systems[0]["@odata.id"].rstrip("/").rsplit("/", 1)[-1] if systems else None
        raw = status.get("CompositionState", "")
        state = _STATE.get(raw)
        if state is None:
            state = DeviceState.DETACHING if machine else DeviceState.FAILED
        if oem.get("FabricState"):
            state = DeviceState(oem["FabricState"])
        return PoolDevice(
            id=DeviceId(block["Id"]),
            fabric=FabricId(zones[0]["@odata.id"].rstrip("/").rsplit("/", 1)[-1] if zones else ""),
            model=oem.get("Model") or block.get("Name", ""),
            state=state,
            vendor=oem.get("Manufacturer", ""),
            memory=int(oem.get("MemoryBytes") or 0),
            serial=oem.get("SerialNumber", ""),
            machine=MachineId(machine) if machine else None,
            pci_address=oem.get("PciAddress") or "",
            reason=oem.get("Reason") or "",
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise errors.FabricProtocolError(
            f"ResourceBlock {block.get('@odata.id', '?')!r} is malformed: "
            f"{type(exc).__name__}: {exc}"
        ) from None


def _message(reply: Reply) -> str:
    """The human message of a Redfish error body, if there is one."""
    try:
        import orjson

        doc = orjson.loads(reply.body)
        err = doc.get("error", {})
        info = err.get("@Message.ExtendedInfo") or [{}]
        return str(info[0].get("Message") or err.get("message") or doc)[:300]
    except (ValueError, AttributeError, TypeError, IndexError):
        return reply.body[:200].decode(errors="replace")
