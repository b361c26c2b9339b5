"""CoHDI's configuration as our source (`--cohdi-config-namespace`): ConfigMap `composable-dra-dds`
and Secret `composable-dra-secret` in CoHDI's formats (validated by `agent.model.cohdi`), read at
start and then watched.

What they give: the fabric models (`device-info[].cdi-model-name`), the fabric manager's
credentials (`username`, `password`, `realm`, `client_id`, `client_secret`) and its CA
(`certificate`). Where CoHDI keeps the fabric manager's address — its deployment's variables
`CDI_ENDPOINT`, `TENANT_ID`, `CLUSTER_ID`, `USE_CM` — they are read from our environment, unless
`--fabric-url`, `--fabric-tenant`, `--fabric-cm-cluster` say otherwise. The backend is `fti`.

Changes while running (CoHDI's driver reads the ConfigMap once; we watch both objects):
- credentials: applied at once (the cached token is dropped; the next call logs in anew);
- models: applied at once (the next fabric read asks the new models' free counts);
- a model's `dra-attributes`: applied at once to its pool devices (vendor-driver mode: the
  vendor's `productName` and the rest, as CoHDI's driver publishes them);
- certificate: the new CA is trusted at once for new connections; the old one stays trusted
  until a restart;
- an invalid change is refused (logged, and /readyz names it); the last good configuration
  stays in force. A deleted ConfigMap or Secret likewise keeps the last one read.
Nothing in them needs a restart except to stop trusting an old CA; the endpoint, tenant and
cluster are variables of the process and change with a restart by nature.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import yaml

from agent import errors, logs, settings
from agent.fabric.credentials import Secret
from agent.fabric.fti import FtiFabric
from agent.fabric.metering import MeteredFabric
from agent.fabric.protocol import FabricManager
from agent.fabric.transport import FabricHttp
from agent.kube.client import Kube, Obj
from agent.kube.watching import Informer
from agent.model import cohdi

logger = logging.getLogger(__name__)

FLAG = "--cohdi-config-namespace"


def configmap_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/configmaps"


def secret_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/secrets"


def devices_of(obj: Obj, where: str) -> cohdi.Devices:
    """The ConfigMap's content, validated; ConfigError naming the key."""
    data = obj.get("data") or {}

    def load(key: str) -> Any:
        text = data.get(key)
        if text is None:
            return None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise errors.ConfigError(f"{where} {key}", text[:80], f"is not YAML ({exc})") from exc

    return cohdi.parse_devices(
        data.get("label-prefix"), load("device-info"), load("fabric-id-range"), where=where
    )


def credentials_of(obj: Obj, where: str) -> cohdi.Credentials:
    """The Secret's content (base64 `data`), validated; ConfigError naming the key."""
    decoded: dict[str, str] = {}
    for key, value in (obj.get("data") or {}).items():
        try:
            decoded[key] = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise errors.ConfigError(
                f"{where} {key}", "<secret>", f"is not base64 of UTF-8 text ({exc})"
            ) from exc
    return cohdi.parse_credentials(decoded, where=where)


