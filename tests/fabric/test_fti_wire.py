"""The FTI wire, field by field, against one table written from CoHDI's clients (the fabric-manager
and cluster-manager types CoHDI's Composable DRA Driver and Composable Resource Operator decode).
The table is the reference: the emulator's answers are checked against it, and so are the
requests our `fti` and cluster-manager clients send and the answers they parse. Neither side is
checked against the other.

A field is `path: types`; `a.b[].c` means key `c` of every item of list `a.b`."""

from __future__ import annotations

import re
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import orjson
import pytest
from aiohttp import web

from agent import errors
from agent.fabric.cm import ClusterManager, ModelLimits, node_totals
from agent.fabric.credentials import Secret
from agent.fabric.emulator import config as emuconfig
from agent.fabric.emulator.cm_api import ClusterManagerConfig, NodeGroup, ResSpec
from agent.fabric.emulator.config import DEFAULT_TENANT
from agent.fabric.emulator.server import EmulatorServer
from agent.fabric.fti import FtiFabric
from agent.fabric.fti import _detail as fti_detail
from agent.fabric.transport import FabricHttp, Reply
from agent.model.fabric import DeviceId, DeviceState, MachineId

PASSWORD = "wire-pass-1"
MODEL = "L40S"
CLUSTER = "6c0e1c2a-1111-4a4a-8b8b-0123456789ab"
M1 = "3f2b7d4e-0000-4000-8000-000000000001"
M2 = "3f2b7d4e-0000-4000-8000-000000000002"
NG = "9a9a9a9a-0000-4000-8000-00000000000a"
NoneType = type(None)

# --- the table ------------------------------------------------------------------------------------

MACHINE = {
    "fabric_uuid": (str,),
    "fabric_id": (int, NoneType),
    "mach_uuid": (str,),
    "mach_id": (int,),
    "mach_name": (str,),
    "tenant_uuid": (str,),
    "mach_status": (int,),
    "mach_status_detail": (str,),
    "resources[].res_uuid": (str,),
    "resources[].res_name": (str,),
    "resources[].res_type": (str,),
    "resources[].res_status": (int,),
    "resources[].res_op_status": (str,),
    "resources[].res_serial_num": (str,),
    "resources[].res_spec.condition[].column": (str,),
    "resources[].res_spec.condition[].operator": (str,),
    "resources[].res_spec.condition[].value": (str,),
}
ERROR = {"status": (int,), "detail.code": (str,), "detail.message": (str, dict, list)}
CONDITION = {"column": (str,), "operator": (str,), "value": (str,)}
ATTACH_SPEC = {
    "res_type": (str,),
    "res_spec.condition[].column": (str,),
    "res_spec.condition[].operator": (str,),
    "res_spec.condition[].value": (str,),
    "res_num": (int,),
}
DETACH_SPEC = {"res_type": (str,), "res_uuid": (str,), "res_num": (int,)}


def _under(prefix: str, shape: dict[str, tuple[type, ...]]) -> dict[str, tuple[type, ...]]:
    return {f"{prefix}{k}": v for k, v in shape.items()}


def _body(spec: dict[str, tuple[type, ...]]) -> dict[str, tuple[type, ...]]:
    return {
        "tenants.tenant_uuid": (str,),
        "tenants.machines[].mach_uuid": (str,),
        **_under("tenants.machines[].resources[].res_specs[].", spec),
    }


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    #: path with <T> tenant, <C> cluster, <M> machine, <NG> node group, <R> realm
    path: str
    #: query parameter -> required value ("*" any; "json:<shape>" a JSON object of that shape)
    query: dict[str, str] = field(default_factory=dict)
    #: JSON request body fields (exactly these keys, recursively), or form fields for the token
    body: dict[str, tuple[type, ...]] | None = None
    form: dict[str, str] | None = None
    response: dict[str, tuple[type, ...]] = field(default_factory=dict)
    statuses: tuple[int, ...] = (200,)

    def pattern(self) -> re.Pattern[str]:
        p = re.escape(self.path)
        for var in ("<T>", "<C>", "<M>", "<NG>", "<R>"):
            p = p.replace(re.escape(var), "[^/]+")
        return re.compile(f"^{p}$")


