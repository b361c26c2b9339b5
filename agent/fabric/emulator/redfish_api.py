"""The emulator's DMTF Redfish side: service root, SessionService, AccountService, Systems (one
expandable ComputerSystem per machine), CompositionService with ResourceBlocks (one per pooled GPU,
holding a GPU Processor) and ResourceZones (one per fabric), TaskService with task monitors.

Composition: `PATCH /redfish/v1/Systems/<id>` of `Links.ResourceBlocks` with the Redfish array
rules (`{}` keeps, `null` removes, a new element appends), or the `#ComputerSystem.AddResourceBlock`
/ `RemoveResourceBlock` actions. A composition that takes time answers `202 Accepted` with a task
monitor. Every resource has an ETag; a write with a stale `If-Match` gets 412.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import re
from typing import Any

from aiohttp import web

from agent.fabric.emulator import oem
from agent.fabric.emulator.http import Account, Credentials, Handler, json_response
from agent.fabric.emulator.mockup import Mockup, normalise, segment
from agent.fabric.emulator.state import Device, EmulatorError, EmulatorState, Task
from agent.model.fabric import DeviceState

R = "/redfish/v1"
BLOCKS = f"{R}/CompositionService/ResourceBlocks"
ZONES = f"{R}/CompositionService/ResourceZones"
SYSTEMS = f"{R}/Systems"
TASKS = f"{R}/TaskService/Tasks"
MONITORS = f"{R}/TaskService/TaskMonitors"
SESSIONS = f"{R}/SessionService/Sessions"
ACCOUNTS = f"{R}/AccountService/Accounts"
ROLES = f"{R}/AccountService/Roles"
#: The authenticated user of a request ("": anonymous).
USER = web.RequestKey("user", str)
#: Compositions that finish within this answer the request itself (200/204), longer ones 202.
SYNC_WINDOW = 0.1
SERVICE_UUID = "6e3b6a2c-6f2d-4bb3-9b1e-7b1f6a0c0d01"

#: Reachable without credentials (DSP0266 "Authentication requirements").
PUBLIC = {
    "/redfish",
    "/redfish/",
    f"{R}",
    f"{R}/",
    f"{R}/odata",
    f"{R}/$metadata",
    oem.SCHEMA_URI,
    SESSIONS,
    f"{SESSIONS}/Members",
}
#: Query parameters we implement; any other `$...` is answered 501 (DSP0266 "Query parameters").
SUPPORTED_QUERY = frozenset({"$expand"})
#: Deepest `$expand` served (mockup mode; the embedded default expands one level).
MAX_LEVELS = 3
_EXPAND = re.compile(r"([.*~])(?:\(\$levels=(\d+)\))?")
COMPOSE_ACTIONS = ("AddResourceBlock", "RemoveResourceBlock")
#: Config mode: a system's own block (type ComputerSystem) is `ResourceBlocks/system-<id>`.
OWN_BLOCK_PREFIX = "system-"
#: The `@odata.type` of the emulator's OEM extension of a ResourceBlock (`Oem.Cohdi`).
OEM_BLOCK_TYPE = oem.ODATA_TYPE

_STATE = {
    DeviceState.FREE: "Unused",
    DeviceState.ATTACHING: "Composing",
    DeviceState.ATTACHED: "Composed",
    DeviceState.DETACHING: "Unavailable",
    DeviceState.FAILED: "Failed",
}

ROLE_PRIVILEGES = {
    "Administrator": [
        "Login",
        "ConfigureManager",
        "ConfigureUsers",
        "ConfigureSelf",
        "ConfigureComponents",
    ],
    "Operator": ["Login", "ConfigureSelf", "ConfigureComponents"],
    "ReadOnly": ["Login", "ConfigureSelf"],
}


def _etag(*parts: object) -> str:
    return 'W/"' + hashlib.sha1(repr(parts).encode()).hexdigest()[:16] + '"'  # noqa: S324


def error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response(
        {
            "error": {
                "code": f"Base.1.8.{code}",
                "message": message,
                "@Message.ExtendedInfo": [
                    {
                        "@odata.type": "#Message.v1_1_1.Message",
                        "MessageId": f"Base.1.8.{code}",
                        "Message": message,
                        "Severity": "Critical" if status >= 500 else "Warning",
                        "MessageSeverity": "Critical" if status >= 500 else "Warning",
                        "Resolution": "Correct the request and resubmit.",
                    }
                ],
            }
        },
        status=status,
        headers=headers,
    )


class RedfishApi:
    def __init__(self, state: EmulatorState, creds: Credentials) -> None:
        self.state = state
        self.creds = creds
        #: The DMTF mockup served as the initial state, if any (see `mockup.py`).
        self.mockup: Mockup | None = state.config.mockup
        #: Whether `$expand` is supported (else 501 and no `ExpandQuery` in the service root).
        self.expand = state.config.expand

    # --- wiring ----------------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        app.middlewares.append(self._middleware)
        r = app.router
        r.add_get("/redfish", self.version_doc)
        r.add_get("/redfish/", self.version_doc)
        r.add_route("*", "/redfish/v1", self.service_root)
        r.add_route("*", "/redfish/v1/", self.service_root)
        r.add_route("*", f"{R}/odata", self.odata)
        r.add_route("*", f"{R}/$metadata", self.metadata)
        r.add_route("*", oem.SCHEMA_URI, self.oem_schema)
        self._common_routes(r)
        if self.mockup is not None:
            r.add_route("*", SYSTEMS + "/{id}", self.system)
            self._action_routes(r)
            r.add_route("*", BLOCKS, self.blocks)
            r.add_route("*", BLOCKS + "/{id}", self.block)
            r.add_route("*", "/redfish/{tail:.*}", self.static)
            return
        r.add_route("*", SYSTEMS, self.systems)
        r.add_route("*", SYSTEMS + "/{id}", self.system)
        self._action_routes(r)
        r.add_route("*", f"{R}/CompositionService", self.composition_service)
        r.add_route("*", BLOCKS, self.blocks)
        r.add_route("*", BLOCKS + "/{id}", self.block)
        r.add_route("*", BLOCKS + "/{id}/Processors", self.processors)
        r.add_route("*", BLOCKS + "/{id}/Processors/GPU", self.processor)
        r.add_route("*", ZONES, self.zones)
        r.add_route("*", ZONES + "/{id}", self.zone)
        r.add_route("*", f"{R}/TaskService", self.task_service)
        r.add_route("*", TASKS, self.tasks)
        r.add_route("*", "/redfish/{tail:.*}", self.not_found)

    def _action_routes(self, r: web.UrlDispatcher) -> None:
        r.add_route("*", SYSTEMS + "/{id}/Actions/ComputerSystem.AddResourceBlock", self.add_block)
        r.add_route(
            "*", SYSTEMS + "/{id}/Actions/ComputerSystem.RemoveResourceBlock", self.remove_block
        )

    def _common_routes(self, r: web.UrlDispatcher) -> None:
        """Sessions, accounts and task monitors: live in both modes (a mockup's accounts and
        sessions are replaced by the emulator's own users)."""
        r.add_route("*", f"{R}/SessionService", self.session_service)
        r.add_route("*", SESSIONS, self.sessions)
        r.add_route("*", SESSIONS + "/Members", self.sessions)
        r.add_route("*", SESSIONS + "/{id}", self.session)
        r.add_route("*", f"{R}/AccountService", self.account_service)
        r.add_route("*", ACCOUNTS, self.accounts)
        r.add_route("*", ACCOUNTS + "/{id}", self.account)
        r.add_route("*", ROLES, self.roles)
        r.add_route("*", ROLES + "/{id}", self.role)
        r.add_route("*", TASKS + "/{id}", self.task)
        r.add_route("*", MONITORS + "/{id}", self.monitor)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/redfish"):
            return await handler(request)
        path = request.path.rstrip("/") or request.path
        public = path in PUBLIC or request.path in PUBLIC
        if path in (SESSIONS, f"{SESSIONS}/Members") and request.method != "POST":
            public = False
        user = self._user(request)
        request[USER] = user or ""
        if not public and user is None:
            return error(
                401,
                "NoValidSession",
                "authentication required: log in at SessionService/Sessions and send X-Auth-Token",
                headers={"WWW-Authenticate": 'Basic realm="cohdi-fabric-emulator"'},
            )
        if request.headers.get("OData-Version", "4.0") != "4.0":
            return error(
                412,
                "PreconditionFailed",
                f"OData-Version {request.headers['OData-Version']} is not supported; use 4.0",
            )
        supported = SUPPORTED_QUERY if self.expand else SUPPORTED_QUERY - {"$expand"}
        if "$expand" in request.query and self.state.faults.expand_unsupported:
            supported = supported - {"$expand"}
        unknown = sorted(q for q in request.query if q.startswith("$") and q not in supported)
        if unknown:
            return error(
                501, "QueryNotSupported", f"query parameter(s) {', '.join(unknown)} not supported"
            )
        accept = request.headers.get("Accept", "*/*")
        known = request.match_info.handler != self.not_found
        if known and not path.endswith(("$metadata", ".xml")) and not _accepts_json(accept):
            return error(
                406, "NotAcceptable", f"only application/json is served here, not {accept}"
            )
        try:
            resp = await handler(request)
        except EmulatorError as exc:
            code = {404: "ResourceNotFound", 409: "ResourceInUse"}.get(
                exc.status, "PropertyValueError"
            )
            resp = error(exc.status, code, str(exc))
        except web.HTTPException as exc:
            if exc.status == 405:
                resp = error(
                    405,
                    "OperationNotAllowed",
                    f"{request.method} is not allowed here",
                    headers={"Allow": exc.headers.get("Allow", "GET, HEAD")},
                )
            else:
                raise
        resp.headers["OData-Version"] = "4.0"
        if request.method in ("GET", "HEAD") and resp.status in (200, 304):
            described = _schema_of(getattr(resp, "schema", None))
            if described:
                resp.headers["Link"] = f"<{described}>; rel=describedby"
        resp.headers.setdefault("Cache-Control", "no-cache")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        return resp

    def _user(self, request: web.Request) -> str | None:
        token = request.headers.get("X-Auth-Token")
        if token is not None:
            session = self.creds.session_for(token)
            return session.user if session else None
        auth = request.headers.get("Authorization", "")
        return self.creds.basic_user(auth) if auth.startswith("Basic ") else None

    def _require(self, request: web.Request, privilege: str) -> web.Response | None:
        """403 unless the caller's role grants `privilege` (Redfish privilege registry names)."""
        role = self.creds.role_of(request.get(USER, ""))
        if privilege in ROLE_PRIVILEGES.get(role, []):
            return None
        return error(
            403,
            "InsufficientPrivilege",
            f"role {role or 'none'} lacks the {privilege} privilege "
            f"for {request.method} {request.path}",
        )

    # --- generic resource handling ---------------------------------------------------------------

    def _resource(
        self,
        request: web.Request,
        doc: dict[str, Any],
        *,
        allow: str = "GET, HEAD",
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        etag = doc.get("@odata.etag") or _etag(doc)
        if "Members" not in doc:
            doc["@odata.etag"] = etag
        base = {"ETag": etag, "Allow": allow, **(headers or {})}
        if request.method in ("GET", "HEAD") and request.headers.get("If-None-Match") == etag:
            resp = web.Response(status=304, headers=base)
        elif request.method == "HEAD":
            resp = web.Response(status=200, headers={**base, "Content-Type": "application/json"})
        else:
            resp = json_response(doc, status=status, headers=base)
        resp.schema = doc.get("@odata.type")  # type: ignore[attr-defined]
        return resp

    def _only(self, request: web.Request, allowed: str) -> None:
        if request.method not in allowed.replace(" ", "").split(","):
            raise web.HTTPMethodNotAllowed(
                request.method, allowed.replace(" ", "").split(","), headers={"Allow": allowed}
            )

    def _collection(
        self,
        request: web.Request,
        odata_id: str,
        typ: str,
        name: str,
        members: list[str],
        *,
        allow: str = "GET, HEAD",
    ) -> web.Response:
        self._only(request, allow)
        doc = {
            "@odata.id": odata_id,
            "@odata.type": f"#{typ}.{typ}",
            "Name": name,
            "Members": [{"@odata.id": m} for m in members],
            "Members@odata.count": len(members),
        }
        return self._expanded(request, doc, allow=allow)

    async def not_found(self, request: web.Request) -> web.Response:
        return error(404, "ResourceMissingAtURI", f"no resource at {request.path}")

    # --- service documents -----------------------------------------------------------------------

    async def version_doc(self, request: web.Request) -> web.Response:
        return json_response({"v1": "/redfish/v1/"})

    def _features(self, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """`ProtocolFeaturesSupported` as implemented here: `$expand` (`.`, `*`, `~`, with
        `$levels`) unless switched off; no `$select`, `$filter`, `only` or `excerpt`."""
        features: dict[str, Any] = dict(base or {})
        features.update(
            SelectQuery=False, FilterQuery=False, OnlyMemberQuery=False, ExcerptQuery=False
        )
        features.pop("ExpandQuery", None)
        if self.expand:
            features["ExpandQuery"] = {
                "ExpandAll": self.mockup is not None,
                "Levels": True,
                "MaxLevels": MAX_LEVELS if self.mockup is not None else 2,
                "Links": self.mockup is not None,
                "NoLinks": True,
            }
        return features

    async def service_root(self, request: web.Request) -> web.Response:
        self._only(request, "GET, HEAD")
        if self.mockup is not None:
            doc = copy.deepcopy(self.mockup.get(R) or {})
            doc["ProtocolFeaturesSupported"] = self._features(doc.get("ProtocolFeaturesSupported"))
            return self._resource(request, doc)
        doc = {
            "@odata.id": f"{R}/",
            "@odata.type": "#ServiceRoot.v1_17_0.ServiceRoot",
            "Id": "RootService",
            "Name": "cohdi-agent fabric emulator",
            "RedfishVersion": "1.19.0",
            "UUID": SERVICE_UUID,
            "Vendor": "cohdi-agent",
            "Product": "cohdi-agent fabric emulator",
            "ProtocolFeaturesSupported": self._features(),
            "Systems": {"@odata.id": SYSTEMS},
            "CompositionService": {"@odata.id": f"{R}/CompositionService"},
            "SessionService": {"@odata.id": f"{R}/SessionService"},
            "AccountService": {"@odata.id": f"{R}/AccountService"},
            # ServiceRoot's property is `Tasks`; its URI segment is `TaskService`.
            "Tasks": {"@odata.id": f"{R}/TaskService"},
            "Links": {"Sessions": {"@odata.id": SESSIONS}},
        }
        return self._resource(request, doc)

    async def odata(self, request: web.Request) -> web.Response:
        self._only(request, "GET, HEAD")
        if self.mockup is not None and (doc := self.mockup.get(f"{R}/odata")) is not None:
            return json_response(doc)
        names = ["Systems", "CompositionService", "SessionService", "AccountService"]
        return json_response(
            {
                "@odata.context": f"{R}/$metadata",
                "value": [{"name": n, "kind": "Singleton", "url": f"{R}/{n}"} for n in names]
                + [
                    {"name": "Tasks", "kind": "Singleton", "url": f"{R}/TaskService"},
                    {"name": "Sessions", "kind": "Singleton", "url": SESSIONS},
                ],
            }
        )

    async def metadata(self, request: web.Request) -> web.Response:
        self._only(request, "GET, HEAD")
        if self.mockup is not None and self.mockup.metadata:
            return web.Response(
                text=self.mockup.metadata, content_type="application/xml", charset="utf-8"
            )
        namespaces = [
            ("ServiceRoot", "v1_17_0"),
            ("ComputerSystem", "v1_22_0"),
            ("ComputerSystemCollection", None),
            ("CompositionService", "v1_2_2"),
            ("ResourceBlock", "v1_4_2"),
            ("ResourceBlockCollection", None),
            ("Zone", "v1_6_1"),
            ("ZoneCollection", None),
            ("Processor", "v1_20_0"),
            ("ProcessorCollection", None),
            ("SessionService", "v1_1_9"),
            ("Session", "v1_7_1"),
            ("SessionCollection", None),
            ("AccountService", "v1_15_0"),
            ("ManagerAccount", "v1_12_0"),
            ("ManagerAccountCollection", None),
            ("Role", "v1_3_2"),
            ("RoleCollection", None),
            ("TaskService", "v1_2_1"),
            ("Task", "v1_7_4"),
            ("TaskCollection", None),
            ("Message", "v1_1_1"),
        ]
        refs = []
        for name, version in namespaces:
            inc = f'    <edmx:Include Namespace="{name}"/>\n'
            if version:
                inc += f'    <edmx:Include Namespace="{name}.{version}"/>\n'
            refs.append(
                f'  <edmx:Reference Uri="http://redfish.dmtf.org/schemas/v1/{name}_v1.xml">\n'
                f"{inc}  </edmx:Reference>\n"
            )
        refs.append(
            f'  <edmx:Reference Uri="{oem.SCHEMA_URI}">\n'
            f'    <edmx:Include Namespace="{oem.NAMESPACE}"/>\n'
            f'    <edmx:Include Namespace="{oem.NAMESPACE}.{oem.VERSION}"/>\n'
            "  </edmx:Reference>\n"
        )
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<edmx:Edmx xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx" Version="4.0">\n'
            + "".join(refs)
            + "  <edmx:DataServices>\n"
            '    <Schema xmlns="http://docs.oasis-open.org/odata/ns/edm" Namespace="Service">\n'
            '      <EntityContainer Name="Service" '
            'Extends="ServiceRoot.v1_17_0.ServiceContainer"/>\n'
            "    </Schema>\n  </edmx:DataServices>\n</edmx:Edmx>\n"
        )
        return web.Response(text=body, content_type="application/xml", charset="utf-8")

    async def oem_schema(self, request: web.Request) -> web.Response:
        """The CSDL of `Oem.Cohdi` (see `oem.py`)."""
        self._only(request, "GET, HEAD")
        return web.Response(text=oem.CSDL, content_type="application/xml", charset="utf-8")

    # --- sessions and accounts -------------------------------------------------------------------

    async def session_service(self, request: web.Request) -> web.Response:
        self._only(request, "GET, HEAD")
        return self._resource(
            request,
            {
                "@odata.id": f"{R}/SessionService",
                "@odata.type": "#SessionService.v1_1_9.SessionService",
                "Id": "SessionService",
                "Name": "Session Service",
                "ServiceEnabled": True,
                "SessionTimeout": int(self.creds.session_timeout),
                "Sessions": {"@odata.id": SESSIONS},
            },
        )

    async def sessions(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                body = await request.json()
                user, password = str(body["UserName"]), str(body["Password"])
            except (ValueError, KeyError, TypeError):
                return error(400, "PropertyMissing", "POST a JSON body with UserName and Password")
            if not self.creds.check_password(user, password):
                return error(401, "InsufficientPrivilege", "wrong user name or password")
            s = self.creds.new_session(user)
            doc = self._session_doc(s.id, s.user)
            return json_response(
                doc, status=201, headers={"X-Auth-Token": s.token, "Location": doc["@odata.id"]}
            )
        ids = sorted(self.creds.sessions, key=int)
        return self._collection(
            request,
            SESSIONS,
            "SessionCollection",
            "Sessions",
            [f"{SESSIONS}/{i}" for i in ids],
            allow="GET, HEAD, POST",
        )

    def _session_doc(self, sid: str, user: str) -> dict[str, Any]:
        return {
            "@odata.id": f"{SESSIONS}/{sid}",
            "@odata.type": "#Session.v1_7_1.Session",
            "Id": sid,
            "Name": f"Session {sid}",
            "UserName": user,
        }

    async def session(self, request: web.Request) -> web.Response:
        s = self.creds.sessions.get(request.match_info["id"])
        if s is None:
            return error(404, "ResourceMissingAtURI", f"no session {request.match_info['id']}")
        self._only(request, "GET, HEAD, DELETE")
        if request.method == "DELETE":
            del self.creds.sessions[s.id]
            return web.Response(status=204)
        return self._resource(request, self._session_doc(s.id, s.user), allow="GET, HEAD, DELETE")

    async def account_service(self, request: web.Request) -> web.Response:
        self._only(request, "GET, HEAD")
        return self._resource(
            request,
            {
                "@odata.id": f"{R}/AccountService",
                "@odata.type": "#AccountService.v1_15_0.AccountService",
                "Id": "AccountService",
                "Name": "Account Service",
                "ServiceEnabled": True,
                "MinPasswordLength": 8,
                "MaxPasswordLength": 64,
                "AccountLockoutThreshold": 0,
                "Accounts": {"@odata.id": ACCOUNTS},
                "Roles": {"@odata.id": ROLES},
            },
        )

    async def accounts(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            if (denied := self._require(request, "ConfigureUsers")) is not None:
                return denied
            body = await _json_body(request)
            if (
                body is None
                or not isinstance(body.get("UserName"), str)
                or not isinstance(body.get("Password"), str)
            ):
                return error(400, "PropertyMissing", "POST UserName and Password (and RoleId)")
            user, password = body["UserName"], body["Password"]
            role = body.get("RoleId", "ReadOnly")
            if unknown := set(body) - {"UserName", "Password", "RoleId", "Enabled"}:
                return error(400, "PropertyUnknown", f"unknown properties {sorted(unknown)}")
            if user in self.creds.accounts:
                return error(409, "ResourceAlreadyExists", f"account {user} exists")
            if role not in ROLE_PRIVILEGES:
                return error(
                    400,
                    "PropertyValueNotInList",
                    f"RoleId {role!r} is not one of {list(ROLE_PRIVILEGES)}",
                )
            if not 8 <= len(password) <= 64:
                return error(400, "PropertyValueFormatError", "Password must be 8 to 64 characters")
            self.creds.accounts[user] = Account(password, role, bool(body.get("Enabled", True)))
            doc = self._account_doc(user)
            return json_response(doc, status=201, headers={"Location": doc["@odata.id"]})
        return self._collection(
            request,
            ACCOUNTS,
            "ManagerAccountCollection",
            "Accounts",
            [f"{ACCOUNTS}/{u}" for u in sorted(self.creds.accounts)],
            allow="GET, HEAD, POST",
        )

    def _account_doc(self, user: str) -> dict[str, Any]:
        acct = self.creds.accounts[user]
        return {
            "@odata.id": f"{ACCOUNTS}/{user}",
            "@odata.type": "#ManagerAccount.v1_12_0.ManagerAccount",
            "@odata.etag": f'W/"acct-{user}-{acct.revision}"',
            "Id": user,
            "Name": f"Account {user}",
            "UserName": user,
            "RoleId": acct.role,
            "AccountTypes": ["Redfish"],
            "Enabled": acct.enabled,
            "Locked": False,
            "Password": None,
            "Links": {"Role": {"@odata.id": f"{ROLES}/{acct.role}"}},
        }

    async def account(self, request: web.Request) -> web.Response:
        user = request.match_info["id"]
        if user not in self.creds.accounts:
            return error(404, "ResourceMissingAtURI", f"no account {user}")
        allow = "GET, HEAD, PATCH, DELETE"
        self._only(request, allow)
        own = request.get(USER) == user
        if request.method in ("GET", "HEAD"):
            if not own and (denied := self._require(request, "ConfigureUsers")) is not None:
                return denied
            return self._resource(request, self._account_doc(user), allow=allow)
        if request.method == "DELETE":
            if (denied := self._require(request, "ConfigureUsers")) is not None:
                return denied
            del self.creds.accounts[user]
            for sid in [s.id for s in self.creds.sessions.values() if s.user == user]:
                del self.creds.sessions[sid]
            return web.Response(status=204)
        body = await _json_body(request)
        if body is None:
            return error(400, "MalformedJSON", "the PATCH body is not a JSON object")
        only_password = set(body) <= {"Password"}
        privilege = "ConfigureSelf" if own and only_password else "ConfigureUsers"
        if (denied := self._require(request, privilege)) is not None:
            return denied
        if (
            stale := self._precondition(request, self._account_doc(user)["@odata.etag"])
        ) is not None:
            return stale
        writable = {"Password", "RoleId", "Enabled", "UserName"}
        bad = sorted(k for k in body if k not in writable and not k.startswith("@odata."))
        if bad and not set(body) & writable:
            return error(400, "PropertyNotWritable", f"properties {bad} cannot be patched")
        acct = self.creds.accounts[user]
        if "Password" in body:
            if not isinstance(body["Password"], str) or not 8 <= len(body["Password"]) <= 64:
                return error(400, "PropertyValueFormatError", "Password must be 8 to 64 characters")
            acct.password = body["Password"]
        if "RoleId" in body:
            if body["RoleId"] not in ROLE_PRIVILEGES:
                return error(400, "PropertyValueNotInList", f"RoleId {body['RoleId']!r} is unknown")
            acct.role = body["RoleId"]
        if "Enabled" in body:
            acct.enabled = bool(body["Enabled"])
        acct.revision += 1
        doc = self._account_doc(user)
        if bad:  # some properties applied, some not: 200 with the resource and the messages
            doc["@Message.ExtendedInfo"] = [
                {
                    "MessageId": "Base.1.8.PropertyNotWritable",
                    "Message": f"{k} is not writable",
                    "Severity": "Warning",
                    "MessageSeverity": "Warning",
                    "Resolution": "Remove it.",
                }
                for k in bad
            ]
        return self._resource(request, doc, allow=allow)

    async def roles(self, request: web.Request) -> web.Response:
        return self._collection(
            request, ROLES, "RoleCollection", "Roles", [f"{ROLES}/{r}" for r in ROLE_PRIVILEGES]
        )

    async def role(self, request: web.Request) -> web.Response:
        role = request.match_info["id"]
        if role not in ROLE_PRIVILEGES:
            return error(404, "ResourceMissingAtURI", f"no role {role}")
        self._only(request, "GET, HEAD")
        return self._resource(
            request,
            {
                "@odata.id": f"{ROLES}/{role}",
                "@odata.type": "#Role.v1_3_2.Role",
                "Id": role,
                "Name": role,
                "RoleId": role,
                "IsPredefined": True,
                "AssignedPrivileges": ROLE_PRIVILEGES[role],
            },
        )

    # --- systems ---------------------------------------------------------------------------------

    async def systems(self, request: web.Request) -> web.Response:
        return self._collection(
            request,
            SYSTEMS,
            "ComputerSystemCollection",
            "Computer Systems",
            [f"{SYSTEMS}/{m}" for m in self.state.machines],
        )

    def _managed(self, uri: str) -> bool:
        """Whether a block URI is one the live state composes (not a system's own block, not a
        mockup's shared block)."""
        path = normalise(uri)
        return path.startswith(BLOCKS + "/") and segment(path) in self.state.devices

    def _system_doc(self, machine_id: str) -> dict[str, Any]:
        """The ComputerSystem: in mockup mode the mockup's document, else ours; its
        `Links.ResourceBlocks` are its own blocks (static) followed by the blocks the live state
        has on it, and its composition actions point at this service."""
        m = self.state.machine(machine_id)
        uri = f"{SYSTEMS}/{m.id}"
        blocks = sorted(self.state.attached_to(machine_id), key=lambda d: d.spec.id)
        if self.mockup is not None:
            doc = copy.deepcopy(self.mockup.get(uri) or {})
            # What the mockup lists, minus the blocks the live state composes (elements that are
            # not links are kept as recorded: a client must cope with them).
            own: list[Any] = [
                ref
                for ref in (doc.get("Links") or {}).get("ResourceBlocks") or []
                if not (isinstance(ref, dict) and self._managed(str(ref.get("@odata.id", ""))))
            ]
            actions = doc.get("Actions") or {}
        else:
            doc = {
                "@odata.id": uri,
                "@odata.type": "#ComputerSystem.v1_22_0.ComputerSystem",
                "Id": m.id,
                "Name": m.name,
                "HostName": m.name,
                "SystemType": "Physical",
                "Composition": {"UseCases": ["ExpandableSystem"]},
                "Status": {"State": "Enabled", "Health": "OK"},
            }
            own = [{"@odata.id": _own_block(m.id)}]
            actions = {f"#ComputerSystem.{name}": {} for name in COMPOSE_ACTIONS}
        links = own + [{"@odata.id": f"{BLOCKS}/{d.spec.id}"} for d in blocks]
        doc.setdefault("Links", {})
        doc["Links"]["ResourceBlocks"] = links
        doc["Links"]["ResourceBlocks@odata.count"] = len(links)
        # The composition actions the system has (a mockup's may lack them: then only the
        # Links PATCH composes), with targets at this service.
        for name in COMPOSE_ACTIONS:
            if f"#ComputerSystem.{name}" in actions:
                doc.setdefault("Actions", {})[f"#ComputerSystem.{name}"] = {
                    **actions[f"#ComputerSystem.{name}"],
                    "target": f"{uri}/Actions/ComputerSystem.{name}",
                }
        doc["@odata.etag"] = _etag(m.id, own, [(d.spec.id, d.revision) for d in blocks])
        return doc

    async def system(self, request: web.Request) -> web.Response:
        machine_id = request.match_info["id"]
        if self.mockup is not None and machine_id not in self.state.machines:
            return await self.static(request)  # e.g. Systems/Capabilities
        doc = self._system_doc(machine_id)
        self._only(request, "GET, HEAD, PATCH")
        if request.method != "PATCH":
            return self._expanded(request, doc, allow="GET, HEAD, PATCH")
        if (denied := self._require(request, "ConfigureComponents")) is not None:
            return denied
        if (stale := self._precondition(request, doc["@odata.etag"])) is not None:
            return stale
        body = await _json_body(request)
        if (
            body is None
            or set(body) - {"Links", "@odata.etag"}
            or not isinstance(body.get("Links", {}).get("ResourceBlocks"), list)
        ):
            return error(
                400,
                "PropertyUnknown",
                "only Links.ResourceBlocks can be patched here (a list, Redfish array rules)",
            )
        current = [
            str(link.get("@odata.id")) if isinstance(link, dict) else str(link)
            for link in doc["Links"]["ResourceBlocks"]
        ]
        wanted = _apply_array_patch(current, body["Links"]["ResourceBlocks"])
        if wanted is None:
            return error(
                400,
                "PropertyValueFormatError",
                'each element must be {}, null or {"@odata.id": <ResourceBlock>}',
            )
        adds = [b for b in wanted if b not in current]
        removes = [b for b in current if b not in wanted]
        if fixed := [b for b in adds + removes if not self._managed(b)]:
            return self._not_composable(fixed[0])
        if self._no_effect():
            return web.Response(status=204)
        tasks: list[Task] = []
        for uri in removes:
            if (t := self.state.detach(segment(uri), machine_id)) is not None:
                tasks.append(t)
        for uri in adds:
            if (t := self.state.attach(segment(uri), machine_id)) is not None:
                tasks.append(t)
        return await self._maybe_async(request, tasks, lambda: self._system_doc(machine_id))

    def _not_composable(self, uri: str) -> web.Response:
        own = uri.startswith(_own_block(""))
        if own or (self.mockup is not None and self.mockup.get(uri) is not None):
            return error(
                409,
                "ResourceInUse",
                f"{uri} is a system's own block or shared by several systems: this service "
                "does not compose it",
            )
        return error(404, "ResourceMissingAtURI", f"no resource block at {uri}")

    def _no_effect(self) -> bool:
        """The `no_effect_next` fault: acknowledge a composition and do nothing."""
        if self.state.faults.no_effect_next > 0:
            self.state.faults.no_effect_next -= 1
            return True
        return False

    async def add_block(self, request: web.Request) -> web.Response:
        return await self._block_action(request, attach=True)

    async def remove_block(self, request: web.Request) -> web.Response:
        return await self._block_action(request, attach=False)

    async def _block_action(self, request: web.Request, *, attach: bool) -> web.Response:
        machine_id = request.match_info["id"]
        system = self._system_doc(machine_id)
        self._only(request, "POST")
        if (denied := self._require(request, "ConfigureComponents")) is not None:
            return denied
        body = await _json_body(request)
        try:
            uri = str(body["ResourceBlock"]["@odata.id"]) if body else ""
        except (KeyError, TypeError):
            uri = ""
        if not uri.startswith(BLOCKS + "/"):
            return error(
                400,
                "ActionParameterMissing",
                f'ResourceBlock must be {{"@odata.id": "{BLOCKS}/<id>"}}',
            )
        if not self._managed(uri):
            return self._not_composable(uri)
        dev = self.state.device(segment(uri))
        sys_etag = body.get("ComputerSystemETag") if body else None
        blk_etag = body.get("ResourceBlockETag") if body else None
        if (sys_etag and sys_etag != system["@odata.etag"]) or (
            blk_etag and blk_etag != self._block_doc(dev)["@odata.etag"]
        ):
            return error(412, "PreconditionFailed", "the ETag given does not match the resource")
        if self._no_effect():
            return web.Response(status=204)
        task = (
            self.state.attach(dev.spec.id, machine_id)
            if attach
            else self.state.detach(dev.spec.id, machine_id)
        )
        return await self._maybe_async(request, [task] if task else [], None)

    async def _maybe_async(
        self, request: web.Request, tasks: list[Task], result: Any
    ) -> web.Response:
        """Answer synchronously when the composition settles within SYNC_WINDOW; else 202 with a
        task monitor (what real services do: quick operations complete in the request)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SYNC_WINDOW):
                for t in tasks:
                    await asyncio.shield(t.done.wait())
        failed = [t for t in tasks if t.state == "Exception"]
        if failed:
            return error(500, "GeneralError", failed[0].message)
        tasks = [t for t in tasks if t.state == "Running"]
        if not tasks:
            if result is None:
                return web.Response(status=204)
            return self._resource(request, result(), allow="GET, HEAD, PATCH")
        task = tasks[-1]
        return json_response(
            self._task_doc(task),
            status=202,
            headers={"Location": f"{MONITORS}/{task.id}", "Retry-After": "1"},
        )

    def _precondition(self, request: web.Request, etag: str) -> web.Response | None:
        if_match = request.headers.get("If-Match")
        if if_match is not None and if_match not in ("*", etag):
            return error(
                412,
                "PreconditionFailed",
                f"If-Match {if_match} does not match the current ETag {etag}; re-read and retry",
            )
        return None

    # --- composition -----------------------------------------------------------------------------

    async def composition_service(self, request: web.Request) -> web.Response:
        self._only(request, "GET, HEAD")
        return self._resource(
            request,
            {
                "@odata.id": f"{R}/CompositionService",
                "@odata.type": "#CompositionService.v1_2_2.CompositionService",
                "Id": "CompositionService",
                "Name": "Composition Service",
                "ServiceEnabled": True,
                "AllowOverprovisioning": False,
                "AllowZoneAffinity": True,
                "Status": {"State": "Enabled", "Health": "OK"},
                "ResourceBlocks": {"@odata.id": BLOCKS},
                "ResourceZones": {"@odata.id": ZONES},
            },
        )

    def _block_uris(self) -> list[str]:
        if self.mockup is not None:
            return self.mockup.members(BLOCKS)
        return [_own_block(m) for m in self.state.machines] + [
            f"{BLOCKS}/{d}" for d in self.state.devices
        ]

    async def blocks(self, request: web.Request) -> web.Response:
        self._only(request, "GET, HEAD")
        base: dict[str, Any] = {}
        if self.mockup is not None:
            base = copy.deepcopy(self.mockup.get(BLOCKS) or {})
        uris = self._block_uris()
        doc: dict[str, Any] = {
            **base,
            "@odata.id": BLOCKS,
            "@odata.type": "#ResourceBlockCollection.ResourceBlockCollection",
            "Name": base.get("Name", "Resource Blocks"),
            "Members": [{"@odata.id": u} for u in uris],
            "Members@odata.count": len(uris),
        }
        # The collection's ETag changes exactly when a block changes: clients poll the expanded
        # collection with If-None-Match and get 304 while nothing happened.
        doc["@odata.etag"] = f'W/"seq-{self.state.seq}"'
        return self._expanded(request, doc)

    def _block_doc(self, dev: Device) -> dict[str, Any]:
        """A composable block as served now: the mockup's document (or ours) with the live
        `CompositionStatus`, `Links.ComputerSystems` and health."""
        s = dev.spec
        uri = f"{BLOCKS}/{s.id}"
        if self.mockup is not None:
            doc = copy.deepcopy(self.mockup.get(uri) or {})
        else:
            doc = {
                "@odata.id": uri,
                "@odata.type": "#ResourceBlock.v1_4_2.ResourceBlock",
                "Id": s.id,
                "Name": f"{s.model} {s.id}",
                "ResourceBlockType": list(s.block_types),
                "CompositionStatus": {"Reserved": False, "SharingCapable": False},
                "Processors": [{"@odata.id": f"{uri}/Processors/GPU"}],
                "Links": {"Zones": [{"@odata.id": f"{ZONES}/{s.fabric}"}]},
                "Oem": {
                    "Cohdi": {
                        "@odata.type": OEM_BLOCK_TYPE,
                        # Not in the standard: it leaves a fabric-attached function's address
                        # out (PCIeFunction), and the node needs it to find the arrived GPU.
                        "PciAddress": dev.pci_address or None,
                    }
                },
            }
        status = doc.setdefault("CompositionStatus", {})
        attached = dev.machine is not None and dev.state != DeviceState.FREE
        state = _STATE[dev.state]
        if dev.state == DeviceState.ATTACHED and status.get("SharingEnabled"):
            state = "ComposedAndAvailable"
        status["CompositionState"] = state
        status["MaxCompositions"] = status.get("MaxCompositions", 1)
        status["NumberOfCompositions"] = 1 if attached else 0
        doc.setdefault("Links", {})["ComputerSystems"] = (
            [{"@odata.id": f"{SYSTEMS}/{dev.machine}"}] if attached else []
        )
        health = doc.setdefault("Status", {"State": "Enabled"})
        health["Health"] = "Critical" if dev.state == DeviceState.FAILED else dev.health
        health["HealthRollup"] = health["Health"]
        if dev.state == DeviceState.FAILED:
            health["Conditions"] = [
                {
                    "MessageId": "Base.1.8.GeneralError",
                    "Message": dev.reason or "the block has failed",
                    "Severity": "Critical",
                }
            ]
        elif dev.health != "OK":
            health["Conditions"] = [_health_condition(dev)]
        else:
            health.pop("Conditions", None)
        doc["@odata.etag"] = f'W/"{s.id}-{dev.revision}"'
        return doc

    def _own_block_doc(self, machine_id: str) -> dict[str, Any]:
        """The block a system is registered as (DSP2050 expandable system): type
        `ComputerSystem`, in the zone of the system's fabric. It is how a client learns the
        system's zone (a ComputerSystem has no `Links.Zones`)."""
        m = self.state.machine(machine_id)
        system = {"@odata.id": f"{SYSTEMS}/{m.id}"}
        return {
            "@odata.id": _own_block(m.id),
            "@odata.type": "#ResourceBlock.v1_4_2.ResourceBlock",
            "Id": segment(_own_block(m.id)),
            "Name": f"System {m.name}",
            "ResourceBlockType": ["ComputerSystem"],
            "Status": {"State": "Enabled", "Health": "OK"},
            "CompositionStatus": {
                "CompositionState": "Composed",
                "Reserved": False,
                "SharingCapable": False,
                "MaxCompositions": 1,
                "NumberOfCompositions": 1,
            },
            "ComputerSystems": [system],
            "Links": {"ComputerSystems": [system], "Zones": [{"@odata.id": f"{ZONES}/{m.fabric}"}]},
        }

    def _lookup(self, uri: str) -> dict[str, Any] | None:
        """The document at `uri` as served now (for `$expand`), or None."""
        path = normalise(uri)
        if self._managed(path):
            return self._block_doc(self.state.devices[segment(path)])
        if path == f"{SYSTEMS}/{segment(path)}" and segment(path) in self.state.machines:
            return self._system_doc(segment(path))
        if self.mockup is not None:
            doc = self.mockup.get(path)
            return copy.deepcopy(doc) if doc is not None else None
        machine = segment(path).removeprefix(OWN_BLOCK_PREFIX)
        if path == _own_block(machine) and machine in self.state.machines:
            return self._own_block_doc(machine)
        if path == f"{ZONES}/{segment(path)}" and segment(path) in self.state.config.fabrics:
            return self._zone_doc(segment(path))
        device = path.removeprefix(BLOCKS + "/").removesuffix("/Processors/GPU")
        if path == f"{BLOCKS}/{device}/Processors/GPU" and device in self.state.devices:
            return self._processor_doc(self.state.devices[device])
        return None

    async def block(self, request: web.Request) -> web.Response:
        doc = self._lookup(request.path)
        if doc is None:
            return error(404, "ResourceMissingAtURI", f"no resource block at {request.path}")
        self._only(request, "GET, HEAD")
        return self._expanded(request, doc)

    async def static(self, request: web.Request) -> web.Response:
        """Mockup mode: any other document of the mockup, as recorded (read-only)."""
        doc = self._lookup(request.path)
        if doc is None:
            return await self.not_found(request)
        self._only(request, "GET, HEAD")
        return self._expanded(request, doc)

    def _expanded(
        self, request: web.Request, doc: dict[str, Any], *, allow: str = "GET, HEAD"
    ) -> web.Response:
        """`doc` answered with `$expand` applied: `.` (links outside `Links`), `~` (links in
        `Links`) or `*` (both), `($levels=n)` deep (1 if not given, at most MAX_LEVELS)."""
        raw = request.query.get("$expand")
        if raw is not None:
            match = _EXPAND.fullmatch(raw)
            if match is None:
                return error(
                    400,
                    "QueryParameterValueFormatError",
                    f"$expand={raw!r}: use ., ~ or * with an optional ($levels=n)",
                )
            levels = int(match.group(2) or 1)
            if not 1 <= levels <= MAX_LEVELS:
                return error(
                    400,
                    "QueryParameterOutOfRange",
                    f"$expand levels {levels}: 1 to {MAX_LEVELS} are supported",
                )
            etag = doc.get("@odata.etag")
            doc = self._expand(doc, match.group(1), levels)
            if etag:
                doc["@odata.etag"] = etag
        return self._resource(request, doc, allow=allow)

    def _expand(self, doc: dict[str, Any], kind: str, levels: int) -> dict[str, Any]:
        def walk(value: Any, in_links: bool) -> Any:
            if isinstance(value, dict):
                ref = value.get("@odata.id")
                if set(value) == {"@odata.id"} and isinstance(ref, str):
                    wanted = kind == "*" or (kind == ".") != in_links
                    target = self._lookup(ref) if wanted else None
                    return value if target is None else self._expand(target, kind, levels - 1)
                return {k: walk(v, in_links or k == "Links") for k, v in value.items()}
            if isinstance(value, list):
                return [walk(v, in_links) for v in value]
            return value

        if levels <= 0:
            return doc
        return {k: walk(v, k == "Links") for k, v in doc.items()}

    async def processors(self, request: web.Request) -> web.Response:
        dev = self.state.device(request.match_info["id"])
        uri = f"{BLOCKS}/{dev.spec.id}/Processors"
        return self._collection(request, uri, "ProcessorCollection", "Processors", [f"{uri}/GPU"])

    async def processor(self, request: web.Request) -> web.Response:
        dev = self.state.device(request.match_info["id"])
        self._only(request, "GET, HEAD")
        return self._resource(request, self._processor_doc(dev))

    def _processor_doc(self, dev: Device) -> dict[str, Any]:
        s = dev.spec
        return {
            "@odata.id": f"{BLOCKS}/{s.id}/Processors/GPU",
            "@odata.type": "#Processor.v1_20_0.Processor",
            "Id": "GPU",
            "Name": s.model,
            "ProcessorType": "GPU",
            "Manufacturer": s.vendor,
            "Model": s.model,
            "SerialNumber": s.serial,
            "UUID": s.serial.removeprefix("GPU-"),
            "ProcessorMemory": [{"CapacityMiB": s.memory // 2**20, "MemoryType": "HBM2"}],
            "Status": {"State": "Enabled", "Health": dev.health}
            | ({"Conditions": [_health_condition(dev)]} if dev.health != "OK" else {}),
        }

    async def zones(self, request: web.Request) -> web.Response:
        return self._collection(
            request,
            ZONES,
            "ZoneCollection",
            "Resource Zones",
            [f"{ZONES}/{f}" for f in self.state.config.fabrics],
        )

    async def zone(self, request: web.Request) -> web.Response:
        fabric = request.match_info["id"]
        if fabric not in self.state.config.fabrics:
            return error(404, "ResourceMissingAtURI", f"no zone {fabric}")
        self._only(request, "GET, HEAD")
        return self._resource(request, self._zone_doc(fabric))

    def _zone_doc(self, fabric: str) -> dict[str, Any]:
        """Config mode: the zone of a fabric, listing its systems' own blocks and its GPUs."""
        blocks = [_own_block(m.id) for m in self.state.machines.values() if m.fabric == fabric]
        blocks += [
            f"{BLOCKS}/{d.spec.id}" for d in self.state.devices.values() if d.spec.fabric == fabric
        ]
        return {
            "@odata.id": f"{ZONES}/{fabric}",
            "@odata.type": "#Zone.v1_6_1.Zone",
            "Id": fabric,
            "Name": f"Fabric {fabric}",
            "ZoneType": "ZoneOfResourceBlocks",
            "Status": {"State": "Enabled", "Health": "OK"},
            "Links": {"ResourceBlocks": [{"@odata.id": b} for b in blocks]},
        }

    # --- tasks -----------------------------------------------------------------------------------

    async def task_service(self, request: web.Request) -> web.Response:
        self._only(request, "GET, HEAD")
        return self._resource(
            request,
            {
                "@odata.id": f"{R}/TaskService",
                "@odata.type": "#TaskService.v1_2_1.TaskService",
                "Id": "TaskService",
                "Name": "Task Service",
                "ServiceEnabled": True,
                "Tasks": {"@odata.id": TASKS},
            },
        )

    async def tasks(self, request: web.Request) -> web.Response:
        return self._collection(
            request, TASKS, "TaskCollection", "Tasks", [f"{TASKS}/{t}" for t in self.state.tasks]
        )

    def _task_doc(self, task: Task) -> dict[str, Any]:
        return {
            "@odata.id": f"{TASKS}/{task.id}",
            "@odata.type": "#Task.v1_7_4.Task",
            "Id": task.id,
            "Name": f"{task.operation} {task.device}",
            "TaskState": task.state,
            "TaskStatus": {"Running": "OK", "Completed": "OK"}.get(task.state, "Critical"),
            "TaskMonitor": f"{MONITORS}/{task.id}",
            "PercentComplete": 0 if task.state == "Running" else 100,
            "Messages": [
                {
                    "MessageId": "Base.1.8.Success"
                    if task.state != "Exception"
                    else "Base.1.8.GeneralError",
                    "Message": task.message or task.state,
                }
            ],
        }

    async def task(self, request: web.Request) -> web.Response:
        task = self.state.tasks.get(request.match_info["id"])
        if task is None:
            return error(404, "ResourceMissingAtURI", f"no task {request.match_info['id']}")
        self._only(request, "GET, HEAD")
        return self._resource(request, self._task_doc(task))

    async def monitor(self, request: web.Request) -> web.Response:
        task = self.state.tasks.get(request.match_info["id"])
        if task is None:
            return error(404, "ResourceMissingAtURI", f"no task monitor {request.match_info['id']}")
        if task.state == "Running":
            return json_response(
                self._task_doc(task),
                status=202,
                headers={"Location": f"{MONITORS}/{task.id}", "Retry-After": "1"},
            )
        if task.state == "Exception":
            return error(500, "GeneralError", task.message)
        return web.Response(status=204)


def _schema_of(odata_type: str | None) -> str:
    """The JSON schema URI of a resource: `#ServiceRoot.v1_17_0.ServiceRoot` ->
    `http://redfish.dmtf.org/schemas/v1/ServiceRoot.v1_17_0.json`."""
    if not odata_type:
        return ""
    namespace = odata_type.lstrip("#").rsplit(".", 1)[0]
    return f"http://redfish.dmtf.org/schemas/v1/{namespace}.json"


def _accepts_json(accept: str) -> bool:
    kinds = [part.split(";")[0].strip() for part in accept.split(",")]
    return any(k in ("*/*", "application/*", "application/json") for k in kinds)


async def _json_body(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _own_block(machine_id: str) -> str:
    """The URI of the block a system is registered as (config mode)."""
    return f"{BLOCKS}/{OWN_BLOCK_PREFIX}{machine_id}"


def _apply_array_patch(current: list[str], patch: list[Any]) -> list[str] | None:
    """Redfish array PATCH: element i of `patch` is {} (keep current[i]), None (remove it), or a
    new link (replace / append). Elements of `current` past the patch's end are kept."""
    out: list[str] = []
    for i, item in enumerate(patch):
        if item is None:
            continue
        if item == {}:
            if i < len(current):
                out.append(current[i])
            continue
        if not isinstance(item, dict) or not str(item.get("@odata.id", "")).startswith(
            BLOCKS + "/"
        ):
            return None
        out.append(str(item["@odata.id"]))
    out.extend(current[len(patch) :])
    return out


def _health_condition(dev: Device) -> dict[str, Any]:
    """A `Status.Conditions[]` entry (Resource.Condition) for a device's own health."""
    return {
        "MessageId": "Base.1.8.GeneralError",
        "Message": dev.health_reason or f"the device's health is {dev.health}",
        "Severity": dev.health,
    }
