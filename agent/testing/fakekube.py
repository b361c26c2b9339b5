"""An in-memory Kubernetes API server behind the `Kube` interface, for fast controller tests.

`FakeKube` is a `agent.kube.client.Kube` whose requests never leave the process: the agent's real
code (informers, controllers, leader election) runs on it unchanged. Errors are raised by the real
client's `_raise_for` from a Status body shaped like the API server's, so callers see exactly the
`agent.errors.Kube*` they would see against a cluster.

What it models, as kube-apiserver does (facts checked against the integration tests, which run on
a real kube-apiserver, and the apiserver's generic registry):

- objects of any resource, stored by REST path: core `/api/v1/...` and
  `/apis/<group>/<version>/...`, namespaced (`.../namespaces/<ns>/<plural>`) or cluster-scoped.
  Well-known plurals have their real scope (`CLUSTER_SCOPED`, `NAMESPACED`: a path of the other
  scope is 404, a POST to the all-namespace collection 405); others take the scope their path
  names. A collection path without a namespace lists every namespace. Objects are kept per
  (group, plural): the version in the path only sets `apiVersion` on what is returned;
- one global, monotonically increasing resourceVersion (like etcd's revision); `uid`,
  `creationTimestamp`, `generation` (1 on create, +1 when anything but metadata and status
  changes, and when deletion starts; kept on every kind); `generateName`; names must be DNS-1123
  subdomains (422); a create that carries a resourceVersion: 400;
- create of an existing name: 409 AlreadyExists; PUT with a stale `metadata.resourceVersion`:
  409 Conflict; PUT without one: unconditional; a `metadata.uid` other than the stored one: 409;
  a body whose name (or namespace) is not the URL's: 400; PUT/PATCH/DELETE of a missing object:
  404; a write that changes nothing is a no-op (same resourceVersion, no watch event);
- status subresources (`STATUS_SUBRESOURCE`, extendable): PUT/PATCH `<obj>/status` changes only
  `status`; writes to the object itself keep the stored `status`; create drops `status` (except for
  Nodes, which the kubelet registers with a status). Other kinds have no `/status` (404) and their
  writes take `status` as given;
- JSON merge patch (RFC 7386); the `metadata.resourceVersion` (and `uid`) a patch carries are
  preconditions (409 if stale). Strategic merge patch, for built-in kinds only (custom resources
  answer 415, as they do), is applied as a merge patch: lists are replaced where the real one
  merges some by key (finalizers, conditions, taints) and `$patch` directives are not understood.
  JSON patch and server-side apply answer 415;
- finalizers: DELETE of an object with finalizers sets `deletionTimestamp` (MODIFIED); the write
  that removes the last finalizer deletes it (DELETED, carrying the last stored state, as etcd's
  watch does); adding a finalizer to an object being deleted: 422. DELETE preconditions
  (`{"preconditions": {"uid"/"resourceVersion"}}`) give 409;
- LIST: `fieldSelector` (`=`/`==`/`!=`, comma-separated; on the fields each well-known resource
  registers, `FIELD_LABELS`, others 400; any dotted path for other plurals, or after
  `selectable()`), `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`),
  `limit`/`continue` over a consistent snapshot (an expired token: 410), `kind: <Kind>List`,
  `apiVersion`; items of built-in groups come without kind/apiVersion, custom resources with them;
- WATCH: events after `resourceVersion` from a bounded history (older: an ERROR event with a 410
  Status, as the watch cache sends); `""`/`"0"` starts with synthetic ADDED events; selectors apply
  with transitions (an object that stops matching is DELETED, one that starts matching ADDED);
  BOOKMARK events every `bookmark_interval` seconds when asked for; `timeoutSeconds` ends it.

Test controls: `fail()`/`hang()` (the next N matching requests fail or stall, before or after the
write is applied), `set_down()` (every request and open watch fails with KubeUnavailable),
`stalled` (open watches go silent until their read timeout), `client()` (another client of the
same server, e.g. a second replica, with its own faults and counts),
`requests` and `on_request` (every request seen), `count(verb, resource)`, `admit(plural, hook)`
(validation or defaulting), `add`/`edit`/`remove` (another writer, such as the scheduler or the
kubelet: no faults, counts or admission), `objects`/`get_obj` (read the store), `compact()`,
`end_watches()` and `bookmark()`.

Not modeled: namespaces as a precondition of namespaced objects and their cascading deletion,
garbage collection of ownerReferences, graceful deletion of pods (deleted at once), managedFields
and server-side apply, OpenAPI/CRD schema validation and defaulting (use `admit`), immutable
fields, RBAC, `resourceVersionMatch`, `sendInitialEvents`, watches of one object by its path,
deletecollection, the apiserver's own timeouts and rate limits (inject them with `fail`/`hang`).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import inspect
import itertools
import random
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final, NoReturn, TypeVar, cast

import orjson

from agent import errors
from agent.kube.client import JSON, MERGE_PATCH, STRATEGIC_PATCH, Kube, Obj, _raise_for

_T = TypeVar("_T")
ResKey = tuple[str, str]  # (group, plural)
ObjKey = tuple[str, str]  # (namespace or "", name)

#: Plurals whose `status` is a subresource, as in Kubernetes 1.36 and the agent's own CRDs.
STATUS_SUBRESOURCE: Final = frozenset(
    {
        "nodes",
        "pods",
        "namespaces",
        "resourceclaims",
        "composableresources",
        "composabilityrequests",
        "customresourcedefinitions",
        "deployments",
        "daemonsets",
        "statefulsets",
        "replicasets",
        "jobs",
        "services",
        "persistentvolumes",
        "persistentvolumeclaims",
    }
)
#: Kinds registered with their status on create (the kubelet does this for its Node).
_STATUS_ON_CREATE: Final = frozenset({"nodes"})

#: Kinds of well-known plurals, for lists and bookmarks before any object of the kind was written.
KINDS: Final = {
    "nodes": "Node",
    "pods": "Pod",
    "namespaces": "Namespace",
    "configmaps": "ConfigMap",
    "secrets": "Secret",
    "services": "Service",
    "events": "Event",
    "leases": "Lease",
    "resourceclaims": "ResourceClaim",
    "resourceclaimtemplates": "ResourceClaimTemplate",
    "resourceslices": "ResourceSlice",
    "deviceclasses": "DeviceClass",
    "composableresources": "ComposableResource",
    "composabilityrequests": "ComposabilityRequest",
    "customresourcedefinitions": "CustomResourceDefinition",
    "deployments": "Deployment",
    "daemonsets": "DaemonSet",
}

#: Scopes of well-known plurals: a path of the other scope is answered 404 (405 for a POST to an
#: all-namespace collection), as the server does. Other plurals take the scope their path names.
CLUSTER_SCOPED: Final = frozenset(
    {
        "nodes",
        "namespaces",
        "persistentvolumes",
        "resourceslices",
        "deviceclasses",
        "customresourcedefinitions",
        "composableresources",
        "composabilityrequests",
        "clusterroles",
        "clusterrolebindings",
        "storageclasses",
        "priorityclasses",
    }
)
NAMESPACED: Final = frozenset(
    {
        "pods",
        "configmaps",
        "secrets",
        "services",
        "serviceaccounts",
        "events",
        "leases",
        "resourceclaims",
        "resourceclaimtemplates",
        "deployments",
        "daemonsets",
        "statefulsets",
        "replicasets",
        "jobs",
        "roles",
        "rolebindings",
        "persistentvolumeclaims",
        "endpointslices",
    }
)

_META_FIELDS: Final = frozenset({"metadata.name", "metadata.namespace"})
#: Field selector labels each resource accepts besides metadata.name/namespace (Kubernetes 1.36,
#: and `selectableFields` of the agent's CRDs); others are refused with 400, as the server does.
#: Plurals not listed here accept any dotted path (see `FakeKube.selectable`).
FIELD_LABELS: Final = {
    "pods": frozenset(
        {
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.podIPs",
            "status.nominatedNodeName",
        }
    ),
    "nodes": frozenset({"spec.unschedulable"}),
    "namespaces": frozenset({"status.phase"}),
    "secrets": frozenset({"type"}),
    "events": frozenset(
        {
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        }
    ),
    "resourceslices": frozenset({"spec.driver", "spec.nodeName"}),
    "resourceclaims": frozenset(),
    "configmaps": frozenset(),
    "leases": frozenset(),
    "composableresources": frozenset({"spec.target_node"}),
    "composabilityrequests": frozenset(),
}

_SUBDOMAIN: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_GENERATE_ALPHABET: Final = "bcdfghjklmnpqrstvwxz2456789"  # the apiserver's name generator's
_REASONS: Final = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class Rejected(Exception):
    """Raised by an admission hook to refuse a write: the client gets `status` (422 Invalid by
    default) with `message`, as from a validating webhook or the server's own validation."""

    def __init__(self, message: str, *, status: int = 422, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason or _REASONS.get(status, "")


#: An admission hook: (operation "CREATE"/"UPDATE"/"DELETE", new object, old object or None).
#: It may change `new` in place (defaulting) or raise `Rejected`. For DELETE, `new` is the stored
#: object and changes to it are ignored.
Admission = Callable[[str, Obj, "Obj | None"], None]


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """One request as the fake saw it. `verb` is the Kubernetes verb (get, list, watch, create,
    update, patch, delete); `resource` is the plural, with `/status` for the subresource."""

    method: str
    path: str
    verb: str
    resource: str
    params: Mapping[str, str | int]
    body: Any


@dataclasses.dataclass(slots=True)
class _Fault:
    method: str  # "*" or GET/POST/PUT/PATCH/DELETE/WATCH
    path: str  # prefix
    times: int
    status: int = 0  # 0: no error, only the delay
    reason: str = ""
    message: str = ""
    retry_after: int | None = None
    delay: float = 0.0
    after: bool = False  # apply the write first, then fail or stall (the answer is lost)

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and self.method in ("*", method) and path.startswith(self.path)


@dataclasses.dataclass(frozen=True, slots=True)
class _Path:
    group: str
    version: str
    plural: str
    namespace: str  # "" for cluster-scoped objects and all-namespace collections
    name: str  # "" for a collection
    sub: str  # "" or "status"

    @property
    def res(self) -> ResKey:
        return (self.group, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """`leases.coordination.k8s.io`, as the server names a resource in its messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


def parse_path(path: str) -> _Path:
    """Split a REST path into its parts. Raises `errors.KubeNotFound` for a path that names no
    resource (as the server's 404 for an unknown URL)."""
    segs = [s for s in path.split("?", 1)[0].split("/") if s]
    if len(segs) >= 2 and segs[0] == "api":
        group, version, rest = "", segs[1], segs[2:]
    elif len(segs) >= 3 and segs[0] == "apis":
        group, version, rest = segs[1], segs[2], segs[3:]
    else:
        _fail(404, f"the server could not find the requested resource ({path})", "GET", path)
    namespace = ""
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
        namespace, rest = rest[1], rest[2:]
    if not 1 <= len(rest) <= 3 or (len(rest) == 3 and rest[2] != "status"):
        _fail(404, f"the server could not find the requested resource ({path})", "GET", path)
    return _Path(
        group=group,
        version=version,
        plural=rest[0],
        namespace=namespace,
        name=rest[1] if len(rest) > 1 else "",
        sub=rest[2] if len(rest) > 2 else "",
    )


def _status_body(status: int, message: str, reason: str = "", **details: Any) -> bytes:
    doc: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or _REASONS.get(status, ""),
        "code": status,
    }
    if details:
        doc["details"] = details
    return orjson.dumps(doc)


def _fail(
    status: int,
    message: str,
    method: str,
    path: str,
    reason: str = "",
    headers: Mapping[str, str] | None = None,
    **details: Any,
) -> NoReturn:
    """Raise what the real client raises for this answer (never returns). `headers` reach
    `_raise_for` where it takes them (it reads Retry-After from them)."""
    raw = _status_body(status, message, reason, **details)
    if headers and _RAISE_TAKES_HEADERS:
        cast(Any, _raise_for)(status, raw, method, path, headers)
    _raise_for(status, raw, method, path)
    raise AssertionError("unreachable")  # pragma: no cover -- _raise_for always raises


_RAISE_TAKES_HEADERS: Final = len(inspect.signature(_raise_for).parameters) >= 5


def _copy(obj: _T) -> _T:
    """A deep copy through JSON: what a round trip to the server gives (and a check that the
    body is JSON at all)."""
    copied: _T = orjson.loads(orjson.dumps(obj))
    return copied


def _stamp(epoch: float) -> str:
    """Epoch seconds as the server writes metadata times (RFC 3339, whole seconds, UTC)."""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- merge patch and selectors -------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: maps merge recursively, `null` removes a key, anything else
    (lists included) replaces. Returns a new value; neither argument is changed."""
    if not isinstance(patch, dict):
        return _copy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _field(obj: Obj, dotted: str) -> str:
    """The value at a dotted path as a field selector compares it ("" when absent)."""
    cur: Any = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def field_matcher(selector: str, allowed: frozenset[str] | None = None) -> Callable[[Obj], bool]:
    """A predicate for a field selector: `a.b=v,c!=w` (also `==`). Raises `ValueError` for a
    malformed term or, when `allowed` is given, a field outside it (and metadata.name/namespace)."""
    terms: list[tuple[str, bool, str]] = []
    for raw in filter(None, (t.strip() for t in selector.split(","))):
        m = re.fullmatch(r"([^=!]+?)\s*(==|=|!=)\s*(.*)", raw)
        if m is None:
            raise ValueError(f"invalid field selector: {raw!r}: expected <field>=<value>")
        field = m[1].strip()
        if allowed is not None and field not in allowed and field not in _META_FIELDS:
            raise ValueError(f"field label not supported: {field}")
        terms.append((field, m[2] != "!=", m[3].strip()))
    return lambda obj: all((_field(obj, f) == v) == eq for f, eq, v in terms)


def _split_terms(selector: str) -> Iterator[str]:
    depth, start = 0, 0
    for i, ch in enumerate(selector):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            yield selector[start:i].strip()
            start = i + 1
    yield selector[start:].strip()


def label_matcher(selector: str) -> Callable[[Obj], bool]:
    """A predicate for a label selector: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`,
    `k`, `!k`, comma-separated (all must hold). Raises `ValueError`."""
    reqs: list[tuple[str, str, frozenset[str]]] = []  # (key, operator, values)
    for term in filter(None, _split_terms(selector)):
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", term):
            values = frozenset(v.strip() for v in m[3].split(",") if v.strip())
            reqs.append((m[1], m[2], values))
        elif m := re.fullmatch(r"([^=!\s]+)\s*(==|=|!=)\s*(\S*)", term):
            reqs.append((m[1], "notin" if m[2] == "!=" else "in", frozenset({m[3]})))
        elif m := re.fullmatch(r"(!?)\s*([^=!\s()]+)", term):
            reqs.append((m[2], "!" if m[1] else "exists", frozenset()))
        else:
            raise ValueError(f"unable to parse requirement: {term!r}")

    def holds(labels: dict[str, str], key: str, op: str, values: frozenset[str]) -> bool:
        if op == "exists":
            return key in labels
        if op == "!":
            return key not in labels
        # `!=` and notin also match objects without the label, as in Kubernetes
        return (labels.get(key) in values) == (op == "in")

    def match(obj: Obj) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(holds(labels, k, op, vs) for k, op, vs in reqs)

    return match


# --- the store's change log and open watches -----------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Change:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    res: ResKey
    obj: Obj
    old: Obj | None


class _Watch:
    """One open watch stream: an async iterator of JSON event lines, like aiohttp's reader."""

    def __init__(
        self,
        fake: FakeKube,
        target: _Path,
        match: Callable[[Obj], bool],
        *,
        bookmarks: bool,
        timeout: float | None,
        read_timeout: float,
        path: str,
    ) -> None:
        self.owner = fake
        self._target = target
        self._path = path
        self._read_timeout = read_timeout
        self._match = match
        self._bookmarks = bookmarks
        self._deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        self._queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self._last_bookmark = self._last_sent = asyncio.get_running_loop().time()
        self.closed = False

    def push_line(self, line: bytes) -> None:
        self._queue.put_nowait(line)

    def end(self, error: BaseException | None = None) -> None:
        self._queue.put_nowait(error)

    def offer(self, change: _Change) -> None:
        """Queue the event this change means for this watch, if any."""
        line = self.line_for(change)
        if line is not None:
            self._queue.put_nowait(line)

    def line_for(self, change: _Change) -> bytes | None:
        if change.res != self._target.res:
            return None
        ns = self._target.namespace
        if ns and change.obj["metadata"].get("namespace", "") != ns:
            return None
        now = self._match(change.obj)
        before = change.old is not None and self._match(change.old)
        etype = change.type
        if etype == "MODIFIED":
            if now and not before:
                etype = "ADDED"
            elif before and not now:
                etype = "DELETED"
            elif not now:
                return None
        elif not now:
            return None
        obj = self.owner._present(change.obj, self._target, listed=False)
        return orjson.dumps({"type": etype, "object": obj}) + b"\n"

    def __aiter__(self) -> _Watch:
        return self

    async def __anext__(self) -> bytes:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if self.closed or (self._deadline is not None and now >= self._deadline):
                self.closed = True
                raise StopAsyncIteration
            silent_until = self._last_sent + self._read_timeout
            if now >= silent_until:
                self.closed = True
                raise errors.KubeUnavailable(
                    f"WATCH {self._path}: {self.owner.host} sent nothing for {self._read_timeout} s"
                )
            if self.owner.stalled:  # a silent connection: nothing arrives, not even the end
                await asyncio.sleep(min(0.05, silent_until - now))
                continue
            wake = [silent_until]
            if self._deadline is not None:
                wake.append(self._deadline)
            if self._bookmarks:
                wake.append(self._last_bookmark + self.owner.bookmark_interval)
            try:
                async with asyncio.timeout(max(0.0, min(wake) - now)):
                    item = await self._queue.get()
            except TimeoutError:
                now = loop.time()
                if self._bookmarks and now >= self._last_bookmark + self.owner.bookmark_interval:
                    self._last_bookmark = self._last_sent = now
                    return self.owner._bookmark_line(self._target)
                continue
            if item is None:
                self.closed = True
                raise StopAsyncIteration
            if isinstance(item, BaseException):
                self.closed = True
                raise item
            self._last_sent = loop.time()
            return item


# --- the fake server -----------------------------------------------------------------------------


class _Versions:
    """The server's resourceVersion counter, shared by every client of one fake server."""

    def __init__(self) -> None:
        self.rv = 0
        #: Every change with a resourceVersion above this is in the watch history.
        self.floor = 0


#: FakeKube attributes that make up the server; clients made by `FakeKube.client()` share them.
_SHARED: Final = (
    "_server",
    "status_subresource",
    "_field_labels",
    "_admission",
    "_store",
    "_kinds",
    "_history",
    "_watches",
    "_snapshots",
    "_tokens",
)


class FakeKube(Kube):
    """An in-memory API server with the `Kube` interface. See the module docstring.

    `history`: how many changes a watch can resume over (older resourceVersions get 410);
    `bookmark_interval`: seconds between BOOKMARK events on watches that allow them;
    `request_timeout`: the client's per-request limit in seconds (a `hang()` past it raises
    KubeUnavailable, as the real client's timeout does); `validate_names`: enforce DNS-1123
    subdomain names (422), as the server does for nearly every resource; `wall`: the clock of
    creation and deletion timestamps (epoch seconds; a virtual-time test passes its loop's).
    """

    def __init__(
        self,
        *,
        history: int = 10_000,
        bookmark_interval: float = 1.0,
        request_timeout: float = 30.0,
        validate_names: bool = True,
        status_subresource: frozenset[str] = STATUS_SUBRESOURCE,
        wall: Callable[[], float] = time.time,
    ) -> None:
        # No super().__init__(): there is no HTTP session to open.
        self.host = "https://fake-kube.invalid"
        #: the server's clock (epoch seconds) for creation and deletion timestamps
        self.wall = wall
        self.bookmark_interval = bookmark_interval
        self.request_timeout = request_timeout
        self.validate_names = validate_names
        self.status_subresource = set(status_subresource)
        self._field_labels: dict[str, frozenset[str] | None] = dict(FIELD_LABELS)
        #: While true, every request and open watch fails as if the server were unreachable.
        self.down = False
        #: While true, this client's open watches receive nothing (a silent connection): after
        #: the stream's `read_timeout` they fail with KubeUnavailable, as the real client's do.
        self.stalled = False
        #: Every request, in order (bodies as sent).
        self.requests: list[Request] = []
        self.counts: Counter[tuple[str, str]] = Counter()
        self._observers: list[Callable[[Request], None]] = []
        self._faults: list[_Fault] = []
        self._admission: dict[str, list[Admission]] = {}
        self._store: dict[ResKey, dict[ObjKey, Obj]] = {}
        self._kinds: dict[ResKey, str] = {}
        self._server = _Versions()
        self._history: deque[_Change] = deque(maxlen=max(1, history))
        self._watches: set[_Watch] = set()
        self._snapshots: dict[str, list[Obj]] = {}
        self._tokens = itertools.count(1)

    # --- Kube interface --------------------------------------------------------------------------

    async def close(self) -> None:
        """End this client's open watches; the server and its other clients stay usable."""
        for watch in [w for w in self._watches if w.owner is self]:
            watch.end()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        body: Any = None,
        content_type: str = JSON,
        timeout: float | None = None,  # noqa: ASYNC109 -- the client's limit, mimicked
    ) -> Obj:
        """One API call, answered from memory; raises what `Kube.request` raises."""
        params = dict(params or {})
        if isinstance(body, bytes):
            body = orjson.loads(body)
        body = None if body is None else _copy(body)
        target = parse_path(path)
        verb = _verb(method, target, params)
        self._observe(method, path, verb, target, params, body)
        limit = self.request_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                return await self._serve(method, path, verb, target, params, body, content_type)
        except TimeoutError as exc:
            raise errors.KubeUnavailable(
                f"{method} {path}: no answer from the API server at {self.host} within {limit} s"
            ) from exc

    @asynccontextmanager
    async def stream(
        self, path: str, *, params: Mapping[str, str | int], read_timeout: float
    ) -> AsyncIterator[Any]:
        """A WATCH: yields an async iterator of JSON event lines (bytes), as `Kube.stream` does."""
        params = dict(params)
        target = parse_path(path)
        self._observe("WATCH", path, "watch", target, params, None)
        fault = self._take_fault("WATCH", path)
        if fault is not None:
            await self._apply_fault(fault, "WATCH", path)
        self._check_up("WATCH", path)
        self._check_scope(target, "WATCH", path)
        watch = self._open_watch(target, params, path, read_timeout)
        try:
            yield watch
        finally:
            watch.closed = True
            self._watches.discard(watch)

    # --- test controls ---------------------------------------------------------------------------

    def fail(
        self,
        method: str = "*",
        path: str = "/",
        *,
        status: int,
        times: int = 1,
        reason: str = "",
        message: str = "",
        retry_after: int | None = None,
        after: bool = False,
    ) -> None:
        """Make the next `times` requests whose method is `method` ("*": any; WATCH for watches)
        and whose path starts with `path` fail with `status`. `after=True`: the write is applied
        first and only the answer fails (a lost reply). `retry_after` (seconds) is sent as the
        server sends it with 429/503: a Retry-After header and the Status's
        `details.retryAfterSeconds`."""
        self._faults.append(
            _Fault(
                method.upper(),
                path,
                times,
                status=status,
                reason=reason,
                message=message,
                retry_after=retry_after,
                after=after,
            )
        )

    def hang(
        self,
        method: str = "*",
        path: str = "/",
        *,
        seconds: float,
        times: int = 1,
        after: bool = False,
    ) -> None:
        """Stall the next `times` matching requests for `seconds` (past the request timeout the
        client gets KubeUnavailable). `after=True`: the write is applied before the stall."""
        self._faults.append(_Fault(method.upper(), path, times, delay=seconds, after=after))

    def clear_faults(self) -> None:
        self._faults.clear()

    def client(self) -> FakeKube:
        """Another client of the same server, such as a second replica or the scheduler: it has
        its own faults, `down` switch, request log and counts, and shares the objects, the
        resourceVersion, the watch history, admission hooks and selectable fields."""
        other = FakeKube(
            bookmark_interval=self.bookmark_interval,
            request_timeout=self.request_timeout,
            validate_names=self.validate_names,
            wall=self.wall,
        )
        for name in _SHARED:
            setattr(other, name, getattr(self, name))
        return other

    def set_down(self, down: bool = True) -> None:
        """Cut this client off the server (every request fails, its open watches break), or
        reconnect it. Other clients of the server (`client()`) are not affected."""
        self.down = down
        if down:
            for watch in [w for w in self._watches if w.owner is self]:
                watch.end(errors.KubeUnavailable(f"WATCH: connection to {self.host} failed: reset"))

    def on_request(self, observer: Callable[[Request], None]) -> None:
        """Call `observer(request)` for every request, before it is answered."""
        self._observers.append(observer)

    def count(self, verb: str, resource: str) -> int:
        """How many `verb` requests (get, list, watch, create, update, patch, delete) were made
        on `resource` (a plural, or `<plural>/status`)."""
        return self.counts[(verb, resource)]

    def reset_counts(self) -> None:
        self.counts.clear()
        self.requests.clear()

    def admit(self, plural: str, hook: Admission) -> None:
        """Run `hook` on every CREATE/UPDATE/DELETE of `plural` through the API (not on
        `add`/`edit`/`remove`)."""
        self._admission.setdefault(plural, []).append(hook)

    def selectable(self, plural: str, *fields: str) -> None:
        """Accept field selectors on `plural` for exactly `fields` (plus metadata.name and
        metadata.namespace), as a CRD's `selectableFields` does; no fields: accept any path."""
        self._field_labels[plural] = frozenset(fields) if fields else None

    def compact(self) -> None:
        """Forget the watch history: a watch from any resourceVersion older than now gets 410."""
        self._history.clear()
        self._server.floor = self._server.rv
        self._snapshots.clear()

    def end_watches(self) -> None:
        """End every open watch (of every client) cleanly, as a server-side timeout or an
        apiserver restart does."""
        for watch in list(self._watches):
            watch.end()

    def bookmark(self) -> None:
        """Send a BOOKMARK now on every open watch that allows them."""
        for watch in list(self._watches):
            if watch._bookmarks:
                watch.push_line(self._bookmark_line(watch._target))

    @property
    def resource_version(self) -> str:
        return str(self._server.rv)

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    def objects(self, plural: str, namespace: str | None = None) -> list[Obj]:
        """Copies of the stored objects of `plural` (any group), sorted by namespace and name."""
        out = [
            _copy(obj)
            for (_, pl), objs in self._store.items()
            if pl == plural
            for key, obj in sorted(objs.items())
            if namespace is None or key[0] == namespace
        ]
        return out

    def get_obj(self, path: str) -> Obj | None:
        """A copy of the object at `path`, or None."""
        target = parse_path(path)
        obj = self._store.get(target.res, {}).get((target.namespace, target.name))
        return None if obj is None else _copy(obj)

    def add(self, collection: str, obj: Obj) -> Obj:
        """Create directly, as another writer: no faults, counts or admission; status is kept."""
        target = parse_path(collection)
        return _copy(self._create(target, _copy(obj), "POST", collection, keep_status=True))

    def edit(self, path: str, change: Callable[[Obj], None]) -> Obj | None:
        """Change a stored object as another writer would (the scheduler allocating a claim, the
        kubelet reporting status): `change` edits a copy in place, any field including status.
        Bumps the resourceVersion and notifies watches; removing the last finalizer of an object
        being deleted deletes it (then None is returned). Raises KubeNotFound if absent."""
        target = parse_path(path)
        old = self._existing(target, "PUT", path)
        new = _copy(old)
        change(new)
        new.setdefault("metadata", {})["resourceVersion"] = old["metadata"]["resourceVersion"]
        stored = self._write(target, old, new, "PUT", path)
        return None if stored is None else _copy(stored)

    def remove(self, path: str) -> None:
        """Delete as another writer: honours finalizers like DELETE. Raises KubeNotFound."""
        target = parse_path(path)
        self._delete(target, None, "DELETE", path, admit=False)

    # --- internals: requests ---------------------------------------------------------------------

    def _observe(
        self,
        method: str,
        path: str,
        verb: str,
        target: _Path,
        params: Mapping[str, str | int],
        body: Any,
    ) -> None:
        resource = f"{target.plural}/{target.sub}" if target.sub else target.plural
        req = Request(method, path, verb, resource, dict(params), body)
        self.requests.append(req)
        self.counts[(verb, resource)] += 1
        for observer in self._observers:
            observer(req)

    def _check_up(self, method: str, path: str) -> None:
        if self.down:
            raise errors.KubeUnavailable(
                f"{method} {path}: cannot reach the API server at {self.host}: "
                "ClientConnectorError: connection refused (FakeKube is down)"
            )

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.matches(method, path):
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    async def _apply_fault(self, fault: _Fault, method: str, path: str) -> None:
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.status:
            details: dict[str, Any] = {}
            headers: dict[str, str] = {}
            if fault.retry_after is not None:  # the server sends both
                details["retryAfterSeconds"] = fault.retry_after
                headers["Retry-After"] = str(fault.retry_after)
            _fail(
                fault.status,
                fault.message or f"injected failure ({fault.status})",
                method,
                path,
                fault.reason,
                headers,
                **details,
            )

    async def _serve(
        self,
        method: str,
        path: str,
        verb: str,
        target: _Path,
        params: dict[str, str | int],
        body: Any,
        content_type: str,
    ) -> Obj:
        fault = self._take_fault(method, path)
        if fault is not None and not fault.after:
            await self._apply_fault(fault, method, path)
        self._check_up(method, path)
        await asyncio.sleep(0)  # a request is never answered synchronously
        answer = self._dispatch(method, path, verb, target, params, body, content_type)
        if fault is not None and fault.after:
            await self._apply_fault(fault, method, path)
        return answer

    def _dispatch(
        self,
        method: str,
        path: str,
        verb: str,
        target: _Path,
        params: dict[str, str | int],
        body: Any,
        content_type: str,
    ) -> Obj:
        self._check_scope(target, method, path)
        if verb == "list":
            return self._list(target, params, path)
        if verb == "watch":
            _fail(400, "use stream() for watches", method, path)
        if target.sub and target.plural not in self.status_subresource:
            _fail(404, f"the server could not find the requested resource ({path})", method, path)
        if verb == "get":
            return self._present(self._existing(target, method, path), target, listed=False)
        if not isinstance(body, dict) and method in ("POST", "PUT", "PATCH"):
            _fail(400, "the request body must be a JSON object", method, path)
        if verb == "create":
            if target.sub:
                _fail(
                    405,
                    "the server does not allow this method on the requested resource",
                    method,
                    path,
                )
            return self._present(self._create(target, body, method, path), target, listed=False)
        if verb == "update":
            return self._answer(self._update(target, body, method, path), target)
        if verb == "patch":
            return self._answer(self._patch(target, body, content_type, method, path), target)
        if verb == "delete":
            return self._answer(self._delete(target, body, method, path, admit=True), target)
        _fail(405, f"method {method} not allowed on {path}", method, path)

    def _check_scope(self, target: _Path, method: str, path: str) -> None:
        """404 for a path of the wrong scope for a well-known plural (405 for a POST to an
        all-namespace collection of a namespaced one), as the server answers."""
        if target.plural in CLUSTER_SCOPED and target.namespace:
            _fail(404, f"the server could not find the requested resource ({path})", method, path)
        if target.plural in NAMESPACED and not target.namespace and target.name:
            _fail(404, f"the server could not find the requested resource ({path})", method, path)
        if target.plural in NAMESPACED and not target.namespace and method == "POST":
            _fail(
                405, "the server does not allow this method on the requested resource", method, path
            )

    def _answer(self, result: Obj | None, target: _Path) -> Obj:
        """A deleted object's answer is a Status (what the server sends for most resources)."""
        if result is None:
            return {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {"name": target.name, "group": target.group, "kind": target.plural},
            }
        return self._present(result, target, listed=False)

    def _present(self, obj: Obj, target: _Path, *, listed: bool) -> Obj:
        """What the server sends for a stored object: a copy, in the path's apiVersion; list items
        of built-in kinds carry no kind/apiVersion (custom resources do)."""
        out: Obj = _copy(obj)
        if listed and _builtin(target.group):
            out.pop("kind", None)
            out.pop("apiVersion", None)
        else:
            out["apiVersion"] = target.api_version
            out.setdefault("kind", self._kind(target))
        return out

    def _kind(self, target: _Path) -> str:
        kind = self._kinds.get(target.res) or KINDS.get(target.plural)
        if kind:
            return kind
        singular = target.plural.removesuffix("es" if target.plural.endswith("ses") else "s")
        return singular[:1].upper() + singular[1:]

    def _existing(self, target: _Path, method: str, path: str) -> Obj:
        if not target.name:
            _fail(405, f"method {method} needs an object path, not {path}", method, path)
        obj = self._store.get(target.res, {}).get((target.namespace, target.name))
        if obj is None:
            _fail(
                404,
                f'{target.qualified} "{target.name}" not found',
                method,
                path,
                name=target.name,
                group=target.group,
                kind=target.plural,
            )
        return obj

    # --- internals: writes -----------------------------------------------------------------------

    def _bump(self) -> int:
        self._server.rv += 1
        return self._server.rv

    def _record(self, change: _Change) -> None:
        if len(self._history) == self._history.maxlen:
            self._server.floor = self._history[0].rv
        self._history.append(change)
        for watch in list(self._watches):
            watch.offer(change)

    def _admit(
        self, target: _Path, op: str, new: Obj, old: Obj | None, method: str, path: str
    ) -> None:
        for hook in self._admission.get(target.plural, []):
            try:
                hook(op, new, old)
            except Rejected as exc:
                _fail(exc.status, str(exc), method, path, exc.reason)

    def _create(
        self, target: _Path, body: Obj, method: str, path: str, *, keep_status: bool = False
    ) -> Obj:
        if target.name:
            _fail(405, f"POST needs a collection path, not {path}", method, path)
        meta = body.setdefault("metadata", {})
        if not isinstance(meta, dict):
            _fail(400, "metadata must be an object", method, path)
        body_ns = meta.get("namespace") or ""
        if target.namespace and body_ns and body_ns != target.namespace:
            _fail(
                400,
                "the namespace of the provided object does not match the namespace sent on the "
                "request",
                method,
                path,
            )
        if target.namespace:
            meta["namespace"] = target.namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = str(meta["generateName"]) + "".join(
                random.choices(_GENERATE_ALPHABET, k=5)  # noqa: S311 -- not a secret
            )
        kind = body.get("kind") or self._kind(target)
        body["kind"] = kind
        body["apiVersion"] = target.api_version
        name = str(meta.get("name") or "")
        if not name:
            self._invalid(
                target,
                kind,
                name,
                "metadata.name: Required value: name or generateName is required",
                method,
                path,
            )
        self._check_name(target, kind, name, method, path)
        if (
            not keep_status
            and target.plural in self.status_subresource
            and (target.plural not in _STATUS_ON_CREATE)
        ):
            body.pop("status", None)
        if not keep_status:
            self._admit(target, "CREATE", body, None, method, path)
        objs = self._store.setdefault(target.res, {})
        key = (target.namespace, name)
        if key in objs:
            _fail(
                409,
                f'{target.qualified} "{name}" already exists',
                method,
                path,
                "AlreadyExists",
                name=name,
                group=target.group,
                kind=target.plural,
            )
        if meta.get("resourceVersion"):
            _fail(400, "resourceVersion should not be set on objects to be created", method, path)
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(field, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _stamp(self.wall())
        meta["generation"] = 1
        meta["resourceVersion"] = str(self._bump())
        self._kinds.setdefault(target.res, str(kind))
        objs[key] = body
        self._record(_Change(self._server.rv, "ADDED", target.res, _copy(body), None))
        return body

    def _invalid(
        self, target: _Path, kind: str, name: str, detail: str, method: str, path: str
    ) -> None:
        group = f".{target.group}" if target.group else ""
        _fail(422, f'{kind}{group} "{name}" is invalid: {detail}', method, path, "Invalid")

    def _check_name(self, target: _Path, kind: str, name: str, method: str, path: str) -> None:
        if self.validate_names and (len(name) > 253 or not _SUBDOMAIN.fullmatch(name)):
            self._invalid(
                target,
                kind,
                name,
                f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain must '
                "consist of lower case alphanumeric characters, '-' or '.', and must start and "
                "end with an alphanumeric character",
                method,
                path,
            )

    def _conflict(self, target: _Path, name: str, method: str, path: str) -> None:
        _fail(
            409,
            f'Operation cannot be fulfilled on {target.qualified} "{name}": the object has been '
            "modified; please apply your changes to the latest version and try again",
            method,
            path,
            "Conflict",
            name=name,
            group=target.group,
            kind=target.plural,
        )

    def _update(self, target: _Path, body: Obj, method: str, path: str) -> Obj | None:
        old = self._existing(target, method, path)
        self._check_identity(target, body, method, path)
        self._preconditions(target, old, body["metadata"], method, path)
        new = self._merge_rules(target, old, body)
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        self._admit(target, "UPDATE", new, _copy(old), method, path)
        return self._write(target, old, new, method, path)

    def _patch(
        self, target: _Path, body: Obj, content_type: str, method: str, path: str
    ) -> Obj | None:
        accepted = (MERGE_PATCH, STRATEGIC_PATCH) if _builtin(target.group) else (MERGE_PATCH,)
        if content_type not in accepted:
            _fail(
                415,
                f"the body of the request was in an unknown format - accepted media types "
                f"include: {', '.join(accepted)} (FakeKube models these; got {content_type})",
                method,
                path,
            )
        old = self._existing(target, method, path)
        patched = merge_patch(old, body)
        self._check_identity(target, patched, method, path)
        self._preconditions(target, old, patched["metadata"], method, path)
        new = self._merge_rules(target, old, patched)
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        self._admit(target, "UPDATE", new, _copy(old), method, path)
        return self._write(target, old, new, method, path)

    def _check_identity(self, target: _Path, body: Obj, method: str, path: str) -> None:
        """The name (and namespace, if given) in the body must be the URL's: 400 otherwise."""
        meta = body.get("metadata")
        if not isinstance(meta, dict):
            _fail(400, "the object has no metadata", method, path)
        name = str(meta.get("name") or "")
        if name != target.name:
            _fail(
                400,
                f"the name of the object ({name}) does not match the name on the URL "
                f"({target.name})",
                method,
                path,
            )
        if target.namespace and meta.get("namespace") not in (None, "", target.namespace):
            _fail(
                400,
                "the namespace of the provided object does not match the namespace sent on the "
                "request",
                method,
                path,
            )

    def _preconditions(
        self, target: _Path, old: Obj, meta: dict[str, Any], method: str, path: str
    ) -> None:
        """A resourceVersion or uid in the written metadata must be the stored one: 409."""
        if meta.get("uid") and meta["uid"] != old["metadata"]["uid"]:
            _fail(
                409,
                f"Precondition failed: UID in precondition: {meta['uid']}, UID in object meta: "
                f"{old['metadata']['uid']}",
                method,
                path,
                "Conflict",
            )
        rv = meta.get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            self._conflict(target, target.name, method, path)

    def _merge_rules(self, target: _Path, old: Obj, body: Obj) -> Obj:
        """The object an update of `target` (object or `/status`) with `body` stores: status
        subresource rules, and the metadata the client cannot change."""
        if target.sub == "status":
            new = _copy(old)
            if "status" in body:
                new["status"] = _copy(body["status"])
            else:
                new.pop("status", None)
            return new
        new = _copy(body)
        if target.plural in self.status_subresource:
            if "status" in old:
                new["status"] = _copy(old["status"])
            else:
                new.pop("status", None)
        meta = new.setdefault("metadata", {})
        for field in (
            "uid",
            "creationTimestamp",
            "namespace",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ):
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
            else:
                meta.pop(field, None)
        new["kind"] = old.get("kind")
        new["apiVersion"] = old.get("apiVersion")
        return new

    def _write(self, target: _Path, old: Obj, new: Obj, method: str, path: str) -> Obj | None:
        """Store `new` in place of `old` (same resourceVersion on both). A no-op writes nothing;
        a deleting object that lost its last finalizer is deleted. Returns what is stored, or the
        deleted object."""
        if new == old:
            return old
        meta = new["metadata"]
        if old["metadata"].get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old["metadata"].get("finalizers") or [])
            if added:
                self._invalid(
                    target,
                    str(old.get("kind", "")),
                    target.name,
                    "metadata.finalizers: Forbidden: no new finalizers can be added if the object "
                    f"is being deleted, found new finalizers {sorted(added)}",
                    method,
                    path,
                )
        self._check_name(target, str(new.get("kind", "")), target.name, method, path)
        if _generation_part(new) != _generation_part(old):
            meta["generation"] = int(old["metadata"].get("generation") or 0) + 1
        key = (target.namespace, target.name)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            gone = _copy(old)
            gone["metadata"]["resourceVersion"] = str(self._bump())
            del self._store[target.res][key]
            self._record(_Change(self._server.rv, "DELETED", target.res, gone, None))
            return gone
        meta["resourceVersion"] = str(self._bump())
        self._store[target.res][key] = new
        self._record(_Change(self._server.rv, "MODIFIED", target.res, _copy(new), _copy(old)))
        return new

    def _delete(
        self, target: _Path, body: Any, method: str, path: str, *, admit: bool
    ) -> Obj | None:
        if target.sub:
            _fail(
                405, "the server does not allow this method on the requested resource", method, path
            )
        old = self._existing(target, method, path)
        pre = (body.get("preconditions") or {}) if isinstance(body, dict) else {}
        if pre.get("uid") and pre["uid"] != old["metadata"]["uid"]:
            _fail(
                409,
                f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: "
                f"{old['metadata']['uid']}",
                method,
                path,
                "Conflict",
            )
        if (
            pre.get("resourceVersion")
            and pre["resourceVersion"] != old["metadata"]["resourceVersion"]
        ):
            _fail(
                409,
                f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                f"ResourceVersion in object meta: {old['metadata']['resourceVersion']}",
                method,
                path,
                "Conflict",
            )
        if admit:
            self._admit(target, "DELETE", _copy(old), _copy(old), method, path)
        key = (target.namespace, target.name)
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return old
            new = _copy(old)
            new["metadata"]["deletionTimestamp"] = _stamp(self.wall())
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            new["metadata"]["generation"] = int(old["metadata"].get("generation") or 0) + 1
            new["metadata"]["resourceVersion"] = str(self._bump())
            self._store[target.res][key] = new
            self._record(_Change(self._server.rv, "MODIFIED", target.res, _copy(new), _copy(old)))
            return new
        gone = _copy(old)
        gone["metadata"]["resourceVersion"] = str(self._bump())
        del self._store[target.res][key]
        self._record(_Change(self._server.rv, "DELETED", target.res, gone, None))
        return None

    # --- internals: reads ------------------------------------------------------------------------

    def _matcher(
        self, target: _Path, params: Mapping[str, str | int], method: str, path: str
    ) -> Callable[[Obj], bool]:
        try:
            by_field = field_matcher(
                str(params.get("fieldSelector") or ""), self._field_labels.get(target.plural)
            )
            by_label = label_matcher(str(params.get("labelSelector") or ""))
        except ValueError as exc:
            _fail(400, str(exc), method, path)
        return lambda obj: by_field(obj) and by_label(obj)

    def _matching(self, target: _Path, match: Callable[[Obj], bool]) -> list[Obj]:
        objs = self._store.get(target.res, {})
        return [
            obj
            for key, obj in sorted(objs.items())
            if (not target.namespace or key[0] == target.namespace) and match(obj)
        ]

    def _list(self, target: _Path, params: Mapping[str, str | int], path: str) -> Obj:
        token = str(params.get("continue") or "")
        if token:
            snap = self._snapshots.get(token.split(":", 1)[0])
            if snap is None:
                _fail(
                    410,
                    "The provided continue parameter is too old to display a consistent list "
                    "result. You can start a new list without the continue parameter.",
                    "GET",
                    path,
                    "Expired",
                )
            rv, items = int(token.split(":", 1)[1]), snap
        else:
            match = self._matcher(target, params, "GET", path)
            rv, items = (
                self._server.rv,
                [self._present(o, target, listed=True) for o in self._matching(target, match)],
            )
        limit = int(params.get("limit") or 0)
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        page = items
        if 0 < limit < len(items):
            page, rest = items[:limit], items[limit:]
            snap_id = base64.urlsafe_b64encode(f"s{next(self._tokens)}".encode()).decode()
            self._snapshots[snap_id] = rest
            while len(self._snapshots) > 64:
                del self._snapshots[next(iter(self._snapshots))]
            meta["continue"] = f"{snap_id}:{rv}"
            meta["remainingItemCount"] = len(rest)
        if token:
            self._snapshots.pop(token.split(":", 1)[0], None)
        return {
            "kind": f"{self._kind(target)}List",
            "apiVersion": target.api_version,
            "metadata": meta,
            "items": _copy(page),
        }

    def _bookmark_line(self, target: _Path) -> bytes:
        obj = {
            "kind": self._kind(target),
            "apiVersion": target.api_version,
            "metadata": {"resourceVersion": str(self._server.rv)},
        }
        return orjson.dumps({"type": "BOOKMARK", "object": obj}) + b"\n"

    def _open_watch(
        self, target: _Path, params: Mapping[str, str | int], path: str, read_timeout: float
    ) -> _Watch:
        if target.name:
            _fail(
                400,
                "FakeKube watches collections only; use a metadata.name fieldSelector",
                "WATCH",
                path,
            )
        match = self._matcher(target, params, "WATCH", path)
        timeout = params.get("timeoutSeconds")
        watch = _Watch(
            self,
            target,
            match,
            bookmarks=str(params.get("allowWatchBookmarks", "")).lower() == "true",
            timeout=float(timeout) if timeout not in (None, "", 0, "0") else None,
            read_timeout=read_timeout,
            path=path,
        )
        rv_param = str(params.get("resourceVersion") or "")
        if rv_param in ("", "0"):
            for obj in self._matching(target, match):
                watch.push_line(
                    orjson.dumps(
                        {"type": "ADDED", "object": self._present(obj, target, listed=False)}
                    )
                    + b"\n"
                )
        else:
            since = int(rv_param)
            if since < self._server.floor:
                status = orjson.loads(
                    _status_body(
                        410,
                        f"too old resource version: {since} ({self._server.floor + 1})",
                        "Expired",
                    )
                )
                watch.push_line(orjson.dumps({"type": "ERROR", "object": status}) + b"\n")
                watch.end()
                return watch
            for change in self._history:
                if change.rv > since:
                    line = watch.line_for(change)
                    if line is not None:
                        watch.push_line(line)
        self._watches.add(watch)
        return watch


def _verb(method: str, target: _Path, params: Mapping[str, str | int]) -> str:
    if method == "GET":
        if str(params.get("watch", "")).lower() in ("true", "1"):
            return "watch"
        return "get" if target.name else "list"
    return {
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete",
        "WATCH": "watch",
    }.get(method, method.lower())


def _builtin(group: str) -> bool:
    return group == "" or group.endswith(".k8s.io") or "." not in group


def _generation_part(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "kind", "apiVersion")}
