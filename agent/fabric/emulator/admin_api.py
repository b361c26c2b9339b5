"""`/emulator/v1/...`: the test and demo operator's handle on the emulator — read the whole state,
set faults, heal a failed device, set a device's health (`PUT .../devices/<id>/health` with
`{"health": "OK"|"Warning"|"Critical", "reason": "..."}`) or flap its link (`PUT
.../devices/<id>/faults` with `{"link_flap_period": <s>}`), expire every session and token.
Not part of any real fabric manager's API; never behind the fault knobs."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Final

from aiohttp import web

from agent.fabric.emulator.http import Credentials, json_response
from agent.fabric.emulator.state import DeviceFaults, EmulatorError, EmulatorState

A = "/emulator/v1"
#: The shortest link flap period taken (s): shorter ones flip the health (and persist the state)
#: thousands of times a second, a load no link flap puts on a fabric manager.
LINK_FLAP_MIN: Final = 0.05
#: The longest health reason taken (characters): it is a Redfish `Message` and FTI's
#: `res_op_status` text, words for an operator.
REASON_MAX: Final = 1024


class AdminApi:
    def __init__(self, state: EmulatorState, creds: Credentials) -> None:
        self.state = state
        self.creds = creds

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get(f"{A}/state", self.get_state)
        r.add_put(f"{A}/faults", self.put_faults)
        r.add_put(f"{A}/devices/{{id}}/faults", self.put_device_faults)
        r.add_post(f"{A}/devices/{{id}}/heal", self.heal)
        r.add_put(f"{A}/devices/{{id}}/health", self.put_health)
        r.add_post(f"{A}/expire-credentials", self.expire)
        r.add_get(f"{A}/counters", self.counters)

    async def get_state(self, request: web.Request) -> web.Response:
        return json_response(self.state.snapshot())

    async def put_faults(self, request: web.Request) -> web.Response:
        body = await _json(request)
        known = {f.name for f in dataclasses.fields(self.state.faults)} - {"devices"}
        return self._set(self.state.faults, body, known)

    async def put_device_faults(self, request: web.Request) -> web.Response:
        try:
            self.state.device(request.match_info["id"])
        except EmulatorError as exc:
            return json_response({"error": str(exc)}, status=exc.status)
        faults = self.state.device_faults(request.match_info["id"])
        body = await _json(request)
        try:
            period = _convert(0.0, body.get("link_flap_period", 0) if isinstance(body, dict) else 0)
        except (TypeError, ValueError):
            period = 0.0  # _set says what is wrong with it
        if period < 0 or 0 < period < LINK_FLAP_MIN:
            return json_response(
                {"error": f"link_flap_period: 0 (off) or at least {LINK_FLAP_MIN} s"}, status=400
            )
        answer = self._set(faults, body, {f.name for f in dataclasses.fields(DeviceFaults)})
        if faults.link_flap_period > 0:
            self.state.start_link_flap(request.match_info["id"])
        return answer

    async def put_health(self, request: web.Request) -> web.Response:
        body = await _json(request)
        if not isinstance(body, dict) or set(body) - {"health", "reason"}:
            return json_response({"error": "expected {health, reason}"}, status=400)
        reason = body.get("reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > REASON_MAX):
            return json_response(
                {"error": f"reason: a string of at most {REASON_MAX} characters"}, status=400
            )
        try:
            self.state.set_health(
                request.match_info["id"], str(body.get("health")), str(body.get("reason") or "")
            )
        except EmulatorError as exc:
            return json_response({"error": str(exc)}, status=exc.status)
        dev = self.state.device(request.match_info["id"])
        return json_response({"health": dev.health, "reason": dev.health_reason})

    def _set(self, target: Any, body: Any, known: set[str]) -> web.Response:
        if not isinstance(body, dict) or set(body) - known:
            return json_response(
                {"error": f"unknown fault fields; known: {sorted(known)}"}, status=400
            )
        values: dict[str, Any] = {}
        for key, value in body.items():
            try:
                values[key] = _convert(getattr(target, key), value)
            except (TypeError, ValueError) as exc:
                return json_response({"error": f"{key}: {exc}"}, status=400)
        for key, value in values.items():  # all or nothing
            setattr(target, key, value)
        return json_response({k: getattr(target, k) for k in known})

    async def heal(self, request: web.Request) -> web.Response:
        try:
            self.state.heal(request.match_info["id"])
        except EmulatorError as exc:
            return json_response({"error": str(exc)}, status=exc.status)
        return json_response({"healed": request.match_info["id"]})

    async def expire(self, request: web.Request) -> web.Response:
        self.creds.expire_all()
        return json_response({"expired": True})

    async def counters(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "attach_requests": self.state.attach_requests,
                "attach_started": self.state.attach_started,
            }
        )


async def _json(request: web.Request) -> Any:
    """The request's JSON body; a body that is not JSON is the client's error (400), not ours."""
    try:
        return await request.json()
    except ValueError as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"the body is not JSON: {exc}"}),
            content_type="application/json",
        ) from None


def _convert(current: Any, value: Any) -> Any:
    """`value` as the type of the knob's `current` value. Raises TypeError/ValueError for a
    value of another kind (null, a list for a number...), a non-finite number, or a string
    that is not one."""
    kind = type(current)
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(f"expected a number, got {value!r}")
        number = kind(value)
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        return number
    if not isinstance(value, kind):
        raise TypeError(f"expected {kind.__name__}, got {value!r}")
    return value
