"""A raw-JSON Kubernetes API client over one aiohttp session.

Our own loader (`agent.kube.config`) reads kubeconfigs with certificates and tokens and the
in-cluster service account; kubernetes-asyncio loads only kubeconfigs with exec plugins or auth
providers. Requests go through our own aiohttp session and orjson, because the hot paths (watches
of claims and slices, pool publication) want raw dicts and fast JSON rather than generated model
objects. The Authorization header is asked for per request, so a rotated token file is read again
on the next request (a retry after 401 sends the new token). All HTTP failures are mapped to
`agent.errors.Kube*` here, and only here (`_raise_for`), keeping the answer's headers and its
Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final, NoReturn
from urllib.parse import quote

import aiohttp
import orjson
from multidict import CIMultiDict

from agent import connections, errors, health
from agent.backoff import parse_retry_after

logger = logging.getLogger(__name__)

JSON: Final = "application/json"
MERGE_PATCH: Final = "application/merge-patch+json"
STRATEGIC_PATCH: Final = "application/strategic-merge-patch+json"
APPLY_PATCH: Final = "application/apply-patch+yaml"

Obj = dict[str, Any]


class Kube:
    """Talks to one API server: `await Kube.connect(...)`, then `await close()` at the end."""

    def __init__(
        self,
        *,
        host: str,
        ssl_context: ssl.SSLContext,
        auth: Any,
        request_timeout: float,
        server_hostname: str | None = None,
        on_unauthorized: Callable[[], None] | None = None,
    ) -> None:
        self.host = host.rstrip("/")
        self._auth = auth  # -> the Authorization header value, asked per request (tokens rotate)
        #: Told of every 401, so credentials that are cached (exec plugins) are loaded afresh.
        self._on_unauthorized = on_unauthorized
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._server_hostname = server_hostname
        self._session = aiohttp.ClientSession(
            connector=connections.connector(ssl_context, limit=64),
            read_bufsize=2**22,  # one watch event line may carry a large object
            json_serialize=lambda o: orjson.dumps(o).decode(),
        )

    @classmethod
    async def connect(cls, *, kubeconfig: str = "", request_timeout: float = 30.0) -> Kube:
        """From `kubeconfig`; if empty: in-cluster service account, else $KUBECONFIG or
        ~/.kube/config. Our own loader covers certificates and tokens; kubeconfigs with exec
        plugins or auth providers go through kubernetes-asyncio's loader."""
        from agent.kube import config as kubeconfig_loader

        path, access = kubeconfig_loader.find(kubeconfig)  # start-up: a blocking read is fine
        if access is None:
            return await cls._connect_with_kubernetes_asyncio(path, request_timeout)
        return cls(
            host=access.host,
            ssl_context=access.ssl,
            auth=access.auth,
            request_timeout=request_timeout,
            server_hostname=access.server_hostname,
        )

    @classmethod
    async def _connect_with_kubernetes_asyncio(cls, path: str, request_timeout: float) -> Kube:
        from kubernetes_asyncio import config as kconfig
        from kubernetes_asyncio.client import Configuration

        cfg = Configuration()
        await _load_kubeconfig(kconfig, path, cfg)
        ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        if cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, keyfile=cfg.key_file)
        if not cfg.verify_ssl:
            raise errors.KubeConfigError(
                "the kubeconfig sets insecure-skip-tls-verify; cohdi-agent always verifies the API "
                "server: give the cluster's CA (certificate-authority) instead"
            )
        # The plugin's credential is loaded once and kept; after a 401 (it expired, or was
        # revoked) the whole kubeconfig is loaded again, which runs the plugin again.
        stale = asyncio.Event()

        async def auth() -> str | None:
            if stale.is_set():
                stale.clear()
                await _load_kubeconfig(kconfig, path, cfg)
            # kubernetes-asyncio keeps "Bearer <token>" under the BearerToken key.
            token: str | None = await cfg.get_api_key_with_prefix("BearerToken")
            return token

        return cls(
            host=str(cfg.host),
            ssl_context=ctx,
            auth=auth,
            request_timeout=request_timeout,
            server_hostname=cfg.tls_server_name,
            on_unauthorized=stale.set,
        )

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- requests --------------------------------------------------------------------------------

    async def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": JSON}
        if content_type:
            headers["Content-Type"] = content_type
        token = await self._auth()
        if token:
            headers["Authorization"] = token
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        body: Any = None,
        content_type: str = JSON,
        timeout: float | None = None,  # noqa: ASYNC109 -- per-request aiohttp limit, not a sleep
    ) -> Obj:
        """One API call; returns the decoded JSON answer. Raises `errors.Kube*`."""
        data = None if body is None else (body if isinstance(body, bytes) else orjson.dumps(body))
        headers = await self._headers(content_type if data is not None else None)
        tmo = self._timeout if timeout is None else aiohttp.ClientTimeout(total=timeout)
        try:
            async with self._session.request(
                method,
                self.host + path,
                params=params,
                data=data,
                headers=headers,
                timeout=tmo,
                server_hostname=self._server_hostname,
            ) as resp:
                raw = await resp.read()
                if resp.status >= 300:
                    self._fail(resp.status, raw, method, path, resp.headers)
                return orjson.loads(raw) if raw else {}
        except TimeoutError as exc:
            _no_answer(method, path)
            raise errors.KubeUnavailable(
                f"{method} {path}: no answer from the API server at {self.host} within "
                f"{tmo.total} s"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            _no_answer(method, path)
            raise errors.KubeUnavailable(
                f"{method} {path}: cannot reach the API server at {self.host}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _fail(
        self, status: int, raw: bytes, method: str, path: str, headers: Mapping[str, str]
    ) -> NoReturn:
        if status == 401 and self._on_unauthorized is not None:
            self._on_unauthorized()
        _raise_for(status, raw, method, path, headers)

    async def get(self, path: str, **params: str | int) -> Obj:
        return await self.request("GET", path, params=params or None)

    async def create(self, path: str, body: Obj) -> Obj:
        return await self.request("POST", path, body=body)

    async def replace(self, path: str, body: Obj) -> Obj:
        return await self.request("PUT", path, body=body)

    async def patch(self, path: str, body: Obj, *, content_type: str = MERGE_PATCH) -> Obj:
        return await self.request("PATCH", path, body=body, content_type=content_type)

    async def delete(self, path: str, *, body: Obj | None = None) -> Obj:
        return await self.request("DELETE", path, body=body)

    @asynccontextmanager
    async def stream(
        self, path: str, *, params: Mapping[str, str | int], read_timeout: float
    ) -> AsyncIterator[aiohttp.StreamReader]:
        """A streaming GET (a watch): yields the body reader; lines are JSON watch events.
        `read_timeout` bounds silence between chunks (bookmarks keep a healthy watch talking)."""
        headers = await self._headers(None)
        tmo = aiohttp.ClientTimeout(
            total=None, sock_connect=self._timeout.total, sock_read=read_timeout
        )
        try:
            async with self._session.get(
                self.host + path,
                params=params,
                headers=headers,
                timeout=tmo,
                server_hostname=self._server_hostname,
            ) as resp:
                if resp.status >= 300:
                    self._fail(resp.status, await resp.read(), "WATCH", path, resp.headers)
                yield resp.content
        except TimeoutError as exc:
            _no_answer("WATCH", path)
            raise errors.KubeUnavailable(
                f"WATCH {path}: {self.host} sent nothing for {read_timeout} s (or did not "
                f"connect within {self._timeout.total} s)"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            _no_answer("WATCH", path)
            raise errors.KubeUnavailable(
                f"WATCH {path}: connection to {self.host} failed: {type(exc).__name__}: {exc}"
            ) from exc


async def _load_kubeconfig(kconfig: Any, path: str, cfg: Any) -> None:
    """kubernetes-asyncio's loader into `cfg`, its errors mapped to `KubeConfigError`."""
    try:
        await kconfig.load_kube_config(config_file=path, client_configuration=cfg)
    except (kconfig.ConfigException, OSError, ValueError) as exc:
        raise errors.KubeConfigError(
            f"cannot load Kubernetes credentials from {path}: {exc}; pass --kubeconfig"
        ) from exc


def _no_answer(method: str, path: str) -> None:
    """Count a request that got no answer (`cohdi_kube_api_errors_total{code="none"}`)."""
    health.KUBE_API_ERRORS.labels(health.kube_api_verb(method, path), "none").inc()


def _raise_for(
    status: int,
    raw: bytes,
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
) -> NoReturn:
    """Map an HTTP error answer to the error tree. The server's Status message is kept verbatim
    (it names the field and the rule); non-JSON bodies are truncated. The headers travel on the
    error; on 429 and 5xx the wait the server asks for (the `Retry-After` header, else the
    Status's `details.retryAfterSeconds`) becomes `retry_after`. 401 is transient (a token that
    rotated is re-read on the retry), 403 permanent (RBAC). Counted in
    `cohdi_kube_api_errors_total{verb,code}`."""
    health.KUBE_API_ERRORS.labels(health.kube_api_verb(method, path), str(status)).inc()
    details: dict[str, Any] = {}
    try:
        doc = orjson.loads(raw)
        message = str(doc.get("message") or doc)
        reason = str(doc.get("reason") or "")
        details = doc.get("details") or {}
    except (orjson.JSONDecodeError, AttributeError):
        message = raw[:300].decode(errors="replace")
        reason = ""
    text = f"{method} {path}: {status} {reason or 'error'}: {message}"
    kept = CIMultiDict(headers) if headers is not None else CIMultiDict()
    cls: type[errors.KubeError]
    retry_after: float | None = None
    if status == 404:
        cls = errors.KubeNotFound
    elif status == 409:
        cls = errors.KubeAlreadyExists if reason == "AlreadyExists" else errors.KubeConflict
    elif status == 410:
        cls = errors.KubeGone
    elif status == 401:
        cls = errors.KubeUnauthorized
        text += (
            " (the token is re-read on the next request; if this persists, check the credentials)"
        )
    elif status == 403:
        cls = errors.KubeForbidden
    elif status in (400, 422):
        cls = errors.KubeInvalid
    elif status == 429 or status >= 500:
        cls = errors.KubeUnavailable
        retry_after = parse_retry_after(kept.get("Retry-After"))
        if retry_after is None and isinstance(details, dict):
            retry_after = _seconds(details.get("retryAfterSeconds"))
        if retry_after is not None:
            text += f" (the server asks to retry after {retry_after:g} s)"
    else:
        cls = errors.KubeInvalid
    raise cls(
        text,
        status=status,
        reason=reason,
        retry_after=retry_after,
        headers=kept,
    )


def _seconds(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and value >= 0 else None


def path_of(
    *, group: str, version: str, plural: str, namespace: str | None = None, name: str | None = None
) -> str:
    """The REST path of a collection or object: `/api/v1/...` for the core group."""
    base = f"/api/{version}" if group == "" else f"/apis/{group}/{version}"
    if namespace:
        base += f"/namespaces/{quote(namespace, safe='')}"
    base += f"/{plural}"
    if name:
        base += f"/{quote(name, safe='')}"
    return base
