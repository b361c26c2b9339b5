"""The stub NVML library of simulated GPU servers: `stub_nvml.c` (beside this file, shipped as
package data) compiled with the machine's C compiler on first use into a cache directory (the
settings' cache dir, never the package directory, which may be read-only), for the demo, tests and
benchmarks. The node role dlopens it exactly like libnvidia-ml.so.1."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agent import errors
from agent.files import write_atomic

SOURCE = Path(__file__).with_name("stub_nvml.c")


def build(cache_dir: Path) -> Path:
    """Compile (once per source version) and return the path of the stub libnvidia-ml.so.1:
    `<cache_dir>/stub-nvml-<sha256 of the source, 12 hex>/libnvidia-ml.so.1`. Concurrent builds
    are safe (each compiles into its own temporary name, then renames). Raises
    errors.DevClusterError when there is no C compiler or the compile fails."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    out = cache_dir / f"stub-nvml-{digest}" / "libnvidia-ml.so.1"
    if out.exists():
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise errors.DevClusterError(
            "no C compiler (cc or gcc on PATH) to build the simulated servers' stub NVML library"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent)) / "libnvidia-ml.so.1"
    try:
        done = subprocess.run(
            [cc, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(tmp), str(SOURCE)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise errors.DevClusterError(
                f"compiling {SOURCE} with {cc} failed ({done.returncode}): {done.stderr.strip()}"
            )
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return out


@dataclass(frozen=True, slots=True)
class StubGpu:
    uuid: str
    name: str
    bus_id: str  # sysfs form, 0000:41:00.0
    memory: int
    minor: int
    processes: tuple[tuple[int, int], ...] = ()

    def line(self) -> str:
        procs = ",".join(f"{pid}:{mem}" for pid, mem in self.processes) or "-"
        return f"{self.uuid}\t{self.name}\t{self.bus_id}\t{self.memory}\t{self.minor}\t{procs}\n"


def write_gpus(path: Path, gpus: list[StubGpu]) -> None:
    """The GPU list the stub reads at init (atomically replaced)."""
    write_atomic(path, "".join(g.line() for g in gpus).encode(), mode=0o644, sync=False)


#: nvml.h event types the stub can inject (`inject_event`'s `event_type`)
XID_CRITICAL = 0x8
DOUBLE_BIT_ECC = 0x2
GPU_UNAVAILABLE = 0x4000


def inject_event(path: Path, bus_id: str, data: int, event_type: int = XID_CRITICAL) -> None:
    """Queue one NVML event on the GPU at `bus_id` in the stub's event file ($STUB_NVML_XID):
    `data` is the Xid for `XID_CRITICAL`. The stub hands events out in order to an event set that
    registered that GPU for that type (and drops the others, like NVML)."""
    with open(path, "a") as fh:
        fh.write(f"{bus_id} {data} {event_type:x}\n")


def set_lost(path: Path, bus_ids: list[str]) -> None:
    """The GPUs that answer NVML_ERROR_GPU_IS_LOST ($STUB_NVML_LOST, read at every query): a GPU
    that fell off the bus; an empty list brings them all back."""
    write_atomic(path, "".join(f"{b}\n" for b in bus_ids).encode(), mode=0o644, sync=False)
