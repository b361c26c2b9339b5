"""CDI spec files for prepared claims: one transient spec per claim in the dynamic CDI directory
(`/var/run/cdi` by default, where later directories win), named `<vendor>-<class>_<claimUID>.json`
so a name is never reused, written atomically, with the lowest `cdiVersion` its fields allow so
older runtimes can still load it."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from agent.files import write_atomic
from agent.model.pci import PciFunction

CLASS = "gpu"
NVIDIA_CONTROL = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")


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


def minimum_version(spec: dict[str, Any]) -> str:
    """The lowest CDI spec version whose schema has every field this spec uses."""
    edits = [d.get("containerEdits", {}) for d in spec["devices"]] + [
        spec.get("containerEdits", {})
    ]
    if any(e.get("additionalGids") or e.get("intelRdt") for e in edits):
        return "0.7.0"
    if spec.get("annotations") or any(d.get("annotations") for d in spec["devices"]):
        return "0.6.0"
    if any("hostPath" in n for e in edits for n in e.get("deviceNodes", [])):
        return "0.5.0"
    return "0.3.0"


def build(
    driver: str, claim_uid: str, devices: list[tuple[str, list[str], dict[str, str]]]
) -> dict[str, Any]:
    """devices: (name, device node paths, env) per device of the claim."""
    spec: dict[str, Any] = {
        "kind": kind(driver),
        "devices": [
            {
                "name": f"{claim_uid}-{name}",
                "containerEdits": {
                    "env": [f"{k}={v}" for k, v in sorted(env.items())],
                    "deviceNodes": [{"path": p} for p in nodes],
                },
            }
            for name, nodes, env in devices
        ],
    }
    return {"cdiVersion": minimum_version(spec), **spec}


def qualified_ids(spec: dict[str, Any]) -> list[str]:
    return [f"{spec['kind']}={d['name']}" for d in spec["devices"]]


def write(cdi_dir: Path, driver: str, claim_uid: str, spec: dict[str, Any]) -> Path:
    cdi_dir.mkdir(parents=True, exist_ok=True)
    path = cdi_dir / file_name(driver, claim_uid)
    write_atomic(path, json.dumps(spec, indent=1).encode(), mode=0o644)
    return path


def remove(cdi_dir: Path, driver: str, claim_uid: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (cdi_dir / file_name(driver, claim_uid)).unlink()