class CohdiSource:
    """Reads CoHDI's objects (`load`), builds the fabric client from them (`open_fabric`) and
    keeps it up to date (`run`, a supervised unit of `cohdi-agent run`)."""

    def __init__(self, kube: Kube, namespace: str, *, environ: Mapping[str, str]) -> None:
        self.kube = kube
        self.namespace = namespace
        self.environ = environ
        self.cm_where = f"ConfigMap {namespace}/{cohdi.CONFIGMAP}"
        self.secret_where = f"Secret {namespace}/{cohdi.SECRET}"
        self.devices: cohdi.Devices | None = None
        self.credentials: cohdi.Credentials | None = None
        self.fabric: FtiFabric | None = None
        #: each model's `dra-attributes`, for the pool devices in vendor-driver mode (live)
        self.pool_attributes = cohdi.PoolAttributes()
        #: why the latest change was refused, "" when the objects in force are the latest
        self.error = ""
        self.applied = 0
        #: --vendor-driver (set by `settings_for`): every item's driver-name must be it
        self.vendor = ""
        self.synced = asyncio.Event()
        self._dirty = asyncio.Event()

    async def load(self) -> None:
        """Read and validate both objects now; ConfigError (exit 2) when one is missing or
        invalid."""
        cm = await self._get(configmap_path(self.namespace), cohdi.CONFIGMAP, self.cm_where)
        secret = await self._get(secret_path(self.namespace), cohdi.SECRET, self.secret_where)
        self.devices = devices_of(cm, self.cm_where)
        self.credentials = credentials_of(secret, self.secret_where)
        self.pool_attributes.set(self.devices)
        logger.info(
            "CoHDI configuration from namespace %s: models %s, fabric user %s, realm %s",
            self.namespace,
            ", ".join(self.devices.models),
            self.credentials.username,
            self.credentials.realm,
        )

    async def _get(self, collection: str, name: str, where: str) -> Obj:
        try:
            return await self.kube.get(f"{collection}/{name}")
        except errors.KubeNotFound:
            raise errors.ConfigError(FLAG, self.namespace, f"{where} does not exist") from None

    def settings_for(self, cfg: settings.Settings) -> settings.Settings:
        """`cfg` with the fabric settings CoHDI's configuration gives (after `load`)."""
        assert self.devices is not None
        assert self.credentials is not None
        dep = cohdi.parse_deployment(self.environ)
        self.vendor = cfg.cluster.vendor_driver
        self._check_vendor(self.devices)
        url = cfg.fabric.url or dep.endpoint
        if not url:
            raise errors.ConfigError(
                "--fabric-url", "", f"or CoHDI's CDI_ENDPOINT is required with {FLAG}"
            )
        tenant = cfg.fabric.tenant or dep.tenant
        if not tenant:
            raise errors.ConfigError(
                "--fabric-tenant", "", f"or CoHDI's TENANT_ID is required with {FLAG}"
            )
        fabric = dataclasses.replace(
            cfg.fabric,
            backend="fti",
            url=url,
            tenant=tenant,
            cm_cluster=cfg.fabric.cm_cluster or dep.cluster,
            user=self.credentials.username,
            realm=self.credentials.realm,
            client_id=self.credentials.client_id,
            models=",".join(self.devices.models),
        )
        return dataclasses.replace(cfg, fabric=fabric)

    def _check_vendor(self, devices: cohdi.Devices) -> None:
        """ConfigError when --vendor-driver is set and an item's `driver-name` differs: the pool
        would be published under another driver than the DeviceClass CoHDI's claims ask for."""
        for i, d in enumerate(devices.devices):
            if self.vendor and d.driver != self.vendor:
                raise errors.ConfigError(
                    "--vendor-driver",
                    self.vendor,
                    f"differs from {self.cm_where} device-info[{i}].driver-name {d.driver!r}: "
                    "the pool would be published under another driver than the DeviceClass "
                    "CoHDI's claims ask for",
                )

    def open_fabric(self, cfg: settings.FabricSettings) -> FabricManager:
        """The FTI client for `cfg` (from `settings_for`) with the Secret's password, client
        secret and CA."""
        assert self.credentials is not None
        creds = self.credentials
        http = FabricHttp(
            base_url=cfg.url,
            ca_bundle=cfg.ca_bundle,
            timeout=cfg.timeout,
            retries=cfg.retries,
            concurrency=cfg.concurrency,
            backend="fti",
        )
        self.fabric = FtiFabric(
            http,
            user=creds.username,
            password=Secret(creds.password),
            tenant=cfg.tenant,
            realm=creds.realm,
            client_id=creds.client_id,
            client_secret=Secret(creds.client_secret),
            models=tuple(m for m in cfg.models.split(",") if m),
            operation_timeout=cfg.operation_timeout,
            poll_interval=cfg.poll_interval,
        )
        if creds.certificate:
            self.fabric.trust_ca(creds.certificate, where=f"{self.secret_where} certificate")
        return MeteredFabric(self.fabric)

    # --- watching --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Watch both objects and apply every valid change to the fabric client."""
        field = "metadata.name="
        configmaps = Informer(
            self.kube,
            configmap_path(self.namespace),
            name="cohdi-configmap",
            field_selector=field + cohdi.CONFIGMAP,
        )
        secrets = Informer(
            self.kube,
            secret_path(self.namespace),
            name="cohdi-secret",
            field_selector=field + cohdi.SECRET,
        )
        for inf in (configmaps, secrets):
            inf.add_handler(lambda _e: self._dirty.set())
        async with asyncio.TaskGroup() as tg:
            tg.create_task(configmaps.run())
            tg.create_task(secrets.run())
            await configmaps.synced.wait()
            await secrets.synced.wait()
            self.synced.set()
            while True:
                await self._dirty.wait()
                self._dirty.clear()
                cm = configmaps.get(self.namespace, cohdi.CONFIGMAP)
                secret = secrets.get(self.namespace, cohdi.SECRET)
                self.apply(cm, secret)

    def apply(self, cm: Obj | None, secret: Obj | None) -> bool:
        """Validate the objects as they are now and apply what changed; False (and `error`
        set) when one is missing or invalid. Each object stands alone: an invalid (or deleted)
        one keeps its last good content in force while a valid change of the other is applied
        (a rotated password must not wait for an unrelated ConfigMap fix)."""
        assert self.devices is not None
        assert self.credentials is not None
        problems: list[errors.ConfigError] = []
        devices, creds = self.devices, self.credentials
        try:
            if cm is None:
                raise errors.ConfigError(FLAG, self.namespace, f"{self.cm_where} was deleted")
            devices = devices_of(cm, self.cm_where)
            self._check_vendor(devices)
        except errors.ConfigError as exc:
            problems.append(exc)
            devices = self.devices
        try:
            if secret is None:
                raise errors.ConfigError(FLAG, self.namespace, f"{self.secret_where} was deleted")
            creds = credentials_of(secret, self.secret_where)
            fabric, ca = self.fabric, creds.certificate
            if fabric is not None and ca and ca != self.credentials.certificate:
                # before anything is applied: a CA the TLS context refuses refuses the Secret
                fabric.trust_ca(ca, where=f"{self.secret_where} certificate")
        except errors.ConfigError as exc:
            problems.append(exc)
            creds = self.credentials
        self._apply(devices, creds)
        if problems:
            return self._refuse("; ".join(str(p) for p in problems))
        if self.error:
            logger.info("CoHDI configuration valid again (after: %s)", self.error)
        self.error = ""
        return True

    def _apply(self, devices: cohdi.Devices, creds: cohdi.Credentials) -> None:
        """Put valid `devices` and `creds` in force (nothing when nothing changed)."""
        if devices == self.devices and creds == self.credentials:
            return
        changed = [
            what
            for what, old, new in (
                ("models", self.devices and self.devices.models, devices.models),
                ("attributes", self.devices, devices),
                (
                    "credentials",
                    self.credentials and dataclasses.replace(self.credentials, certificate=""),
                    dataclasses.replace(creds, certificate=""),
                ),
                (
                    "certificate",
                    self.credentials and self.credentials.certificate,
                    creds.certificate,
                ),
            )
            if old != new
        ]
        if "models" in changed:
            changed.remove("attributes")
        if self.fabric is not None:
            self.fabric.reconfigure(
                user=creds.username,
                password=Secret(creds.password),
                realm=creds.realm,
                client_id=creds.client_id,
                client_secret=Secret(creds.client_secret),
                models=devices.models,
            )
        self.devices, self.credentials = devices, creds
        self.pool_attributes.set(devices)
        self.applied += 1
        logger.info(
            "CoHDI configuration changed (%s): applied%s",
            ", ".join(changed),
            "; the old CA stays trusted until a restart" if "certificate" in changed else "",
            extra=logs.fields(reason=",".join(changed)),
        )

    def _refuse(self, why: str) -> bool:
        """Refuse a change (logged once per reason, named in /readyz); the last good one stays."""
        if why != self.error:
            logger.error(
                "CoHDI configuration change refused, the last good one stays: %s",
                why,
                extra=logs.fields(error=why),
            )
        self.error = why
        return False

    # --- as a unit of `cohdi-agent run` ----------------------------------------------------------

    def not_ready(self) -> list[str]:
        reasons = [] if self.synced.is_set() else ["CoHDI configuration watch not synced"]
        if self.error:
            reasons.append(f"CoHDI configuration change refused: {self.error}")
        return reasons

    def serving(self) -> bool:
        return self.synced.is_set()

    def status(self) -> str:
        models = ", ".join(self.devices.models) if self.devices else "?"
        return f"cohdi-config {self.namespace}: models {models}" + (
            " (a change refused)" if self.error else ""
        )
