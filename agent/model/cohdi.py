"""CoHDI's own configuration, validated with CoHDI's limits, as pure data.

- ConfigMap `composable-dra-dds` (CoHDI's DRA driver reads it at start, its scaler on every pass):
  `label-prefix` (a DNS-1123 subdomain of at most 100 characters), `fabric-id-range` (a list of
  at most 100 integers, optional) and `device-info`, a list whose items have `index` (0..10000,
  unique), `cdi-model-name` (the fabric manager's model, at most 1000 characters, unique),
  `dra-attributes` (at most 32 entries, keys qualified names with a name part of at most 63
  characters, values at most 64 characters, `productName` required; keys must also be DRA
  attribute names — a C identifier of at most 32 after the optional domain — since they are
  published on the pool devices), `driver-name` (a DNS
  subdomain of at most 63 characters), `k8s-device-name` (a DNS label of at most 50 characters,
  unique) and `cannot-coexist-with` (a list of at most 100 other items' indexes, required).
- Secret `composable-dra-secret`: `username`, `password`, `realm`, `client_id`,
  `client_secret` (each under 1000 bytes) and `certificate` (the fabric manager's CA, PEM, under
  10 kB).
- CoHDI's deployment variables: `CDI_ENDPOINT` (`https://`, at most 1000 bytes), `TENANT_ID` (a
  UUID), `CLUSTER_ID` (a UUID, required when `USE_CM` is true).

The YAML of `device-info` and `fabric-id-range` is decoded by the caller; every problem is a
`ConfigError` naming the object and the key (`ConfigMap composable-dra/composable-dra-dds
device-info[1].k8s-device-name`).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from agent import errors

CONFIGMAP: Final = "composable-dra-dds"
SECRET: Final = "composable-dra-secret"  # noqa: S105 -- an object name, not a password
#: The only label prefix we serve: our node labels are `cohdi.io/...`, as CoHDI's chart and its
#: operator hard-code them.
LABEL_PREFIX: Final = "cohdi.io"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    index: int
    #: the fabric manager's model string (`cdi-model-name`)
    model: str
    #: `dra-attributes`: the vendor attributes a pool device carries (all strings)
    attributes: dict[str, str]
    #: `driver-name`: the vendor's DRA driver (`gpu.nvidia.com`)
    driver: str
    #: `k8s-device-name` (`nvidia-l40s`)
    device_name: str
    cannot_coexist_with: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Devices:
    """What the ConfigMap holds."""

    label_prefix: str
    devices: tuple[DeviceInfo, ...]
    fabric_id_range: tuple[int, ...] = ()

    @property
    def models(self) -> tuple[str, ...]:
        """The fabric models, in `index` order."""
        return tuple(d.model for d in sorted(self.devices, key=lambda d: d.index))


class PoolAttributes:
    """The `dra-attributes` of each model (`cdi-model-name` -> attributes), live: the
    configuration source replaces them on every valid change and tells the current listener (the
    leader's publisher, which writes them onto its pool devices in vendor-driver mode)."""

    def __init__(self) -> None:
        self.by_model: dict[str, dict[str, str]] = {}
        self._listener: Callable[[], None] | None = None

    def set(self, devices: Devices) -> None:
        by_model = {d.model: dict(d.attributes) for d in devices.devices}
        if by_model != self.by_model:
            self.by_model = by_model
            if self._listener is not None:
                self._listener()

    def listen(self, listener: Callable[[], None]) -> None:
        """`listener` is called after each change (one listener: a new leader term replaces the
        last one's)."""
        self._listener = listener


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the Secret holds. `repr` never shows the password or the client secret."""

    username: str
    password: str
    realm: str
    client_id: str
    client_secret: str
    certificate: str

    def __repr__(self) -> str:
        return (
            f"Credentials(username={self.username!r}, realm={self.realm!r}, "
            f"client_id={self.client_id!r}, certificate={len(self.certificate)} bytes)"
        )


@dataclass(frozen=True, slots=True)
class Deployment:
    """CoHDI's deployment variables that say where the fabric manager is."""

    endpoint: str
    tenant: str
    cluster: str
    use_cm: bool


def _fail(where: str, value: Any, allowed: str) -> errors.ConfigError:
    shown = value if not isinstance(value, str) or len(value) <= 80 else value[:77] + "..."
    return errors.ConfigError(where, shown, allowed)


def _string(value: Any, where: str, *, limit: int, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(where, value, "must be a non-empty string")
    if len(value) > limit:
        raise _fail(where, value, f"must be at most {limit} characters (CoHDI's limit)")
    if pattern is not None and not pattern.match(value):
        raise _fail(where, value, f"must match {pattern.pattern}")
    return value


def _int(value: Any, where: str, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(where, value, f"must be an integer in {low}..{high}")
    return value


def parse_devices(
    label_prefix: Any, device_info: Any, fabric_id_range: Any = None, *, where: str
) -> Devices:
    """The ConfigMap's keys, already YAML-decoded (`fabric_id_range` None: absent)."""
    prefix = _string(label_prefix, f"{where} label-prefix", limit=100, pattern=_DNS_SUBDOMAIN)
    if prefix != LABEL_PREFIX:
        raise _fail(
            f"{where} label-prefix",
            prefix,
            f"cohdi-agent's node labels are {LABEL_PREFIX}/... (CoHDI's chart and operator "
            f"hard-code {LABEL_PREFIX} as well); another prefix is not supported",
        )
    ranges: tuple[int, ...] = ()
    if fabric_id_range is not None:
        if not isinstance(fabric_id_range, list) or len(fabric_id_range) > 100:
            raise _fail(f"{where} fabric-id-range", fabric_id_range, "a list of <= 100 integers")
        ranges = tuple(
            _int(v, f"{where} fabric-id-range[{i}]", low=0, high=2**31 - 1)
            for i, v in enumerate(fabric_id_range)
        )
    if not isinstance(device_info, list) or not device_info:
        raise _fail(f"{where} device-info", device_info, "must be a non-empty YAML list")
    devices = [_device(item, f"{where} device-info[{i}]") for i, item in enumerate(device_info)]
    for attr, what in (
        ("index", "index"),
        ("model", "cdi-model-name"),
        ("device_name", "k8s-device-name"),
    ):
        seen: dict[Any, int] = {}
        for i, d in enumerate(devices):
            value = getattr(d, attr)
            if value in seen:
                raise _fail(
                    f"{where} device-info[{i}].{what}",
                    value,
                    f"must be unique (device-info[{seen[value]}] has it too)",
                )
            seen[value] = i
    indexes = {d.index for d in devices}
    for i, d in enumerate(devices):
        for j, other in enumerate(d.cannot_coexist_with):
            if other not in indexes or other == d.index:
                raise _fail(
                    f"{where} device-info[{i}].cannot-coexist-with[{j}]",
                    other,
                    "must be the index of another device-info item",
                )
    return Devices(prefix, tuple(devices), ranges)


def _device(item: Any, where: str) -> DeviceInfo:
    if not isinstance(item, dict):
        raise _fail(where, item, "must be a mapping")
    attrs = item.get("dra-attributes")
    if not isinstance(attrs, dict) or len(attrs) > 32:
        raise _fail(f"{where}.dra-attributes", attrs, "must be a mapping of at most 32 entries")
    attributes: dict[str, str] = {}
    for key, value in attrs.items():
        at = f"{where}.dra-attributes.{key}"
        if not isinstance(key, str) or not _qualified(key):
            raise _fail(at, key, "must be a qualified name ([<DNS subdomain>/]<name of <= 63>)")
        if not _attribute_name(key):
            raise _fail(
                at,
                key,
                "must be a DRA device attribute name ([<DNS subdomain>/]<C identifier of <= 32>): "
                "the API server refuses a ResourceSlice with any other",
            )
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _fail(at, value, "must be a string")
        text = str(value)
        if len(text) > 64:
            raise _fail(at, text, "must be at most 64 characters (CoHDI's limit)")
        attributes[key] = text
    if "productName" not in attributes:
        raise _fail(f"{where}.dra-attributes", sorted(attributes), "must contain productName")
    coexist = item.get("cannot-coexist-with")
    if not isinstance(coexist, list) or len(coexist) > 100:
        raise _fail(
            f"{where}.cannot-coexist-with", coexist, "is required: a list of <= 100 indexes"
        )
    return DeviceInfo(
        index=_int(item.get("index"), f"{where}.index", low=0, high=10000),
        model=_string(item.get("cdi-model-name"), f"{where}.cdi-model-name", limit=1000),
        attributes=attributes,
        driver=_string(
            item.get("driver-name"), f"{where}.driver-name", limit=63, pattern=_DNS_SUBDOMAIN
        ),
        device_name=_string(
            item.get("k8s-device-name"), f"{where}.k8s-device-name", limit=50, pattern=_DNS_LABEL
        ),
        cannot_coexist_with=tuple(
            _int(v, f"{where}.cannot-coexist-with[{j}]", low=0, high=10000)
            for j, v in enumerate(coexist)
        ),
    )


_C_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _attribute_name(key: str) -> bool:
    """A ResourceSlice device attribute name (Kubernetes `validateQualifiedName` for devices):
    an optional domain of at most 63 characters, then a C identifier of at most 32."""
    domain, _, name = key.rpartition("/")
    if domain and len(domain) > 63:
        return False
    return len(name) <= 32 and bool(_C_IDENTIFIER.match(name))


def _qualified(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return len(name) <= 63 and bool(_QUALIFIED_NAME.match(name))


_SECRET_KEYS: Final = ("username", "password", "realm", "client_id", "client_secret")


def parse_credentials(data: Mapping[str, str], *, where: str) -> Credentials:
    """The Secret's keys, already base64-decoded. `username`, `password`, `realm` and
    `client_id` are required; `client_secret` and `certificate` may be empty (no client secret;
    the system's trust store)."""
    values: dict[str, str] = {}
    for key in _SECRET_KEYS:
        value = data.get(key, "")
        if key != "client_secret" and not value:
            raise _fail(f"{where} {key}", "", "is required")
        if len(value.encode()) >= 1000:
            raise _fail(f"{where} {key}", "<secret>", "must be under 1000 bytes (CoHDI's limit)")
        values[key] = value
    cert = data.get("certificate", "")
    if len(cert.encode()) >= 10_000:
        raise _fail(f"{where} certificate", f"{len(cert)} bytes", "must be under 10 kB")
    if cert and "-----BEGIN CERTIFICATE-----" not in cert:
        raise _fail(f"{where} certificate", cert[:40], "must be a PEM certificate")
    if cert:
        _check_pem(cert, f"{where} certificate")
    return Credentials(certificate=cert, **values)


_PEM_BLOCK: Final = re.compile(
    r"-----BEGIN CERTIFICATE-----\s*([A-Za-z0-9+/=\s]*?)\s*-----END CERTIFICATE-----"
)


def _check_pem(pem: str, where: str) -> None:
    """ConfigError unless `pem` is nothing but PEM certificate blocks, each the base64 of one
    DER SEQUENCE whose length covers it exactly (the outer shape of an X.509 certificate, RFC
    5280 section 4.1; RFC 7468 for the armour). PEM armour around garbage is refused when the
    Secret is read, not later when a TLS context loads it (and over plain http, never). Pure
    (no OpenSSL): the TLS context that later loads it is the full check."""
    blocks = _PEM_BLOCK.findall(pem)
    if not blocks or _PEM_BLOCK.sub("", pem).strip():
        raise _fail(where, pem[:40], "must be PEM certificates and nothing else")
    for i, body in enumerate(blocks):
        try:
            der = base64.b64decode("".join(body.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _fail(where, pem[:40], f"certificate {i + 1} is not base64 ({exc})") from exc
        if not _one_der_sequence(der):
            raise _fail(where, pem[:40], f"certificate {i + 1} is not a DER certificate")


def _one_der_sequence(der: bytes) -> bool:
    """`der` is exactly one DER SEQUENCE (tag 0x30, definite length)."""
    if len(der) < 2 or der[0] != 0x30:
        return False
    first = der[1]
    if first < 0x80:
        head, length = 2, first
    else:
        width = first & 0x7F
        if not 1 <= width <= 4 or len(der) < 2 + width:
            return False
        head, length = 2 + width, int.from_bytes(der[2 : 2 + width], "big")
    return head + length == len(der)


def parse_deployment(env: Mapping[str, str], *, where: str = "environment") -> Deployment:
    """CoHDI's `CDI_ENDPOINT`, `TENANT_ID`, `CLUSTER_ID`, `USE_CM` from `env` (the variables its
    DRA driver's Deployment sets); absent ones are "" / False."""
    endpoint = env.get("CDI_ENDPOINT", "")
    if endpoint and (not endpoint.startswith("https://") or len(endpoint.encode()) > 1000):
        raise _fail(f"{where} CDI_ENDPOINT", endpoint, "must start https:// (<= 1000 bytes)")
    tenant = env.get("TENANT_ID", "")
    if tenant and not _UUID.match(tenant):
        raise _fail(f"{where} TENANT_ID", tenant, "must be a UUID")
    use_cm = env.get("USE_CM", "false").strip().lower()
    if use_cm not in ("true", "false", "1", "0", ""):
        raise _fail(f"{where} USE_CM", use_cm, "must be true or false")
    cluster = env.get("CLUSTER_ID", "")
    cm = use_cm in ("true", "1")
    if cm and not _UUID.match(cluster):
        raise _fail(f"{where} CLUSTER_ID", cluster, "must be a UUID when USE_CM is true")
    return Deployment(endpoint, tenant, cluster if cm else "", cm)
