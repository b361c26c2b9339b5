"""CDI spec files for prepared claims: one transient spec per claim in the dynamic CDI directory
(`/var/run/cdi` by default, where later directories win), named `<vendor>-<class>_<claimUID>.json`
so a name is never reused, written atomically.

Each spec declares the lowest `cdiVersion` its content allows, so that runtimes with older CDI
libraries can still load it, but never lower: the library a runtime uses refuses a spec whose
declared version is below what its content needs ("the spec version must be at least v0.5.0").
The rules are those of `tags.cncf.io/container-device-interface` (see `VERSION_RULES`); the device
names are `<claim UID>-<device>`, and a claim UID is a UUID, which starts with a digit about 10
times in 16 — a name starting with a digit is one of those rules (0.5.0).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from agent.files import write_atomic
from agent.model.pci import PciFunction

CLASS = "gpu"
NVIDIA_CONTROL = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
#: The oldest version the library still reads (`vEarliest` in specs-go/version.go).
EARLIEST: Final = "0.3.0"

Spec = dict[str, Any]


def kind(driver: str) -> str:
    return f"{driver}/{CLASS}"


def file_name(driver: str, claim_uid: str) -> str:
    return f"{driver}-{CLASS}_{claim_uid}.json"


def device_nodes(fn: PciFunction, *, minor: int | None) -> list[str]:
    """What a container needs to use the function: the NVIDIA nodes for a GPU bound to nvidia,
    the VFIO group for passthrough."""
    if fn.driver == "vfio-pci" and fn.iommu_group >= 0:
        return [f"/dev/vfio/{fn.iommu_group}", "/dev/vfio/vfio"]
    if minor is None:
        raise ValueError(f"{fn.address}: no /dev/nvidia<minor> known (NVML absent?)")
    return [f"/dev/nvidia{minor}", *NVIDIA_CONTROL]


# --- cdiVersion ----------------------------------------------------------------------------------


def _edits(spec: Spec) -> list[dict[str, Any]]:
    """The spec-level containerEdits, then each device's."""
    return [spec.get("containerEdits") or {}] + [
        d.get("containerEdits") or {} for d in spec.get("devices") or []
    ]


def _needs_1_1_0(spec: Spec) -> bool:
    """requiresV110: intelRdt with `schemata` or `enableMonitoring`, or any `netDevices`."""
    for e in _edits(spec):
        rdt = e.get("intelRdt")
        if rdt is not None and (rdt.get("schemata") is not None or rdt.get("enableMonitoring")):
            return True
        if e.get("netDevices"):
            return True
    return False


def _needs_0_7_0(spec: Spec) -> bool:
    """requiresV070: any `intelRdt`, or `additionalGids`."""
    return any(e.get("intelRdt") is not None or e.get("additionalGids") for e in _edits(spec))


def _needs_0_6_0(spec: Spec) -> bool:
    """requiresV060: `annotations` on the spec or a device, or a dot in the kind's class."""
    devices = spec.get("devices") or []
    _, slash, cls = str(spec.get("kind", "")).partition("/")
    return (
        bool(spec.get("annotations"))
        or any(d.get("annotations") for d in devices)
        or (bool(slash) and "." in cls)
    )


def _needs_0_5_0(spec: Spec) -> bool:
    """requiresV050: a device name starting with a digit, or `hostPath` on a device node."""
    if any(str(d.get("name", ""))[:1] in _DIGITS for d in spec.get("devices") or []):
        return True
    return any(n.get("hostPath") for e in _edits(spec) for n in e.get("deviceNodes") or [])


def _needs_0_4_0(spec: Spec) -> bool:
    """requiresV040: a mount with a `type`."""
    return any(m.get("type") for e in _edits(spec) for m in e.get("mounts") or [])


_DIGITS: Final = frozenset("0123456789")  # ASCII only, as the library tests '0' <= c <= '9'

#: (version, does the spec need it?), newest first; the first rule that holds gives the version,
#: none gives EARLIEST. Mirrors `validSpecVersions` and its `requiresV*` functions in
#: tags.cncf.io/container-device-interface/specs-go/version.go (specs-go v1.1.1, the one pkg/cdi
#: v1.1.2 requires), which `ValidateVersion` applies to every spec a runtime loads. 1.0.0 and
#: 0.8.0 changed only the Go API (their functions return false); 0.3.0 and older have no rule.
VERSION_RULES: Final[tuple[tuple[str, Callable[[Spec], bool]], ...]] = (
    ("1.1.0", _needs_1_1_0),
    ("0.7.0", _needs_0_7_0),
    ("0.6.0", _needs_0_6_0),
    ("0.5.0", _needs_0_5_0),
    ("0.4.0", _needs_0_4_0),
)


def minimum_version(spec: Spec) -> str:
    """The lowest `cdiVersion` the CDI library accepts for this spec's content."""
    for version, needed in VERSION_RULES:
        if needed(spec):
            return version
    return EARLIEST


# --- names ---------------------------------------------------------------------------------------

# pkg/parser/parser.go (v1.1.2): validateVendorOrClassName and ValidateDeviceName.
_VENDOR_OR_CLASS: Final = re.compile(r"[A-Za-z](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?")
_DEVICE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?")


def check_names(spec: Spec) -> None:
    """ValueError naming the part, unless the kind and every device name have the syntax the CDI
    library requires: vendor and class start with a letter, a device name with a letter or a
    digit; all end alphanumeric and hold only alphanumerics and `_-.` (`:` too in device names)."""
    vendor, _, cls = str(spec.get("kind", "")).partition("/")
    for what, value, pattern in (
        ("vendor", vendor, _VENDOR_OR_CLASS),
        ("class", cls, _VENDOR_OR_CLASS),
        *(("device name", str(d.get("name", "")), _DEVICE) for d in spec.get("devices") or []),
    ):
        if not pattern.fullmatch(value):
            raise ValueError(f"CDI {what} {value!r} is not valid (kind {spec.get('kind')!r})")


# --- specs ---------------------------------------------------------------------------------------


def device_name(claim_uid: str, device: str) -> str:
    """The claim's device in its spec: unique on the node as long as the claim lives, and never
    reused (runtimes cache specs)."""
    return f"{claim_uid}-{device}"


def build(
    driver: str, claim_uid: str, devices: list[tuple[str, list[str], dict[str, str]]]
) -> Spec:
    """devices: (name, device node paths, env) per device of the claim. ValueError when a name
    would not be a valid CDI name (see `check_names`)."""
    spec: Spec = {
        "kind": kind(driver),
        "devices": [
            {
                "name": device_name(claim_uid, name),
                "containerEdits": {
                    "env": [f"{k}={v}" for k, v in sorted(env.items())],
                    "deviceNodes": [{"path": p} for p in nodes],
                },
            }
            for name, nodes, env in devices
        ],
    }
    check_names(spec)
    return {"cdiVersion": minimum_version(spec), **spec}


def qualified_ids(spec: Spec) -> list[str]:
    return [f"{spec['kind']}={d['name']}" for d in spec["devices"]]


def write(cdi_dir: Path, driver: str, claim_uid: str, spec: Spec) -> Path:
    cdi_dir.mkdir(parents=True, exist_ok=True)
    path = cdi_dir / file_name(driver, claim_uid)
    write_atomic(path, json.dumps(spec, indent=1).encode(), mode=0o644)
    return path


def remove(cdi_dir: Path, driver: str, claim_uid: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (cdi_dir / file_name(driver, claim_uid)).unlink()
