"""Build the configured FabricManager from settings."""

from __future__ import annotations

from agent import errors, settings
from agent.fabric.credentials import load_secret
from agent.fabric.fti import FtiFabric
from agent.fabric.metering import MeteredFabric
from agent.fabric.protocol import FabricManager
from agent.fabric.redfish import RedfishFabric
from agent.fabric.transport import FabricHttp


def open_fabric(cfg: settings.FabricSettings) -> FabricManager:
    """The configured backend, its operations measured (`agent.fabric.metering`)."""
    return MeteredFabric(_open(cfg))


def _open(cfg: settings.FabricSettings) -> FabricManager:
    if not cfg.url:
        raise errors.ConfigError("--fabric-url", cfg.url, "is required to reach a fabric manager")
    http = FabricHttp(
        base_url=cfg.url,
        ca_bundle=cfg.ca_bundle,
        timeout=cfg.timeout,
        retries=cfg.retries,
        concurrency=cfg.concurrency,
        backend=cfg.backend,
    )
    password = load_secret(
        file=cfg.password_file,
        env_var="COHDI_FABRIC_PASSWORD",
        what="--fabric-password-file",
        credential="fabric-password",
    )
    if cfg.backend == "redfish":
        return RedfishFabric(
            http,
            user=cfg.user,
            password=password,
            operation_timeout=cfg.operation_timeout,
            poll_interval=cfg.poll_interval,
            processor_types=cfg.processor_types.split(","),
        )
    return FtiFabric(
        http,
        user=cfg.user,
        password=password,
        tenant=cfg.tenant,
        realm=cfg.realm,
        client_id=cfg.client_id,
        client_secret=load_secret(
            file=cfg.client_secret_file,
            env_var="COHDI_FABRIC_CLIENT_SECRET",
            what="--fabric-client-secret-file",
            credential="fabric-client-secret",
        ),
        models=tuple(m.strip() for m in cfg.models.split(",") if m.strip()),
        operation_timeout=cfg.operation_timeout,
        poll_interval=cfg.poll_interval,
    )
