"""Health of this process: the one Prometheus registry, the readiness checks of each role, and the
HTTP endpoints that serve them (`/metrics`, `/healthz`, `/readyz`) on the metrics address.

- `/healthz` answers 200 `ok` whenever the event loop runs the handler: it says the process is
  alive and not wedged, nothing more (a kubelet liveness probe restarts us when it stops).
- `/readyz` runs every registered check. A check returns the reasons it is failing, one plain-text
  line each (an empty list means ready). 200 when none fails, else 503; the body has one line per
  check, `[+]name ok` or `[-]name: reason`, in the style of kube-apiserver's own `/readyz`.

The role checks (cluster: Lease campaign running and, while leading, informers synced and the
fabric reachable; node: plugin serving and first PCI scan done) are registered by `agent.app`;
this module knows nothing of roles, so every layer may import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

#: Every metric of the process (cluster and node role) lives here; `/metrics` serves it.
REGISTRY = CollectorRegistry(auto_describe=True)

ROLE_UP = Gauge(
    "cohdi_role_up",
    "1 while the role runs, 0 while it waits to be restarted after a failure.",
    ["role"],
    registry=REGISTRY,
)
ROLE_RESTARTS = Counter(
    "cohdi_role_restarts",
    "Times a role failed (raised or returned) and was restarted with backoff.",
    ["role"],
    registry=REGISTRY,
)
LOOP_UP = Gauge(
    "cohdi_loop_up",
    "1 while a loop of the cluster role runs (leader only), 0 otherwise.",
    ["loop"],
    registry=REGISTRY,
)
LOOP_RESTARTS = Counter(
    "cohdi_loop_restarts",
    "Times a loop of a role failed and was restarted with backoff, by loop and error class.",
    ["loop", "error"],
    registry=REGISTRY,
)

#: A readiness check: the reasons it fails now, one line each; empty when ready.
Check = Callable[[], list[str]]


class Health:
    """The named readiness checks of this process. Checks are called on every `/readyz`, so
    they only read state (flags, events, counters); they never do I/O."""

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}

    def add(self, name: str, check: Check) -> None:
        self._checks[name] = check

    def remove(self, name: str) -> None:
        self._checks.pop(name, None)

    def failing(self) -> dict[str, list[str]]:
        """Check name -> its reasons, for the checks that fail now. A check that raises is a bug;
        it is reported as failing with the exception, never hidden."""
        out: dict[str, list[str]] = {}
        for name, check in self._checks.items():
            try:
                reasons = check()
            except Exception as exc:  # a broken check must not break the endpoint
                reasons = [f"the check itself failed: {type(exc).__name__}: {exc}"]
            if reasons:
                out[name] = reasons
        return out

    def report(self) -> tuple[bool, str]:
        """(ready, plain-text body): one line per check, then a summary line."""
        failing = self.failing()
        lines: list[str] = []
        for name in sorted(self._checks):
            if name in failing:
                lines += [f"[-]{name}: {reason}" for reason in failing[name]]
            else:
                lines.append(f"[+]{name} ok")
        ready = not failing
        lines.append("readyz check passed" if ready else "readyz check failed")
        return ready, "\n".join(lines) + "\n"


async def serve(health: Health, *, address: str, port: int) -> Any:
    """Start `/metrics`, `/healthz` and `/readyz` on address:port (port 0 picks a free one; read
    it back with `bound_port`). Returns the aiohttp runner; `await runner.cleanup()` stops it.
    Raises OSError when the address cannot be bound (the caller reports it as a config error)."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_request: web.Request) -> web.Response:
        ready, body = health.report()
        return web.Response(text=body, status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, address, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: Any) -> int:
    """The TCP port a runner from `serve` listens on."""
    return int(runner.addresses[0][1])