FM = "/fabric_manager/api/v1"
CMV2 = "/cluster_manager/cluster_autoscaler/v2/tenants/<T>/clusters/<C>"
CMV3 = "/cluster_manager/cluster_autoscaler/v3/tenants/<T>/clusters/<C>"
TABLE = [
    Endpoint(
        "token",
        "POST",
        "/id_manager/realms/<R>/protocol/openid-connect/token",
        form={
            "client_id": "*",
            "username": "*",
            "password": "*",
            "scope": "openid",
            "response_type": "id_token token",
            "grant_type": "password",
        },
        response={"access_token": (str,), "expires_in": (int,)},
    ),
    Endpoint(
        "machines",
        "GET",
        f"{FM}/machines",
        query={"tenant_uuid": "<T>"},
        response=_under("data.machines[].", MACHINE),
    ),
    Endpoint(
        "machine",
        "GET",
        f"{FM}/machines/<M>",
        query={"tenant_uuid": "<T>"},
        response=_under("data.machines[].", MACHINE),
    ),
    Endpoint(
        "available",
        "GET",
        f"{FM}/machines/<M>/available-reserved-resources",
        query={"tenant_uuid": "<T>", "res_type": "gpu", "condition": "json:condition"},
        response={"reserved_res_num_per_fabric": (int,), "fabric_id": (int,)},
    ),
    Endpoint(
        "attach",
        "PATCH",
        f"{FM}/machines/<M>/update",
        query={"tenant_uuid": "<T>"},
        body=_body(ATTACH_SPEC),
        response={
            "data.machines[].mach_uuid": (str,),
            "data.machines[].resources[].res_type": (str,),
            "data.machines[].resources[].res_uuid": (str,),
            "data.machines[].resources[].res_serial_num": (str,),
            "data.machines[].resources[].res_op_status": (str,),
            "data.machines[].resources[].res_spec.condition[].value": (str,),
        },
    ),
    Endpoint(
        "detach",
        "DELETE",
        f"{FM}/machines/<M>/update",
        query={"tenant_uuid": "<T>"},
        body=_body(DETACH_SPEC),
        statuses=(200, 204),
    ),
    Endpoint(
        "nodegroups",
        "GET",
        f"{CMV2}/nodegroups",
        response={"nodegroups[].uuid": (str,), "nodegroups[].name": (str,)},
    ),
    Endpoint(
        "nodegroup",
        "GET",
        f"{CMV2}/nodegroups/<NG>",
        response={"uuid": (str,), "name": (str,), "mach_ids[]": (str,)},
    ),
    Endpoint(
        "cm-machine",
        "GET",
        f"{CMV3}/machines/<M>",
        response=_under(
            "data.cluster.machine.resspecs[].",
            {
                "spec_uuid": (str,),
                "type": (str,),
                "min_resspec_count": (int, NoneType),
                "max_resspec_count": (int, NoneType),
                "device_count": (int,),
                "selector.expression.conditions[].column": (str,),
                "selector.expression.conditions[].operator": (str,),
                "selector.expression.conditions[].value": (str,),
                "devices[].device_id": (str,),
                "devices[].status": (str,),
                "devices[].status_reason": (str,),
                "devices[].detail.res_uuid": (str,),
                "devices[].detail.res_op_status": (str,),
                "devices[].detail.fabric_id": (int, NoneType),
            },
        ),
    ),
]
BY_NAME = {e.name: e for e in TABLE}


def values(doc: Any, path: str) -> Iterator[tuple[bool, Any]]:
    """(present, value) for every place `path` names in `doc` (lists expanded at `[]`)."""
    head, _, rest = path.partition(".")
    many = head.endswith("[]")
    key = head.removesuffix("[]")
    if key:
        if not isinstance(doc, dict) or key not in doc:
            yield False, None
            return
        doc = doc[key]
    if many:
        assert isinstance(doc, list), f"{key} is not a list: {doc!r:.100}"
        for item in doc:
            yield from values(item, rest) if rest else iter([(True, item)])
        return
    if rest:
        yield from values(doc, rest)
    else:
        yield True, doc


def check_shape(doc: Any, shape: dict[str, tuple[type, ...]], what: str) -> list[str]:
    """Every field of `shape` present with one of its types wherever its lists have items."""
    problems = []
    for path, types in shape.items():
        for present, value in values(doc, path):
            if not present:
                problems.append(f"{what}: {path} missing")
            elif isinstance(value, bool) or not isinstance(value, types):
                problems.append(
                    f"{what}: {path} is {type(value).__name__} {value!r:.60}, the table says "
                    + "|".join(t.__name__ for t in types)
                )
    return problems


