"""HTTP to fabric managers: one aiohttp session per backend, TLS verified (optional CA bundle),
a timeout on every call, errors mapped to the fabric branch of the error tree at one place, and
retries with exponential backoff for transient failures of calls that are safe to repeat.

Writes are not retried here: a lost answer to an attach means "unknown", and the backend re-reads
the device before deciding to send again (that is what makes attach idempotent).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import ssl
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict

from agent import connections, errors, health

logger = logging.getLogger(__name__)

#: Set by the polling watch, which reports reachability itself (one line per change of state):
#: its retries are logged at debug level instead of one warning each.
_quiet: contextvars.ContextVar[bool] = contextvars.ContextVar("fabric_quiet_retries", default=False)


@contextmanager
def quiet_retries() -> Iterator[None]:
    """Within this block (this task only), `FabricHttp.retrying` logs its attempts at debug."""
    token = _quiet.set(True)
    try:
        yield
    finally:
        _quiet.reset(token)


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    #: Case-insensitive, as HTTP header names are.
    headers: Mapping[str, str]
    body: bytes

    def json(self, what: str) -> Any:
        """The body as JSON, or `FabricProtocolError` naming the call and the body's start."""
        try:
            return orjson.loads(self.body) if self.body else {}
        except orjson.JSONDecodeError:
            start = self.body[:120].decode(errors="replace")
            raise errors.FabricProtocolError(
                f"{what}: the fabric manager answered {self.status} with a body that is not JSON: "
                f"{start!r}"
            ) from None


def ssl_context(ca_bundle: str) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca_bundle or None)
    except (OSError, ssl.SSLError) as exc:
        raise errors.ConfigError(
            "--fabric-ca-bundle", ca_bundle, f"is not a readable PEM CA bundle ({exc})"
        ) from exc


class FabricHttp:
    def __init__(
        self,
        *,
        base_url: str,
        ca_bundle: str = "",
        timeout: float = 30.0,
        retries: int = 5,
        concurrency: int = 32,
        backend: str = "",
    ) -> None:
        """`backend` ("redfish", "fti") labels this client's request metrics."""
        if not base_url.startswith(("https://", "http://")):
            raise errors.ConfigError("--fabric-url", base_url, "must be an http(s):// URL")
        self.base_url = base_url.rstrip("/")
        self.backend = backend or "unknown"
        self._ssl = ssl_context(ca_bundle) if base_url.startswith("https://") else None
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.retries = retries
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        #: Bounds fabric operations in flight across devices.
        self.slots = asyncio.Semaphore(concurrency)
        self._device_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def session(self) -> aiohttp.ClientSession:
        """The HTTP session, opened on first use. Raises `FabricUnavailable` after `close()`: a
        task still running when the client was closed must not open a session nobody closes."""
        if self._closed:
            raise errors.FabricUnavailable(f"the fabric client for {self.base_url} is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=connections.connector(self._ssl if self._ssl else True, limit=256),
                timeout=self._timeout,
            )
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    @asynccontextmanager
    async def device(self, device_id: str) -> AsyncIterator[None]:
        """Serialise operations on one device and bound them across devices."""
        async with self._device_locks[device_id], self.slots:
            yield

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 -- per-call aiohttp limit
    ) -> Reply:
        """One HTTP exchange. Connection problems and timeouts raise `FabricUnavailable` /
        `FabricTimeout`; every HTTP status is returned to the caller to interpret. Timed in
        `cohdi_fabric_http_request_seconds{backend,method,code}`; no answer or a status of 400
        and above counted in `cohdi_fabric_http_errors_total`."""
        started = time.monotonic()
        code = "none"
        try:
            reply = await self._call(
                method, path, json=json, data=data, headers=headers, params=params, timeout=timeout
            )
            code = str(reply.status)
            return reply
        finally:
            health.FABRIC_HTTP_SECONDS.labels(self.backend, method, code).observe(
                time.monotonic() - started
            )
            if code == "none" or int(code) >= 400:
                health.FABRIC_HTTP_ERRORS.labels(self.backend, method, code).inc()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any,
        data: Any,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
        timeout: float | None,  # noqa: ASYNC109 -- per-call aiohttp limit
    ) -> Reply:
        url = path if path.startswith("http") else self.base_url + path
        body = orjson.dumps(json) if json is not None else data
        hdrs = dict(headers or {})
        if json is not None:
            hdrs.setdefault("Content-Type", "application/json")
        try:
            async with self.session().request(
                method,
                url,
                data=body,
                headers=hdrs,
                params=params,
                timeout=aiohttp.ClientTimeout(total=timeout) if timeout else self._timeout,
            ) as resp:
                return Reply(resp.status, CIMultiDict(resp.headers), await resp.read())
        except TimeoutError as exc:
            raise errors.FabricTimeout(
                f"{method} {url}: no answer from the fabric manager within "
                f"{timeout or self._timeout.total} s"
            ) from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise errors.FabricRejected(
                f"{method} {url}: the fabric manager's TLS certificate is not trusted ({exc}); "
                "give its CA with --fabric-ca-bundle"
            ) from exc
        except aiohttp.ClientSSLError as exc:
            raise errors.FabricRejected(f"{method} {url}: TLS handshake failed: {exc}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise errors.FabricUnavailable(
                f"{method} {url}: cannot reach the fabric manager: {type(exc).__name__}: {exc}"
            ) from exc

    async def retrying(self, what: str, op: Any) -> Any:
        """Await `op()` until it succeeds, a permanent error, or `retries` transient failures."""
        delay = 0.1
        for attempt in range(1, self.retries + 1):
            try:
                return await op()
            except errors.AgentError as exc:
                if not exc.transient or attempt == self.retries:
                    raise
                logger.log(
                    logging.DEBUG if _quiet.get() else logging.WARNING,
                    "%s: %s (attempt %d of %d, next in %.1f s)",
                    what,
                    exc,
                    attempt,
                    self.retries,
                    delay,
                )
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")


def check_status(reply: Reply, what: str, message: str = "") -> None:
    """Map an unexpected HTTP status to the error tree (5xx/429 transient, 4xx permanent)."""
    if reply.status < 400:
        return
    detail = message or reply.body[:200].decode(errors="replace")
    text = f"{what}: the fabric manager answered {reply.status}: {detail}"
    if reply.status >= 500 or reply.status == 429:
        raise errors.FabricUnavailable(text)
    if reply.status in (401, 403):
        raise errors.FabricAuthError(text)
    if reply.status == 404:
        raise errors.DeviceNotFound(text)
    if reply.status == 409:
        raise errors.DeviceBusy(text)
    raise errors.FabricRejected(text)
