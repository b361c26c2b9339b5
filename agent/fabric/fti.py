"""The `fti` backend: the Fsas/Fujitsu CDI fabric-manager API that CoHDI speaks.

- Token: OpenID password grant at `id_manager/realms/<realm>/protocol/openid-connect/token`
  (form-encoded properly, unlike CoHDI's string formatting), expiry from the JWT's `exp`, renewed
  30 s before it; a 401 renews it once and repeats the call.
- Reads: `GET fabric_manager/api/v1/machines` (attached resources per machine) and, per fabric and
  configured model, `.../available-reserved-resources` (a free *count*: this API names no free
  device, so free devices are anonymous slots `<fabric>.<model>.free-<n>`).
- Attach: `PATCH .../machines/<m>/update` with a model condition, and `res_uuid` when we know the
  device we want (a real FM may pick another device; the answer names the one attached).
  Synchronous: the answer comes when the device is attached.
- Detach: `DELETE .../machines/<m>/update` with the `res_uuid`; skipped when the machine no longer
  has it.

NB: for an anonymous slot, idempotency after a crash between "sent" and "answered" cannot come
from this API (it has no request id); the composer records the machine's resources before sending
and adopts a new device of the model afterwards (see agent/controllers).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from agent import errors
from agent.fabric.credentials import Secret
from agent.fabric.link import FabricLink, poll
from agent.fabric.transport import FabricHttp, Reply, check_status
from agent.model import slots as slotmodel
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

FM = "/fabric_manager/api/v1"
CM = "/cluster_manager/cluster_autoscaler"
_REFRESH_MARGIN = 30.0
#: `res_status` -> state (CoHDI's mock: 4 attached; the emulator: 2 attaching, 6 detaching, 9
#: failed). Anything else reads as attached: the FM lists only resources on the machine.
_STATE = {
    2: DeviceState.ATTACHING,
    4: DeviceState.ATTACHED,
    6: DeviceState.DETACHING,
    9: DeviceState.FAILED,
}


class FtiFabric:
    backend = "fti"

    def __init__(
        self,
        http: FabricHttp,
        *,
        user: str,
        password: Secret,
        tenant: str,
        realm: str = "cdi",
        client_id: str = "cohdi-agent",
        client_secret: Secret | None = None,
        models: tuple[str, ...] = (),
        operation_timeout: float = 300.0,
        poll_interval: float = 2.0,
    ) -> None:
        if not tenant:
            raise errors.ConfigError(
                "--fabric-tenant", tenant, "the fti backend needs the tenant_uuid"
            )
        self.http = http
        self.user = user
        self._password = password
        self._client_secret = client_secret or Secret("")
        self.tenant = tenant
        self.realm = realm
        self.client_id = client_id
        self.models = models
        self.operation_timeout = operation_timeout
        self.poll_interval = poll_interval
        self._token: str | None = None
        self._token_exp = 0.0
        self._token_lock = asyncio.Lock()
        #: Whether the fabric manager answered the watch's last read (readiness, logs).
        self.link = FabricLink(http.base_url)

    # --- token -----------------------------------------------------------------------------------

    async def _bearer(self, *, renew: bool = False) -> str:
        async with self._token_lock:
            if not renew and self._token and time.time() < self._token_exp - _REFRESH_MARGIN:
                return self._token
            form = {
                "grant_type": "password",
                "client_id": self.client_id,
                "username": self.user,
                "password": self._password.reveal(),
                "scope": "openid",
                "response_type": "id_token token",
            }
            if self._client_secret:
                form["client_secret"] = self._client_secret.reveal()
            path = f"/id_manager/realms/{self.realm}/protocol/openid-connect/token"
            reply = await self.http.retrying("token", lambda: self._token_call(path, form))
            if reply.status in (400, 401, 403, 404):
                raise errors.FabricAuthError(
                    f"the FTI identity manager refused a token for {self.user!r} in realm "
                    f"{self.realm!r} ({reply.status}); check --fabric-user, the password, "
                    "--fabric-realm and --fabric-client-id"
                )
            check_status(reply, "token")
            doc = reply.json("token")
            token = doc.get("access_token") if isinstance(doc, dict) else None
            if not isinstance(token, str) or token.count(".") != 2:
                raise errors.FabricProtocolError(
                    "the token endpoint answered without a JWT access_token"
                )
            self._token, self._token_exp = token, _jwt_exp(token)
            return token

    async def _token_call(self, path: str, form: dict[str, str]) -> Reply:
        reply = await self.http.call("POST", path, data=form)
        if reply.status >= 500:
            check_status(reply, "token")
        return reply

    async def _fm(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 -- per-call aiohttp limit
    ) -> Reply:
        q = {"tenant_uuid": self.tenant, **(params or {})}
        return await self._authorized(method, FM + path, json=json, params=q, timeout=timeout)

    async def _authorized(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 -- per-call aiohttp limit
    ) -> Reply:
        """One call with the bearer token; a 401 renews the token once and repeats it."""
        for attempt in (1, 2):
            token = await self._bearer(renew=attempt == 2)
            reply = await self.http.call(
                method,
                path,
                json=json,
                params=params,
                timeout=timeout,
                headers={"Authorization": f"Bearer {token}"},
            )
            if reply.status == 401 and attempt == 1:
                logger.info("FTI token rejected; renewing it")
                continue
            return reply
        return reply

    async def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        async def op() -> Any:
            reply = await self._fm("GET", path, params=params)
            check_status(reply, f"GET {path}", _detail(reply))
            return reply.json(f"GET {path}")

        return await self.http.retrying(f"GET {path}", op)

    async def cm_get(self, path: str) -> Any:
        """`GET /cluster_manager/cluster_autoscaler/<path>` (the cluster-manager API: the tenant
        is in the path, not the query), with the same token and retries as the FM calls; the
        decoded JSON. Raises like every read (`agent.fabric.transport.check_status`)."""
        full = f"{CM}/{path.lstrip('/')}"

        async def op() -> Any:
            reply = await self._authorized("GET", full)
            check_status(reply, f"GET {full}", _detail(reply))
            return reply.json(f"GET {full}")

        return await self.http.retrying(f"GET {full}", op)

    def trust_ca(self, pem: str, *, where: str) -> None:
        """Trust the CA certificate(s) in `pem` for new connections to the fabric manager (beside
        those trusted already: an SSL context cannot forget a CA). ConfigError naming `where`
        when it is not PEM. Nothing to do over plain http."""
        context = self.http._ssl  # the transport's context, made for this URL
        if context is None:
            return
        try:
            context.load_verify_locations(cadata=pem)
        except (ssl.SSLError, ValueError) as exc:
            raise errors.ConfigError(
                where, pem[:40], f"is not a PEM CA certificate ({exc})"
            ) from exc

    def reconfigure(
        self,
        *,
        user: str,
        password: Secret,
        realm: str,
        client_id: str,
        client_secret: Secret,
        models: tuple[str, ...],
    ) -> bool:
        """New credentials or models while running (a changed CoHDI Secret or ConfigMap). The
        cached token is dropped when any credential changed, so the next call asks for one with
        the new ones. Returns whether anything changed."""
        creds = (user, password.reveal(), realm, client_id, client_secret.reveal())
        old = (
            self.user,
            self._password.reveal(),
            self.realm,
            self.client_id,
            self._client_secret.reveal(),
        )
        changed = creds != old or models != self.models
        if creds != old:
            self.user, self._password, self.realm = user, password, realm
            self.client_id, self._client_secret = client_id, client_secret
            self._token, self._token_exp = None, 0.0
        self.models = models
        return changed

    async def close(self) -> None:
        await self.http.close()

    # --- reads -----------------------------------------------------------------------------------

    async def _machine_docs(self) -> list[dict[str, Any]]:
        doc = await self._get("/machines")
        try:
            machines = doc["data"]["machines"]
            assert isinstance(machines, list)
        except (KeyError, TypeError, AssertionError):
            raise errors.FabricProtocolError("GET /machines: no data.machines list") from None
        for m in machines:
            _check_machine(m, "GET /machines")
        return machines

    async def inventory(self) -> Inventory:
        docs = await self._machine_docs()
        machines: list[Machine] = []
        devices: list[PoolDevice] = []
        first_of_fabric: dict[FabricId, MachineId] = {}
        for m in docs:
            try:
                fabric = _fabric_of(m)
                mid = _mach_uuid(m)
                name = _text(m.get("mach_name")) or mid
                machines.append(Machine(mid, name, fabric, _text(m.get("mach_name"))))
                if fabric:  # a machine with no fabric_id is wired to no fabric (CoHDI drops it)
                    first_of_fabric.setdefault(fabric, mid)
                devices.extend(_resource(r, fabric, mid) for r in m.get("resources") or [])
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise errors.FabricProtocolError(
                    f"GET /machines: malformed machine {m!r:.200}: {exc}"
                ) from None
        for fabric_id, first in sorted(first_of_fabric.items()):
            counts = await asyncio.gather(*(self._free_count(first, m) for m in self.models))
            for model, count in zip(self.models, counts, strict=True):
                devices.extend(slotmodel.placeholders(fabric_id, model, count))
        version = hashlib.sha256(
            orjson.dumps([docs, [(d.id, d.state) for d in devices]])
        ).hexdigest()[:16]
        return Inventory(tuple(machines), tuple(devices), version=version)

    async def _free_count(self, machine: MachineId, model: str) -> int:
        cond = orjson.dumps({"column": "model", "operator": "eq", "value": model}).decode()
        doc = await self._get(
            f"/machines/{machine}/available-reserved-resources",
            {"res_type": "gpu", "condition": cond},
        )
        count = doc.get("reserved_res_num_per_fabric") if isinstance(doc, dict) else None
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise errors.FabricProtocolError(f"available-reserved-resources: bad count {count!r}")
        return count

    async def _machine(self, machine: MachineId) -> dict[str, Any]:
        doc = await self._get(f"/machines/{machine}")
        try:
            (m,) = doc["data"]["machines"]
        except (KeyError, TypeError, ValueError):
            raise errors.FabricProtocolError(
                f"GET /machines/{machine}: no single machine in data.machines"
            ) from None
        return dict(_check_machine(m, f"GET /machines/{machine}"))

    def watch(self) -> AsyncIterator[Inventory]:
        """The inventory now, then on every change (this API has no ETag: every poll reads the
        machines and free counts, and a digest of them says whether anything changed). Never
        raises for an unreachable or refusing fabric manager, the first read included:
        `self.link` says."""
        last = ""

        async def read(conditional: bool) -> Inventory | None:
            nonlocal last
            inv = await self.inventory()
            if conditional and inv.version == last:
                return None
            last = inv.version
            return inv

        return poll(read, self.link, self.poll_interval)

    # --- writes ----------------------------------------------------------------------------------

    def _body(self, machine: MachineId, spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "tenants": {
                "tenant_uuid": self.tenant,
                "machines": [
                    {
                        "mach_uuid": machine,
                        "resources": [{"res_specs": [{"res_type": "gpu", "res_num": 1, **spec}]}],
                    }
                ],
            }
        }

    async def attach(self, device: DeviceId, machine: MachineId, *, model: str = "") -> PoolDevice:
        anonymous = ".free-" in device
        async with self.http.device(device if not anonymous else f"{machine}/{model}"):
            m = await self._machine(machine)
            fabric = _fabric_of(m)
            if not anonymous:
                for r in m.get("resources") or []:
                    if r.get("res_uuid") == device:  # already there or on its way: send nothing
                        return await self._settle_attach(device, machine, fabric)
            if not model:
                model = device.split(".")[1] if anonymous else ""
            if not model:
                raise errors.FabricRejected(
                    f"attach of {device}: the fti backend needs the device's model"
                )
            spec: dict[str, Any] = {
                "res_spec": {"condition": [{"column": "model", "operator": "eq", "value": model}]}
            }
            if not anonymous:
                spec["res_uuid"] = device
            try:
                reply = await self._fm(
                    "PATCH",
                    f"/machines/{machine}/update",
                    json=self._body(machine, spec),
                    timeout=self.operation_timeout,
                )
            except errors.TransientError:
                if anonymous:
                    raise  # the caller (composer) reconciles by its record of the machine
                return await self._settle_attach(device, machine, fabric)
            if reply.status >= 500 and not anonymous:
                logger.warning(
                    "attach of %s answered %d (%s); re-reading",
                    device,
                    reply.status,
                    _detail(reply),
                )
                return await self._settle_attach(device, machine, fabric)
            check_status(reply, f"attach {device} to {machine}", _detail(reply))
            doc = reply.json("attach")
            try:
                res = doc["data"]["machines"][0]["resources"][0]
            except (KeyError, TypeError, IndexError):
                raise errors.FabricProtocolError(
                    "attach answered without data.machines[0].resources[0]"
                ) from None
            result = _resource(res, fabric, machine)
            # CoHDI's operator: an attach answered with res_op_status 2 (critical) failed
            if result.state == DeviceState.FAILED or result.health == "Critical":
                raise errors.DeviceFailed(
                    f"attach of {result.id} to {machine}: res_op_status {res.get('res_op_status')}"
                )
            if not anonymous and result.id != device:
                logger.warning("asked the FM for %s, it attached %s", device, result.id)
            return result

    async def _settle_attach(
        self, device: DeviceId, machine: MachineId, fabric: FabricId
    ) -> PoolDevice:
        """After an unknown outcome: is the device on the machine? (never send a second attach)"""
        deadline = time.monotonic() + self.operation_timeout
        while time.monotonic() < deadline:
            m = await self._machine(machine)
            for r in m.get("resources") or []:
                if r.get("res_uuid") == device:
                    dev = _resource(r, fabric, machine)
                    if dev.state == DeviceState.ATTACHED:
                        return dev
                    if dev.state == DeviceState.FAILED:
                        raise errors.DeviceFailed(
                            f"attach of {device} to {machine} failed on the fabric"
                        )
                    break
            else:
                raise errors.FabricUnavailable(
                    f"attach of {device} to {machine} was lost; it is not attached"
                )
            await asyncio.sleep(0.1)
        raise errors.FabricTimeout(
            f"attach of {device} to {machine} did not settle in {self.operation_timeout:.0f} s"
        )

    async def detach(self, device: DeviceId) -> PoolDevice:
        async with self.http.device(device):
            for m in await self._machine_docs():
                fabric = _fabric_of(m)
                for r in m.get("resources") or []:
                    if r.get("res_uuid") == device:
                        machine = _mach_uuid(m)
                        model = _model(r)
                        reply = await self._fm(
                            "DELETE",
                            f"/machines/{machine}/update",
                            json=self._body(machine, {"res_uuid": device}),
                            timeout=self.operation_timeout,
                        )
                        check_status(reply, f"detach {device} from {machine}", _detail(reply))
                        # back in the fabric's free count: it has no identity of its own
                        # there (FTI names no free GPU), hence anonymous
                        return PoolDevice(
                            device,
                            fabric,
                            model,
                            DeviceState.FREE,
                            gpu_uuid=_text(r.get("res_serial_num")),
                            anonymous=True,
                        )
            # not attached anywhere
            return PoolDevice(device, FabricId(""), "", DeviceState.FREE, anonymous=True)


def _check_machine(m: Any, what: str) -> dict[str, Any]:
    """`m` if it is a machine object whose `resources` (absent or null: none) is a list of
    objects; FabricProtocolError otherwise, so that every later `.get` reads a dict (an odd
    answer must be a protocol error the watch retries, never a crash)."""
    resources = m.get("resources") if isinstance(m, dict) else None
    if (
        not isinstance(m, dict)
        or (resources is not None and not isinstance(resources, list))
        or not all(isinstance(r, dict) for r in resources or [])
    ):
        raise errors.FabricProtocolError(
            f"{what}: a machine is not an object with a list of resource objects: {m!r:.200}"
        )
    return m


def _model(r: dict[str, Any]) -> str:
    """The model of a resource: the value of its `res_spec.condition[]` item whose column is
    `model`, else its `res_name` ("" when null). TypeError for a res_spec, condition list or
    condition that is not of its JSON type."""
    spec = r.get("res_spec") or {}
    conditions = spec.get("condition") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or not isinstance(conditions, list | None):
        raise TypeError(f"res_spec must be an object with a condition list, got {spec!r}")
    for cond in conditions or []:
        if not isinstance(cond, dict):
            raise TypeError(f"a res_spec condition must be an object, got {cond!r}")
        if cond.get("column") == "model":
            value = cond.get("value")
            return "" if value is None else str(value)
    return _text(r.get("res_name"))


def _text(value: Any) -> str:
    """A string field that real fabric managers may send as null: "" for None."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _mach_uuid(m: dict[str, Any]) -> MachineId:
    """`mach_uuid`, strictly a non-empty string: it is the machine's identity here and in every
    node's `spec.providerID` (`fsas-cdi://<mach_uuid>`). (`mach_id`, the FM's own integer — a
    string on some managers — is not used as an identity.)"""
    value = m["mach_uuid"]
    if not isinstance(value, str) or not value:
        raise TypeError(f"mach_uuid must be a non-empty string, got {value!r}")
    return MachineId(value)