def keys_of(doc: Any, prefix: str = "") -> set[str]:
    """Every leaf path of `doc` in the table's notation."""
    if isinstance(doc, dict):
        out: set[str] = set()
        for k, v in doc.items():
            out |= keys_of(v, f"{prefix}{k}.") if isinstance(v, dict | list) else {prefix + k}
        return out
    if isinstance(doc, list):
        out = set()
        for item in doc:
            out |= (
                keys_of(item, prefix.rstrip(".") + "[].")
                if isinstance(item, dict | list)
                else {prefix.rstrip(".") + "[]"}
            )
        return out
    return {prefix.rstrip(".")}


# --- the emulator, with a recorder of what clients send -------------------------------------------


@dataclass
class Sent:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: bytes


class RecordingEmulator(EmulatorServer):
    sent: list[Sent]

    def app(self) -> web.Application:
        app = super().app()
        self.sent = []

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            body = await request.read() if request.can_read_body else b""
            self.sent.append(
                Sent(
                    request.method,
                    request.path,
                    dict(request.query),
                    request.headers.get("Content-Type", ""),
                    body,
                )
            )
            return await handler(request)

        app.middlewares.insert(0, record)
        return app


@pytest.fixture
async def emulator(tmp_path: Path) -> AsyncIterator[RecordingEmulator]:
    conf = emuconfig.parse(
        {
            "machines": [
                {"id": M1, "name": "cdi-host-1", "fabric": "fabric-a"},
                {"id": M2, "name": "cdi-host-2", "fabric": "fabric-a"},
            ],
            "devices": [{"model": MODEL, "count": 3, "fabric": "fabric-a"}],
            "users": [{"name": "admin", "password": PASSWORD}],
        }
    )
    cm = ClusterManagerConfig(
        cluster=CLUSTER,
        groups=[NodeGroup(NG, "workers", (M1, M2), (ResSpec(MODEL, min=1, max=2),))],
    )
    server = RecordingEmulator(conf, tls_dir=tmp_path / "tls", cluster_manager=cm)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class Raw:
    """CoHDI's side of the wire, as plain HTTP: exactly the requests its Go clients send."""

    def __init__(self, server: EmulatorServer, session: aiohttp.ClientSession) -> None:
        assert server.ca_file is not None
        self.url = server.url
        self.ssl = ssl.create_default_context(cafile=str(server.ca_file))
        self.session = session
        self.token = ""

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        headers.update(kw.pop("headers", {}))
        async with self.session.request(
            method, self.url + path, ssl=self.ssl, headers=headers, **kw
        ) as resp:
            text = await resp.read()
            return resp.status, orjson.loads(text) if text else None

    async def login(self, *, dra_driver_style: bool) -> dict[str, Any]:
        path = "/id_manager/realms/cdi/protocol/openid-connect/token"
        if dra_driver_style:  # CoHDI's DRA driver: a body formatted by hand, not URL-encoded
            body = (
                f"client_id=cohdi&client_secret=&username=admin&password={PASSWORD}"
                "&scope=openid&response=id_token token&grant_type=password"
            )
            status, doc = await self.call(
                "POST",
                path,
                data=body.encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
        else:  # CoHDI's operator: properly form-encoded
            status, doc = await self.call(
                "POST",
                path,
                data={
                    "client_id": "cohdi",
                    "client_secret": "",
                    "username": "admin",
                    "password": PASSWORD,
                    "scope": "openid",
                    "response_type": "id_token token",
                    "grant_type": "password",
                },
            )
        assert status == 200, doc
        self.token = doc["access_token"]
        return dict(doc)


def fill(path: str) -> str:
    return (
        path.replace("<T>", DEFAULT_TENANT)
        .replace("<C>", CLUSTER)
        .replace("<NG>", NG)
        .replace("<R>", "cdi")
    )


def attach_body(machine: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "tenants": {
            "tenant_uuid": DEFAULT_TENANT,
            "machines": [{"mach_uuid": machine, "resources": [{"res_specs": [spec]}]}],
        }
    }


# --- the emulator against the table ---------------------------------------------------------------


@pytest.mark.parametrize("dra_driver_style", [True, False])
async def test_token_endpoint_takes_both_cohdi_encodings(
    emulator: RecordingEmulator, dra_driver_style: bool
) -> None:
    async with aiohttp.ClientSession() as s:
        doc = await Raw(emulator, s).login(dra_driver_style=dra_driver_style)
    assert check_shape(doc, BY_NAME["token"].response, "token") == []
    assert doc["access_token"].count(".") == 2  # a JWT whose exp CoHDI reads


async def test_emulator_answers_every_endpoint_as_the_table_says(
    emulator: RecordingEmulator,
) -> None:
    problems: list[str] = []
    seen: dict[str, Any] = {}
    async with aiohttp.ClientSession() as s:
        raw = Raw(emulator, s)
        await raw.login(dra_driver_style=False)
        q = {"tenant_uuid": DEFAULT_TENANT}
        cond = orjson.dumps({"column": "model", "operator": "eq", "value": MODEL}).decode()
        spec = {
            "res_type": "gpu",
            "res_spec": {"condition": [{"column": "model", "operator": "eq", "value": MODEL}]},
            "res_num": 1,
        }
        calls: list[tuple[str, str, dict[str, Any]]] = [
            ("attach", f"{FM}/machines/{M1}/update", {"json": attach_body(M1, spec)}),
            ("machines", f"{FM}/machines", {}),
            ("machine", f"{FM}/machines/{M1}", {}),
            (
                "available",
                f"{FM}/machines/{M1}/available-reserved-resources",
                {"params": {**q, "res_type": "gpu", "condition": cond}},
            ),
            ("nodegroups", fill(f"{CMV2}/nodegroups"), {"params": {}}),
            ("nodegroup", fill(f"{CMV2}/nodegroups/<NG>"), {"params": {}}),
            ("cm-machine", fill(f"{CMV3}/machines/{M1}"), {"params": {}}),
        ]
        for name, path, kw in calls:
            e = BY_NAME[name]
            kw.setdefault("params", q)
            status, doc = await raw.call(e.method, path, **kw)
            assert status in e.statuses, (name, status, doc)
            seen[name] = doc
            problems += check_shape(doc, e.response, name)
        res_uuid = seen["attach"]["data"]["machines"][0]["resources"][0]["res_uuid"]
        e = BY_NAME["detach"]
        detach = {"res_type": "gpu", "res_uuid": res_uuid, "res_num": 1}
        status, _ = await raw.call(
            "DELETE", f"{FM}/machines/{M1}/update", params=q, json=attach_body(M1, detach)
        )
        assert status in e.statuses
        # errors: the FM's and the CM's in one shape
        for path, params in (
            (f"{FM}/machines/no-such-machine", q),
            (f"{FM}/machines/{M1}/available-reserved-resources", {**q, "res_type": "gpu"}),
            (fill(f"{CMV3}/machines/no-such-machine"), {}),
            (fill(f"{CMV2}/nodegroups/no-such-group"), {}),
        ):
            status, doc = await raw.call("GET", path, params=params)
            assert status >= 400
            problems += check_shape(doc, ERROR, f"error of {path}")
            assert doc["status"] == status
    # the figures, not only the types
    machines = seen["machines"]["data"]["machines"]
    assert sorted(m["mach_id"] for m in machines) == [1, 2]
    assert {m["fabric_id"] for m in machines} == {0}
    res = seen["attach"]["data"]["machines"][0]["resources"][0]
    assert res["res_op_status"][0] == "0"
    assert res["res_status"] == 4
    assert seen["available"] == {"reserved_res_num_per_fabric": 2, "fabric_id": 0}
    assert seen["nodegroup"]["mach_ids"] == [M1, M2]
    (rs,) = seen["cm-machine"]["data"]["cluster"]["machine"]["resspecs"]
    assert (rs["min_resspec_count"], rs["max_resspec_count"], rs["device_count"]) == (1, 2, 1)
    assert problems == []


async def test_emulator_device_health_reaches_pool_device_health(
    emulator: RecordingEmulator,
) -> None:
    """The emulator's device health in `res_op_status` (0 / 1 warning / 2 critical), read by our
    client into PoolDevice.health and health_reason."""
    fabric = client(emulator)
    try:
        inv = await fabric.inventory()
        got = await fabric.attach(
            DeviceId(f"{inv.machines[0].fabric}.{MODEL}.free-0"), MachineId(M1)
        )
        healths = []
        for health in ("Warning", "Critical", "OK"):
            emulator.state.set_health(
                got.id, health, f"{health.lower()} ecc" if health != "OK" else ""
            )
            dev = (await fabric.inventory()).device(got.id)
            assert dev is not None
            healths.append((dev.state, dev.health, dev.health_reason))
    finally:
        await fabric.close()
    assert healths == [
        (DeviceState.ATTACHED, "Warning", "warning ecc"),
        (DeviceState.ATTACHED, "Critical", "critical ecc"),
        (DeviceState.ATTACHED, "OK", ""),
    ]


def test_the_table_catches_a_string_mach_id() -> None:
    """The reference, not the emulator, decides: a machine whose `mach_id` is a string (what the
    emulator sent before, and what made CoHDI's operator fail to decode an attach) is reported."""
    doc = {"data": {"machines": [{"mach_uuid": M1, "mach_id": M1, "fabric_id": 0}]}}
    problems = check_shape(doc, {"data.machines[].mach_id": (int,)}, "machines")
    assert problems == [f"machines: data.machines[].mach_id is str '{M1}', the table says int"]


# --- our clients against the table ----------------------------------------------------------------


def client(server: EmulatorServer) -> FtiFabric:
    http = FabricHttp(base_url=server.url, ca_bundle=str(server.ca_file), timeout=5.0, retries=2)
    return FtiFabric(
        http,
        user="admin",
        password=Secret(PASSWORD),
        tenant=DEFAULT_TENANT,
        client_secret=Secret("client-secret-1"),
        models=(MODEL,),
    )


def match(sent: Sent) -> Endpoint:
    hits = [e for e in TABLE if e.method == sent.method and e.pattern().match(sent.path)]
    assert len(hits) == 1, f"{sent.method} {sent.path} is in no row of the table"
    return hits[0]


def check_request(sent: Sent) -> list[str]:
    e = match(sent)
    what = f"{e.name} request"
    problems = []
    for key, want in e.query.items():
        got = sent.query.get(key)
        if got is None:
            problems.append(f"{what}: query {key} missing")
        elif want == "<T>" and got != DEFAULT_TENANT:
            problems.append(f"{what}: query {key}={got!r}")
        elif want == "json:condition":
            problems += check_shape(orjson.loads(got), CONDITION, f"{what} condition")
        elif not want.startswith(("<", "json:", "*")) and got != want:
            problems.append(f"{what}: query {key}={got!r}, the table says {want!r}")
    if extra := set(sent.query) - set(e.query):
        problems.append(f"{what}: query parameters not in the table: {sorted(extra)}")
    if e.form is not None:
        if sent.content_type != "application/x-www-form-urlencoded":
            problems.append(f"{what}: Content-Type {sent.content_type!r}")
        form = dict(parse_qsl(sent.body.decode(), keep_blank_values=True))
        for key, want in e.form.items():
            if key not in form:
                problems.append(f"{what}: form field {key} missing")
            elif want != "*" and form[key] != want:
                problems.append(f"{what}: form {key}={form[key]!r}, the table says {want!r}")
    if e.body is not None:
        doc = orjson.loads(sent.body)
        problems += check_shape(doc, e.body, what)
        if extra := keys_of(doc) - set(e.body):
            problems.append(f"{what}: body fields not in the table: {sorted(extra)}")
    return problems


async def test_client_requests_are_the_tables(emulator: RecordingEmulator) -> None:
    fabric = client(emulator)
    try:
        inv = await fabric.inventory()
        got = await fabric.attach(
            DeviceId(f"{inv.machines[0].fabric}.{MODEL}.free-0"), MachineId(M1)
        )
        await fabric.detach(got.id)
        limits = await ClusterManager(fabric, CLUSTER).limits([MachineId(M1), MachineId(M2)])
    finally:
        await fabric.close()
    names = [match(s).name for s in emulator.sent]
    assert set(names) == set(BY_NAME), f"endpoints never exercised: {set(BY_NAME) - set(names)}"
    problems = [p for s in emulator.sent for p in check_request(s)]
    assert problems == []
    form = dict(parse_qsl(emulator.sent[0].body.decode()))
    assert form["client_secret"] == "client-secret-1"
    assert limits == {
        MachineId(M1): {MODEL: ModelLimits(1, 2)},
        MachineId(M2): {MODEL: ModelLimits(1, 2)},
    }
    assert node_totals(limits[MachineId(M1)]) == (1, 2)


# --- our client parsing what real fabric managers send --------------------------------------------


def fm_app(machine: Any, *, error: bool = False, count: Any = 1) -> web.Application:
    """A fabric manager that answers the table's documents (and nothing our emulator makes)."""
    jwt = "eyJhbGciOiJub25lIn0.eyJleHAiOjMyNTAzNjgwMDAwfQ.sig"

    async def token(_r: web.Request) -> web.Response:
        return web.json_response({"access_token": jwt, "expires_in": 300})

    async def machines(_r: web.Request) -> web.Response:
        if error:
            return web.json_response(
                {
                    "status": 503,
                    "detail": {"code": "E50300", "message": {"reason": "maintenance"}, "data": {}},
                },
                status=503,
            )
        return web.json_response({"data": {"machines": [machine]}})

    async def available(_r: web.Request) -> web.Response:
        return web.json_response({"reserved_res_num_per_fabric": count, "fabric_id": 3})

    app = web.Application()
    app.router.add_post("/id_manager/realms/cdi/protocol/openid-connect/token", token)
    app.router.add_get(f"{FM}/machines", machines)
    app.router.add_get(f"{FM}/machines/{{m}}/available-reserved-resources", available)
    return app


def real_machine(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "fabric_uuid": None,
        "fabric_id": 3,
        "mach_uuid": M1,
        "mach_id": 17,
        "mach_name": "cdi-host-1",
        "tenant_uuid": DEFAULT_TENANT,
        "mach_status": 15,
        "mach_status_detail": "",
        "resources": [
            {
                "res_uuid": "r-1",
                "res_name": "dummy",
                "res_type": "gpu",
                "res_status": 4,
                "res_op_status": "0",
                "res_serial_num": "GPU-1",
                "res_spec": {"condition": [{"column": "model", "operator": "eq", "value": MODEL}]},
            }
        ],
    }
    doc.update(over)
    return doc


async def read_with(app: web.Application, *, models: tuple[str, ...] = (MODEL,)) -> Any:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    http = FabricHttp(base_url=f"http://127.0.0.1:{port}", timeout=5.0, retries=1)
    fabric = FtiFabric(http, user="u", password=Secret("p"), tenant=DEFAULT_TENANT, models=models)
    try:
        return await fabric.inventory()
    finally:
        await fabric.close()
        await runner.cleanup()


@pytest.mark.parametrize("mach_id", [17, "17", None])
async def test_client_takes_integer_or_string_machine_ids(mach_id: Any) -> None:
    inv = await read_with(fm_app(real_machine(mach_id=mach_id)))
    (m,) = inv.machines
    assert (m.id, m.fabric, m.name) == (M1, "3", "cdi-host-1")
    attached = [d for d in inv.devices if not d.anonymous]
    assert [(d.id, d.state, d.gpu_uuid, d.health) for d in attached] == [
        ("r-1", DeviceState.ATTACHED, "GPU-1", "OK")
    ]
    assert sum(d.anonymous for d in inv.devices) == 1


async def test_client_maps_res_op_status_to_health() -> None:
    res = real_machine()["resources"][0]
    warn = {**res, "res_uuid": "r-w", "res_op_status": "1ECC errors rising"}
    crit = {**res, "res_uuid": "r-c", "res_op_status": "2link down"}
    num = {**res, "res_uuid": "r-n", "res_op_status": 0, "res_status": "4"}
    inv = await read_with(fm_app(real_machine(resources=[warn, crit, num])), models=())
    by_id = {d.id: d for d in inv.devices}
    assert (by_id["r-w"].state, by_id["r-w"].health, by_id["r-w"].health_reason) == (
        DeviceState.ATTACHED,
        "Warning",
        "ECC errors rising",
    )
    assert (by_id["r-c"].state, by_id["r-c"].health, by_id["r-c"].health_reason) == (
        DeviceState.ATTACHED,
        "Critical",
        "link down",
    )
    failed = {**res, "res_uuid": "r-f", "res_status": 9, "res_op_status": "2attach failed"}
    inv = await read_with(fm_app(real_machine(resources=[failed])), models=())
    assert [(d.state, d.reason, d.health) for d in inv.devices] == [
        (DeviceState.FAILED, "attach failed", "Critical")
    ]
    assert (by_id["r-n"].state, by_id["r-n"].health) == (DeviceState.ATTACHED, "OK")


async def test_client_machine_without_fabric_is_wired_to_none() -> None:
    """CoHDI's `fabric_id` is a nullable int: a machine without one is on no fabric (before, the
    client called its fabric "None" and asked that fabric for free counts)."""
    inv = await read_with(fm_app(real_machine(fabric_id=None, resources=[])))
    (m,) = inv.machines
    assert m.fabric == ""
    assert inv.devices == ()


@pytest.mark.parametrize(
    "over",
    [{"mach_uuid": 17}, {"mach_uuid": ""}, {"fabric_id": "three"}, {"fabric_id": True}],
    ids=["int-uuid", "empty-uuid", "text-fabric", "bool-fabric"],
)
async def test_client_is_strict_where_identity_hangs_on_it(over: dict[str, Any]) -> None:
    with pytest.raises(errors.FabricProtocolError):
        await read_with(fm_app(real_machine(**over)))


async def test_client_reports_the_error_body_detail() -> None:
    with pytest.raises(errors.AgentError) as info:
        await read_with(fm_app(real_machine(), error=True))
    assert 'E50300 {"reason":"maintenance"}' in str(info.value)


# --- attacks: odd shapes are protocol errors, never a crash -------------------------------------


def _res(**over: Any) -> dict[str, Any]:
    return {**real_machine()["resources"][0], **over}


@pytest.mark.parametrize(
    "machine",
    [
        real_machine(resources=[_res(res_spec="x")]),
        real_machine(resources=[_res(res_spec={"condition": [None]})]),
        real_machine(resources=[_res(res_spec={"condition": "model"})]),
        real_machine(resources=[["r-1"]]),
        real_machine(resources="r-1"),
        real_machine(fabric_id="\u0661"),  # a digit outside ASCII is not an integer on the wire
        "a machine that is a string",
        None,
    ],
    ids=[
        "res_spec-text",
        "condition-null",
        "condition-text",
        "resource-list",
        "resources-text",
        "fabric-arabic-digit",
        "machine-text",
        "machine-null",
    ],
)
async def test_an_answer_of_an_odd_shape_is_a_protocol_error(machine: Any) -> None:
    """Anything but the error tree escapes the fabric watch as a bug (`agent.fabric.link.poll`)
    and stops the cluster role: an odd answer must be a FabricProtocolError (the watch records
    it and reads again)."""
    with pytest.raises(errors.FabricProtocolError):
        await read_with(fm_app(machine))


async def test_null_where_a_manager_may_send_null() -> None:
    """`res_op_status` null is no health report (OK); a model condition with a null value is no
    model (not the model "None")."""
    res = _res(res_op_status=None, res_spec={"condition": [{"column": "model", "value": None}]})
    inv = await read_with(fm_app(real_machine(resources=[res])), models=())
    (d,) = inv.devices
    assert (d.health, d.model) == ("OK", "")


@pytest.mark.parametrize(
    ("body", "shown"),
    [
        (b'{"status":409,"detail":{"code":"E40900","message":"busy","data":{}}}', "E40900 busy"),
        (b'{"status":500,"detail":{"code":"E5","message":{"why":"x"}}}', 'E5 {"why":"x"}'),
        (b'{"detail":"text"}', '{"detail":"text"}'),
        (b'{"detail":null}', "{'detail': None}"),
        (b"[1,2]", "[1,2]"),
        (b"<html>bad gateway</html>", "<html>bad gateway</html>"),
        (b"\xff\xfe", "\ufffd\ufffd"),
        (b"", ""),
    ],
    ids=["cohdi", "json-message", "detail-text", "detail-null", "list", "html", "binary", "empty"],
)
def test_error_bodies_of_any_shape_are_shown_never_raised(body: bytes, shown: str) -> None:
    """An FM error body is `{"status", "detail": {"code", "message", "data"}}`; any other shape
    (a proxy's HTML page, a list, bytes) is shown as it came, never an exception of its own."""
    assert fti_detail(Reply(502, {}, body)) == shown


@pytest.mark.parametrize("count", [True, -1, "2", 1.5, None], ids=str)
async def test_a_free_count_that_is_not_a_count_is_a_protocol_error(count: Any) -> None:
    """`reserved_res_num_per_fabric` is an integer >= 0 (CoHDI's Go int); JSON `true` is not 1."""
    with pytest.raises(errors.FabricProtocolError, match="bad count"):
        await read_with(fm_app(real_machine(), count=count))
