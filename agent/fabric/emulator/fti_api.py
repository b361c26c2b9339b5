"""The emulator's Fsas/FTI side: the Keycloak-style token endpoint and the fabric-manager API that
CoHDI's Composable DRA Driver and Composable Resource Operator speak, with the field names and
JSON types their Go types decode (`mach_id` and `fabric_id` integers, `res_status` an integer,
`res_op_status` a string whose first character is 0 OK / 1 warning / 2 critical, errors as
`{"status": <int>, "detail": {"code", "message", "data"}}`). The cluster-manager side is
`agent/fabric/emulator/cm_api.py`.

Attach (`PATCH .../machines/<m>/update`) is synchronous like the real FM: the answer comes when
the device is attached (or failed). The FM picks a free device of the requested model; as an
extension it honours a `res_uuid` in the res_spec, so a client that knows the device it wants gets
exactly that one.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from agent.fabric.emulator.http import Credentials, json_response
from agent.fabric.emulator.state import Device, EmulatorError, EmulatorState, Task
from agent.model.fabric import DeviceState

FM = "/fabric_manager/api/v1"

# res_status numbers as the FM reports them (CoHDI's mock uses 4 for an attached GPU).
_RES_STATUS = {
    DeviceState.ATTACHING: 2,
    DeviceState.ATTACHED: 4,
    DeviceState.DETACHING: 6,
    DeviceState.FAILED: 9,
}


def fm_error(status: int, code: str, message: str) -> web.Response:
    return json_response(
        {"status": status, "detail": {"code": code, "message": message, "data": {}}}, status=status
    )


#: `res_op_status` first character per health word (CoHDI's operator: 0 OK, 1 warning, 2
#: critical); the rest of the string is the reason in words (an extension: CoHDI reads only the
#: first character).
_OP_STATUS = {"OK": "0", "Warning": "1", "Critical": "2"}


def op_status(dev: Device) -> str:
    """The resource's `res_op_status`: "2<reason>" for a failed device (`res_status` 9), else
    its health as "0", "1<reason>" (Warning) or "2<reason>" (Critical)."""
    if dev.state == DeviceState.FAILED:
        return "2" + dev.reason
    code = _OP_STATUS.get(dev.health, "0")
    return code if code == "0" else code + (dev.health_reason or dev.health)


class FtiApi:
    def __init__(self, state: EmulatorState, creds: Credentials) -> None:
        self.state = state
        self.creds = creds
        self.fabric_index = {f: i for i, f in enumerate(state.config.fabrics)}
        #: machine uuid -> the FM's integer `mach_id` (1, 2, ... in configuration order)
        self.mach_index = {m: i for i, m in enumerate(state.machines, start=1)}

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/id_manager/realms/{realm}/protocol/openid-connect/token", self.token)
        r.add_get(f"{FM}/machines", self.machines)
        r.add_get(f"{FM}/machines/{{m}}", self.machine)
        r.add_get(f"{FM}/machines/{{m}}/available-reserved-resources", self.available)
        r.add_patch(f"{FM}/machines/{{m}}/update", self.attach)
        r.add_delete(f"{FM}/machines/{{m}}/update", self.detach)

    # --- auth ------------------------------------------------------------------------------------

    async def token(self, request: web.Request) -> web.Response:
        if request.match_info["realm"] != self.state.config.realm:
            return json_response(
                {"error": "invalid_request", "error_description": "Realm does not exist"},
                status=404,
            )
        form = await request.post()
        if form.get("grant_type") != "password":
            return json_response({"error": "unsupported_grant_type"}, status=400)
        user, password = str(form.get("username", "")), str(form.get("password", ""))
        if not self.creds.check_password(user, password):
            return json_response(
                {"error": "invalid_grant", "error_description": "Invalid user credentials"},
                status=401,
            )
        token, _exp = self.creds.new_token(user)
        ttl = int(self.creds.token_ttl)
        return json_response(
            {
                "access_token": token,
                "id_token": token,
                "expires_in": ttl,
                "token_type": "Bearer",
                "scope": "openid",
            }
        )

    def _authorized(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not self.creds.token_ok(auth.removeprefix("Bearer ")):
            return fm_error(401, "E40100", "the access token is missing, invalid or expired")
        if request.query.get("tenant_uuid") != self.state.config.tenant:
            return fm_error(
                403, "E40300", f"unknown tenant_uuid {request.query.get('tenant_uuid')!r}"
            )
        return None

    # --- reads -----------------------------------------------------------------------------------

    def _resource(self, dev: Device) -> dict[str, Any]:
        s = dev.spec
        return {
            "res_uuid": s.id,
            "res_name": s.model,
            "res_type": "gpu",
            "res_status": _RES_STATUS.get(dev.state, 0),
            "res_op_status": op_status(dev),
            "res_serial_num": s.serial,
            "res_spec": {"condition": [{"column": "model", "operator": "eq", "value": s.model}]},
            "res_pci_address": dev.pci_address or None,  # extension: where it landed
        }

    def _machine_doc(self, machine_id: str) -> dict[str, Any]:
        m = self.state.machine(machine_id)
        return {
            "fabric_uuid": m.fabric,
            "fabric_id": self.fabric_index[m.fabric],
            "mach_uuid": m.id,
            "mach_id": self.mach_index[m.id],
            "mach_name": m.name,
            "tenant_uuid": self.state.config.tenant,
            "mach_status": 15,
            "mach_status_detail": "",
            "resources": [self._resource(d) for d in self.state.attached_to(m.id)],
        }

    async def machines(self, request: web.Request) -> web.Response:
        if (denied := self._authorized(request)) is not None:
            return denied
        return json_response(
            {"data": {"machines": [self._machine_doc(m) for m in self.state.machines]}}
        )

    async def machine(self, request: web.Request) -> web.Response:
        if (denied := self._authorized(request)) is not None:
            return denied
        try:
            doc = self._machine_doc(request.match_info["m"])
        except EmulatorError as exc:
            return fm_error(exc.status, "E40400", str(exc))
        return json_response({"data": {"machines": [doc]}})

    async def available(self, request: web.Request) -> web.Response:
        if (denied := self._authorized(request)) is not None:
            return denied
        if request.query.get("res_type") != "gpu":
            return fm_error(400, "E40000", "res_type must be gpu")
        try:
            m = self.state.machine(request.match_info["m"])
            cond = orjson.loads(request.query.get("condition", "{}"))
            model = cond["value"] if isinstance(cond, dict) else cond[0]["value"]
            if not isinstance(model, str):
                raise TypeError("model must be a string")
        except EmulatorError as exc:
            return fm_error(exc.status, "E40400", str(exc))
        except (ValueError, KeyError, IndexError, TypeError):
            return fm_error(
                400,
                "E40000",
                'condition must be JSON like {"column":"model","operator":"eq","value":"<model>"}',
            )
        # A fabric manager does not hand out a GPU it knows is sick: one whose own health is not
        # OK is neither counted free nor picked by model (it is still listed, with its
        # res_op_status, among the machine's resources when attached).
        free = [
            d
            for d in self.state.devices.values()
            if d.spec.fabric == m.fabric
            and d.spec.model == model
            and d.state == DeviceState.FREE
            and d.health == "OK"
        ]
        return json_response(
            {"reserved_res_num_per_fabric": len(free), "fabric_id": self.fabric_index[m.fabric]}
        )

    # --- writes ----------------------------------------------------------------------------------

    def _spec(self, body: Any, machine_id: str) -> dict[str, Any]:
        try:
            tenants = body["tenants"]
            if tenants["tenant_uuid"] != self.state.config.tenant:
                raise EmulatorError(f"unknown tenant_uuid {tenants['tenant_uuid']!r}")
            (mach,) = tenants["machines"]
            if mach["mach_uuid"] != machine_id:
                raise EmulatorError(f"body names machine {mach['mach_uuid']}, the URL {machine_id}")
            (spec,) = mach["resources"][0]["res_specs"]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise EmulatorError(f"malformed request body ({type(exc).__name__}: {exc})") from exc
        num = spec.get("res_num")
        if spec.get("res_type") != "gpu" or isinstance(num, bool) or num != 1:
            raise EmulatorError(
                f"only res_type gpu with res_num 1 (an integer) is supported, got "
                f"res_type {spec.get('res_type')!r} res_num {num!r}"
            )
        return dict(spec)

    async def attach(self, request: web.Request) -> web.Response:
        if (denied := self._authorized(request)) is not None:
            return denied
        machine_id = request.match_info["m"]
        try:
            machine = self.state.machine(machine_id)
            spec = self._spec(await _body(request), machine_id)
            wanted = spec.get("res_uuid")
            dev: Device | None
            if wanted:
                dev = self.state.device(wanted)
            else:
                model = spec["res_spec"]["condition"][0]["value"]
                dev = next(
                    (
                        d
                        for d in self.state.devices.values()
                        if d.spec.fabric == machine.fabric
                        and d.spec.model == model
                        and d.state == DeviceState.FREE
                        and d.health == "OK"
                    ),
                    None,
                )
                if dev is None:
                    return fm_error(
                        404, "insufficient_resources", f"no free {model} on fabric {machine.fabric}"
                    )
            task = self.state.attach(dev.spec.id, machine_id)
        except EmulatorError as exc:
            return fm_error(exc.status, f"E{exc.status}00", str(exc))
        except (KeyError, IndexError, TypeError) as exc:
            return fm_error(400, "E40000", f"res_spec needs a model condition ({exc})")
        await _wait(task)
        # Like the real FM, a failed attach is a 200 whose resource has res_op_status "2..."
        # (critical); CoHDI's operator reads it that way.
        doc = self._machine_doc(machine_id)
        doc["resources"] = [self._resource(self.state.device(dev.spec.id))]
        return json_response({"data": {"machines": [doc]}})

    async def detach(self, request: web.Request) -> web.Response:
        if (denied := self._authorized(request)) is not None:
            return denied
        machine_id = request.match_info["m"]
        try:
            self.state.machine(machine_id)
            spec = self._spec(await _body(request), machine_id)
            if not spec.get("res_uuid"):
                raise EmulatorError("detach needs res_uuid in res_specs")
            task = self.state.detach(str(spec["res_uuid"]), machine_id)
        except EmulatorError as exc:
            return fm_error(exc.status, f"E{exc.status}00", str(exc))
        if (failed := await _wait(task)) is not None:
            return fm_error(500, "E50011", failed)
        return json_response({})


async def _body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError as exc:
        raise EmulatorError(f"request body is not JSON: {exc}") from exc


async def _wait(task: Task | None) -> str | None:
    """Block like the real (synchronous) FM until the transition ends; the failure text or None."""
    if task is None:
        return None
    await asyncio.shield(task.done.wait())
    return task.message if task.state == "Exception" else None
