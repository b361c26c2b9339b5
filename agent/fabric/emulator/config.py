"""The emulator's configuration file (YAML or JSON): fabrics, machines, device groups, users.

Example::

    tenant: 5f0c...                     # FTI tenant_uuid (optional)
    users: [{name: admin, password_env: COHDI_FABRIC_PASSWORD}]
    machines:
      - {id: m-node-a, name: node-a, fabric: fabric0}
    devices:
      - {model: NVIDIA-A100-PCIE-40GB, vendor: NVIDIA, memory: 42949672960, count: 8,
         fabric: fabric0, attach_latency: 0.2}

Or, instead of machines and devices, a DMTF mockup directory as the initial state (see
`agent/fabric/emulator/mockup.py`)::

    users: [{name: admin, password: ...}]
    mockup: {dir: /path/to/public-composability, attach_latency: 0.2}   # or just `mockup: <dir>`
    expand: false                       # a Redfish service without $expand (answers 501)

Every problem is reported with its path in the file (``devices[1].count: must be >= 0``).
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from agent import errors

if TYPE_CHECKING:
    from agent.fabric.emulator.mockup import Mockup

DEFAULT_TENANT = "00000000-0000-4000-8000-000000000000"


class EmulatorConfigError(errors.PermanentError):
    fault = "config"


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    id: str
    fabric: str
    model: str
    vendor: str
    memory: int
    serial: str
    pci_vendor: str
    pci_device: str
    attach_latency: float
    detach_latency: float
    #: Every resource zone the block is in (a mockup's `Links.Zones`); empty: just `fabric`.
    zones: tuple[str, ...] = ()
    #: The DMTF `ResourceBlockType`s of the block (the embedded default: GPUs, `Processor`).
    block_types: tuple[str, ...] = ("Processor",)


@dataclass(frozen=True, slots=True)
class MachineSpec:
    id: str
    name: str
    fabric: str
    #: Every resource zone the system is in (through its own blocks); empty: just `fabric`.
    zones: tuple[str, ...] = ()

    def can_reach(self, device: DeviceSpec) -> bool:
        """Whether `device` can be composed to this machine: a zone in common (or, with no zones
        given, the same fabric)."""
        if self.zones and device.zones:
            return bool(set(self.zones) & set(device.zones))
        return self.fabric == device.fabric


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    machines: tuple[MachineSpec, ...]
    devices: tuple[DeviceSpec, ...]
    users: dict[str, str] = field(default_factory=dict)
    tenant: str = DEFAULT_TENANT
    realm: str = "cdi"
    token_ttl: float = 300.0
    session_timeout: float = 1800.0
    #: Whether the Redfish side supports `$expand` (else it answers 501 to it, as DSP0266 asks,
    #: and its service root advertises no `ExpandQuery`).
    expand: bool = True
    #: A DMTF mockup served as the Redfish side's initial state (`mockup: <dir>` in the file).
    mockup: Mockup | None = None

    @property
    def fabrics(self) -> list[str]:
        return sorted({m.fabric for m in self.machines} | {d.fabric for d in self.devices})


_PCI_IDS = {"NVIDIA": "0x10de", "AMD": "0x1002", "INTEL": "0x8086"}


def _num(doc: dict[str, Any], key: str, where: str, default: float, *, minimum: float = 0) -> float:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise EmulatorConfigError(f"{where}.{key}: must be a number >= {minimum}, got {value!r}")
    return float(value)


def _str(doc: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str) or not value:
        raise EmulatorConfigError(f"{where}.{key}: must be a non-empty string, got {value!r}")
    return value


#: Characters an id cannot carry: the emulator serves every id as one Redfish URI path segment
#: (RFC 3986: '/' separates segments, '?' and '#' end the path, '%' starts an escape).
_NOT_IN_A_SEGMENT = frozenset("/?#%")


def _check_segment(value: str, where: str) -> None:
    bad = sorted(set(value) & _NOT_IN_A_SEGMENT)
    if bad:
        raise EmulatorConfigError(
            f"{where}: {value!r} cannot be served as a Redfish URI segment (it contains "
            f"{' '.join(bad)}); choose an id without / ? # %"
        )


def parse(doc: Any, *, environ: Mapping[str, str] | None = None) -> EmulatorConfig:
    env = os.environ if environ is None else environ
    if not isinstance(doc, dict):
        raise EmulatorConfigError("the emulator config must be a mapping with machines and devices")
    expand = doc.get("expand", True)
    if not isinstance(expand, bool):
        raise EmulatorConfigError(f"config.expand: must be true or false, got {expand!r}")
    if doc.get("mockup") is not None:
        return _with_users(_from_mockup(doc), doc, env, expand=expand)
    machines: list[MachineSpec] = []
    for i, m in enumerate(doc.get("machines") or []):
        where = f"machines[{i}]"
        if not isinstance(m, dict):
            raise EmulatorConfigError(f"{where}: must be a mapping")
        machines.append(
            MachineSpec(
                id=_str(m, "id", where),
                name=_str(m, "name", where, m.get("id")),
                fabric=_str(m, "fabric", where, "fabric0"),
            )
        )
    if len({m.id for m in machines}) != len(machines):
        raise EmulatorConfigError("machines: ids must be unique")
    for i, m in enumerate(machines):
        _check_segment(m.id, f"machines[{i}].id")
    devices: list[DeviceSpec] = []
    for i, d in enumerate(doc.get("devices") or []):
        where = f"devices[{i}]"
        if not isinstance(d, dict):
            raise EmulatorConfigError(f"{where}: must be a mapping")
        fabric = _str(d, "fabric", where, "fabric0")
        model = _str(d, "model", where)
        vendor = _str(d, "vendor", where, "NVIDIA")
        count = int(_num(d, "count", where, 1))
        ids = d.get("ids")
        if ids is not None and (not isinstance(ids, list) or len(ids) != count):
            raise EmulatorConfigError(f"{where}.ids: must be a list of {count} ids")
        for n in range(count):
            dev_id = str(ids[n]) if ids else f"{fabric}-gpu-{len(devices):04d}"
            _check_segment(dev_id, f"{where}.ids[{n}]")
            devices.append(
                DeviceSpec(
                    id=dev_id,
                    fabric=fabric,
                    model=model,
                    vendor=vendor,
                    memory=int(_num(d, "memory", where, 0)),
                    serial="GPU-" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"cohdi-emulator/{dev_id}")),
                    pci_vendor=str(d.get("pci_vendor", _PCI_IDS.get(vendor.upper(), "0x10de"))),
                    pci_device=str(d.get("pci_device", "0x20b0")),
                    attach_latency=_num(d, "attach_latency", where, 0.0),
                    detach_latency=_num(d, "detach_latency", where, 0.0),
                )
            )
    if len({d.id for d in devices}) != len(devices):
        raise EmulatorConfigError("devices: ids must be unique")
    own_blocks = {f"system-{m.id}" for m in machines}  # the Redfish side's system blocks
    if clash := sorted(own_blocks & {d.id for d in devices}):
        raise EmulatorConfigError(
            f"devices: ids {clash} are taken by the systems' own Redfish blocks (system-<machine>)"
        )
    known = {m.fabric for m in machines}
    for d in devices:
        if machines and d.fabric not in known:
            raise EmulatorConfigError(
                f"device {d.id} is on fabric {d.fabric!r}, which no machine is wired to "
                f"(fabrics with machines: {sorted(known)})"
            )
    return _with_users(
        EmulatorConfig(machines=tuple(machines), devices=tuple(devices)), doc, env, expand=expand
    )


def _from_mockup(doc: dict[str, Any]) -> EmulatorConfig:
    from agent.fabric.emulator.mockup import Mockup

    if doc.get("machines") or doc.get("devices"):
        raise EmulatorConfigError("config: give either mockup or machines/devices, not both")
    spec = doc["mockup"]
    if isinstance(spec, str):
        spec = {"dir": spec}
    if not isinstance(spec, dict):
        raise EmulatorConfigError(f"config.mockup: a directory or a mapping, got {spec!r}")
    tree = Mockup.load(Path(_str(spec, "dir", "mockup")))
    return EmulatorConfig(
        machines=tree.machines(),
        devices=tree.devices(
            attach_latency=_num(spec, "attach_latency", "mockup", 0.0),
            detach_latency=_num(spec, "detach_latency", "mockup", 0.0),
        ),
        mockup=tree,
    )


def _with_users(
    base: EmulatorConfig, doc: dict[str, Any], env: Mapping[str, str], *, expand: bool
) -> EmulatorConfig:
    """`base` with the users, tenant, realm, timeouts and `expand` of the file."""
    users: dict[str, str] = {}
    for i, u in enumerate(doc.get("users") or []):
        where = f"users[{i}]"
        name = _str(u, "name", where)
        if "password_env" in u:
            var = _str(u, "password_env", where)
            if var not in env:
                raise EmulatorConfigError(f"{where}.password_env: ${var} is not set")
            users[name] = env[var]
        elif "password_file" in u:
            users[name] = Path(_str(u, "password_file", where)).read_text().strip()
        else:
            users[name] = _str(u, "password", where)
    return dataclasses.replace(
        base,
        users=users,
        tenant=str(doc.get("tenant", DEFAULT_TENANT)),
        realm=str(doc.get("realm", "cdi")),
        token_ttl=_num(doc, "token_ttl", "config", 300.0, minimum=1),
        session_timeout=_num(doc, "session_timeout", "config", 1800.0, minimum=1),
        expand=expand,
    )


def load(path: Path) -> EmulatorConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise EmulatorConfigError(f"cannot read emulator config {path}: {exc}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise EmulatorConfigError(f"{path} is neither YAML nor JSON: {exc}") from exc
    return parse(doc)


def example(
    *, password: str, nodes: int = 4, gpus: int = 16, latency: float = 0.0
) -> EmulatorConfig:
    """The embedded default: one fabric, `nodes` machines, `gpus` GPUs of two models, one user
    `admin` with `password`."""
    half = gpus // 2
    return parse(
        {
            "machines": [
                {"id": f"m-node-{i}", "name": f"node-{i}", "fabric": "fabric0"}
                for i in range(nodes)
            ],
            "devices": [
                {
                    "model": "NVIDIA-A100-PCIE-40GB",
                    "memory": 40 * 2**30,
                    "count": half,
                    "pci_device": "0x20f1",
                    "attach_latency": latency,
                    "detach_latency": latency,
                },
                {
                    "model": "NVIDIA-H100-PCIE-80GB",
                    "memory": 80 * 2**30,
                    "count": gpus - half,
                    "pci_device": "0x2331",
                    "attach_latency": latency,
                    "detach_latency": latency,
                },
            ],
            "users": [{"name": "admin", "password": password}],
        }
    )