def _fabric_of(m: dict[str, Any]) -> FabricId:
    """The machine's fabric: `fabric_uuid` when the FM sends one, else its integer `fabric_id`
    (CoHDI's types: a nullable int; a digit string is taken too). "" when neither is set: the
    machine is wired to no fabric."""
    if isinstance(m.get("fabric_uuid"), str) and m["fabric_uuid"]:
        return FabricId(m["fabric_uuid"])
    raw = m.get("fabric_id")
    if raw is None:
        return FabricId("")
    if isinstance(raw, bool) or not isinstance(raw, int | str) or not _DIGITS.match(str(raw)):
        raise TypeError(f"fabric_id must be an integer or null, got {raw!r}")
    return FabricId(str(int(raw)))


#: A non-negative integer as JSON or as a digit string: ASCII digits only (`str.isdigit` and
#: `int` also take other scripts' digits, which no fabric manager sends).
_DIGITS = re.compile(r"[0-9]+\Z")


def _number(value: Any, default: int) -> int:
    """An integer field (`res_status`), tolerating a digit string; `default` for null."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"expected an integer, got {value!r}")
    if isinstance(value, str) and not _DIGITS.match(value.strip()):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)


#: `res_op_status` first character -> health word (CoHDI's operator: 0 OK, 1 warning accepted,
#: 2 critical, an error).
_HEALTH = {"0": "OK", "1": "Warning", "2": "Critical"}


def _resource(r: dict[str, Any], fabric: FabricId, machine: MachineId) -> PoolDevice:
    try:
        raw_op = r.get("res_op_status")
        raw_op = "0" if raw_op is None else raw_op  # null: no report, as absent
        if isinstance(raw_op, bool) or not isinstance(raw_op, str | int):
            raise TypeError(f"res_op_status must be a string, got {raw_op!r}")
        op = str(raw_op) or "0"
        health = _HEALTH.get(op[0], "Warning")
        reason = op[1:] if health != "OK" else ""
        if health == "Warning" and op[0] not in _HEALTH:
            reason = f"unknown res_op_status {op!r}"
        state = _STATE.get(_number(r.get("res_status"), 4), DeviceState.ATTACHED)
        res_uuid = r["res_uuid"]
        if not isinstance(res_uuid, str) or not res_uuid:
            raise TypeError(f"res_uuid must be a non-empty string, got {res_uuid!r}")
        return PoolDevice(
            id=DeviceId(res_uuid),
            fabric=fabric,
            model=_model(r),
            state=state,
            gpu_uuid=_text(r.get("res_serial_num")),
            machine=machine,
            pci_address=_text(r.get("res_pci_address")),
            reason=reason if state == DeviceState.FAILED else "",
            health=health,
            health_reason=reason or (f"res_op_status {op}" if health != "OK" else ""),
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise errors.FabricProtocolError(f"malformed FTI resource {r!r:.200}: {exc}") from None


def _jwt_exp(token: str) -> float:
    """`exp` of a JWT's payload (not verified: the FM verifies it; we only schedule renewal)."""
    try:
        payload = token.split(".")[1]
        doc = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(doc["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return time.time() + 60.0  # no readable exp: renew in a minute


def _detail(reply: Reply) -> str:
    """The FM's error body `{"status": <int>, "detail": {"code": str, "message": str | JSON,
    "data": {}}}` as `<code> <message>` (a JSON message re-encoded); anything else, its first
    200 bytes."""
    try:
        doc = orjson.loads(reply.body)
        detail = doc.get("detail") or {}
        message = detail.get("message", "")
        if not isinstance(message, str):
            message = orjson.dumps(message).decode()
        return f"{detail.get('code', '')} {message}".strip() or str(doc)[:200]
    except (ValueError, AttributeError, TypeError):
        return reply.body[:200].decode(errors="replace")
