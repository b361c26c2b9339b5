"""HTTP plumbing shared by the emulator's protocol adapters: fault injection middleware, JSON
responses, credentials (Redfish sessions, FTI bearer tokens) and their expiry."""

from __future__ import annotations

import asyncio
import base64
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from agent.fabric.emulator.state import EmulatorState

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Paths the fault knobs apply to (the admin API never fails on purpose).
API_PREFIXES = ("/redfish", "/fabric_manager", "/id_manager", "/cluster_manager")
#: A per-request fault: `X-Emulator-Fault: unavailable | garbage | reset | delay=<seconds>`.
FAULT_HEADER = "X-Emulator-Fault"


def json_response(
    doc: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc),
        status=status,
        headers={"Content-Type": "application/json; charset=utf-8", **(headers or {})},
    )


@dataclass
class Session:
    id: str
    user: str
    token: str
    expires: float


@dataclass
class Account:
    password: str
    role: str = "Administrator"
    enabled: bool = True
    revision: int = 1


@dataclass
class Credentials:
    """Who may talk to the emulator, and the sessions/tokens it has handed out."""

    users: dict[str, str]
    session_timeout: float
    token_ttl: float
    sessions: dict[str, Session] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)  # bearer token -> expiry (monotonic)
    accounts: dict[str, Account] = field(default_factory=dict)
    _next_session: int = 1

    def __post_init__(self) -> None:
        for user, password in self.users.items():
            self.accounts.setdefault(user, Account(password))

    def check_password(self, user: str, password: str) -> bool:
        acct = self.accounts.get(user)
        return (
            acct is not None
            and acct.enabled
            and hmac.compare_digest(acct.password.encode(), password.encode())
        )

    def role_of(self, user: str) -> str:
        acct = self.accounts.get(user)
        return acct.role if acct else ""

    def new_session(self, user: str) -> Session:
        sid = str(self._next_session)
        self._next_session += 1
        s = Session(sid, user, secrets.token_hex(16), time.monotonic() + self.session_timeout)
        self.sessions[sid] = s
        return s

    def session_for(self, token: str) -> Session | None:
        for s in self.sessions.values():
            if hmac.compare_digest(s.token, token):
                if s.expires < time.monotonic():
                    return None
                s.expires = time.monotonic() + self.session_timeout  # activity renews
                return s
        return None

    def basic_user(self, header: str) -> str | None:
        """The user a `Basic` Authorization header proves, or None."""
        try:
            user, _, password = base64.b64decode(header.split(" ", 1)[1]).decode().partition(":")
        except (ValueError, IndexError, UnicodeDecodeError):
            return None
        return user if self.check_password(user, password) else None

    def new_token(self, user: str) -> tuple[str, int]:
        """An unsigned-looking JWT (header.payload.signature) whose `exp` the FTI client reads."""
        exp = int(time.time() + self.token_ttl)
        header = _b64({"alg": "HS256", "typ": "JWT"})
        payload = _b64(
            {"sub": user, "exp": exp, "iat": int(time.time()), "jti": secrets.token_hex(8)}
        )
        token = f"{header}.{payload}.{secrets.token_urlsafe(24)}"
        self.tokens[token] = time.monotonic() + self.token_ttl
        return token, exp

    def token_ok(self, token: str) -> bool:
        expiry = self.tokens.get(token)
        return expiry is not None and expiry > time.monotonic()

    def expire_all(self) -> None:
        """Forget every session and token: the next call of every client gets 401."""
        self.sessions.clear()
        self.tokens.clear()


def _b64(doc: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(doc)).rstrip(b"=").decode()


def fault_middleware(state: EmulatorState) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(API_PREFIXES):
            return await handler(request)
        faults = state.faults
        state.requests.append((request.method, request.path_qs))
        wanted = request.headers.get(FAULT_HEADER, "")
        delay = faults.delay
        if wanted.startswith("delay="):
            delay = float(wanted.removeprefix("delay="))
        if delay > 0:
            await asyncio.sleep(delay)
        if wanted == "reset" and request.transport is not None:
            request.transport.abort()
            raise ConnectionResetError("injected connection reset")
        path = request.path.rstrip("/") or "/"
        path_fault = faults.unavailable_paths.get(path, 0) > 0
        if wanted == "unavailable" or faults.unavailable_next > 0 or path_fault:
            if path_fault:
                faults.unavailable_paths[path] -= 1
            elif wanted != "unavailable":
                faults.unavailable_next -= 1
            return json_response(
                {
                    "error": {
                        "code": "Base.1.0.ServiceTemporarilyUnavailable",
                        "message": "injected 503",
                    }
                },
                status=503,
                headers={"Retry-After": "1"},
            )
        if faults.error_rate > 0 and state.rng.random() < faults.error_rate:
            return json_response(
                {"error": {"code": "Base.1.0.InternalError", "message": "injected 500"}}, status=500
            )
        if wanted == "garbage" or faults.garbage_next > 0:
            if wanted != "garbage":
                faults.garbage_next -= 1
            return web.Response(
                body=b"<html><body>502 gateway says hello{{{", content_type="application/json"
            )
        return await handler(request)

    return middleware
