"""`/emulator/v1/...`: the test and demo operator's handle on the emulator — read the whole state,
set faults, heal a failed device, set a device's health (`PUT .../devices/<id>/health` with
`{"health": "OK"|"Warning"|"Critical", "reason": "..."}`) or flap its link (`PUT
.../devices/<id>/faults` with `{"link_flap_period": <s>}`), expire every session and token.
Not part of any real fabric manager's API; never behind the fault knobs."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from agent.fabric.emulator.http import Credentials, json_response
from agent.fabric.emulator.state import DeviceFaults, EmulatorError, EmulatorState

A = "/emulator/v1"


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
        body = await request.json()
        known = {f.name for f in dataclasses.fields(self.state.faults)} - {"devices"}
        return self._set(self.state.faults, body, known)

    async def put_device_faults(self, request: web.Request) -> web.Response:
        try:
            self.state.device(request.match_info["id"])
        except EmulatorError as exc:
            return json_response({"error": str(exc)}, status=exc.status)
        faults = self.state.device_faults(request.match_info["id"])
        body = await request.json()
        answer = self._set(faults, body, {f.name for f in dataclasses.fields(DeviceFaults)})
        if faults.link_flap_period > 0:
            self.state.start_link_flap(request.match_info["id"])
        return answer

    async def put_health(self, request: web.Request) -> web.Response:
        body = await request.json()
        if not isinstance(body, dict) or set(body) - {"health", "reason"}:
            return json_response({"error": "expected {health, reason}"}, status=400)
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
        for key, value in body.items():
            setattr(target, key, type(getattr(target, key))(value))
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
