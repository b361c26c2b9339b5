"""Assemble and run the emulator: one aiohttp application serving Redfish, FTI and the admin API
on 127.0.0.1, over HTTPS with a CA generated for it when asked."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from aiohttp import web

from agent import pki
from agent.fabric.emulator.admin_api import AdminApi
from agent.fabric.emulator.cm_api import ClusterManagerConfig, CmApi
from agent.fabric.emulator.config import EmulatorConfig
from agent.fabric.emulator.fti_api import FtiApi
from agent.fabric.emulator.http import Credentials, fault_middleware
from agent.fabric.emulator.redfish_api import RedfishApi
from agent.fabric.emulator.state import EmulatorState

logger = logging.getLogger(__name__)


def make_tls(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """The CA in `directory` (made the first time, kept across restarts, so clients that trust it
    keep trusting a restarted emulator) and a fresh serving certificate for 127.0.0.1/localhost
    signed by it; returns the server context and the CA file clients should trust."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key, ca_cert = pki.load_or_make_ca(directory, "cohdi-fabric-emulator-ca")
    serving = pki.issue(
        directory,
        "emulator",
        ca_key=ca_key,
        ca_cert=ca_cert,
        cn="fabric-emulator",
        server_names=("127.0.0.1", "localhost"),
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(serving.cert), str(serving.key))
    return ctx, ca.cert


class EmulatorServer:
    def __init__(
        self,
        config: EmulatorConfig,
        *,
        state_file: Path | None = None,
        tls_dir: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
        cluster_manager: ClusterManagerConfig | None = None,
    ) -> None:
        self.config = config
        #: the cluster-manager side's cluster and node groups (tests change them while it runs)
        self.cluster_manager = cluster_manager or ClusterManagerConfig()
        self.state = EmulatorState(config, state_file=state_file, seed=seed)
        self.creds = Credentials(
            users=dict(config.users),
            session_timeout=config.session_timeout,
            token_ttl=config.token_ttl,
        )
        self.host = host
        self.port = port
        self.tls_dir = tls_dir
        self.ca_file: Path | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_dir else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(middlewares=[fault_middleware(self.state)])
        RedfishApi(self.state, self.creds).routes(app)
        FtiApi(self.state, self.creds).routes(app)
        CmApi(self.state, self.creds, self.cluster_manager).routes(app)
        AdminApi(self.state, self.creds).routes(app)
        return app

    async def start(self) -> str:
        ssl_ctx = None
        if self.tls_dir is not None:
            ssl_ctx, self.ca_file = make_tls(self.tls_dir)
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.host, self.port, ssl_context=ssl_ctx, reuse_address=True
        )
        await site.start()
        if self.port == 0:
            self.port = self._runner.addresses[0][1]
        self.state.resume()
        logger.info(
            "fabric emulator listening on %s (%d machines, %d devices)",
            self.url,
            len(self.state.machines),
            len(self.state.devices),
        )
        return self.url

    async def stop(self) -> None:
        await self.state.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
