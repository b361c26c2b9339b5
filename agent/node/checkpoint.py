"""The DRA plugin's crash-safe record of prepared claims.

Prepare is: read the checkpoint → already PrepareCompleted? answer from it → record
PrepareStarted → act (write the CDI spec) → record PrepareCompleted. A crash in between leaves
PrepareStarted, and the next prepare simply does the work again (it is idempotent: same CDI file
name, same content). The file carries a version, a checksum of its content and the boot id: a
checksum mismatch is corruption (a clear error, the file is kept for an operator), a different boot
id means every entry is stale (devices and /var/run/cdi were reset by the reboot) and is dropped.
Writes are temp file + fsync + rename, under an exclusive file lock shared with any other process.

Every method blocks (flock, read, fsync, rename): callers on an event loop run them on a worker
thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from agent import errors
from agent.files import write_atomic

VERSION: Final = 1
STARTED: Final = "PrepareStarted"
COMPLETED: Final = "PrepareCompleted"


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


@dataclass
class PreparedClaim:
    uid: str
    namespace: str
    name: str
    state: str
    #: [{"request_names": [...], "pool": ..., "device": ..., "cdi_ids": [...]}]
    devices: list[dict[str, Any]] = field(default_factory=list)
    cdi_file: str = ""


def _checksum(claims: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps(claims, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


class Checkpoint:
    def __init__(self, path: Path, *, boot: str | None = None) -> None:
        self.path = path
        self._boot = boot
        #: entries of an earlier boot found by the last load (the caller cleans their CDI files)
        self.stale: list[PreparedClaim] = []

    @property
    def boot(self) -> str:
        """This boot's id, read on first use (from /proc unless given)."""
        if self._boot is None:
            self._boot = boot_id()
        return self._boot

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def load(self) -> dict[str, PreparedClaim]:
        """uid -> claim of this boot ({} when there is no file yet); entries of an earlier boot
        go to `stale`. CheckpointError when the file is not a checkpoint this agent can trust:
        not JSON, another version, a failed checksum, or entries of the wrong shape."""
        self.stale = []
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:  # UnicodeDecodeError too
            raise errors.CheckpointError(
                f"{self.path} is not JSON ({exc}); move it away to start with no prepared claims"
            ) from exc
        if not isinstance(doc, dict):
            raise errors.CheckpointError(
                f"{self.path} holds a JSON {type(doc).__name__}, not a checkpoint; "
                "move it away to start with no prepared claims"
            )
        if doc.get("version") != VERSION:
            raise errors.CheckpointError(
                f"{self.path} has version {doc.get('version')!r}; this agent reads {VERSION}"
            )
        claims = doc.get("claims") or {}
        if doc.get("checksum") != _checksum(claims):
            raise errors.CheckpointError(
                f"{self.path} fails its checksum: it was changed or half-written by someone else; "
                "move it away to start with no prepared claims"
            )
        try:
            entries = {uid: PreparedClaim(**c) for uid, c in claims.items()}
        except (TypeError, AttributeError) as exc:
            raise errors.CheckpointError(
                f"{self.path} has an entry this agent cannot read ({exc}); "
                "move it away to start with no prepared claims"
            ) from exc
        if doc.get("boot_id") != self.boot:
            self.stale = list(entries.values())
            return {}
        return entries

    def save(self, claims: dict[str, PreparedClaim]) -> None:
        body = {uid: asdict(c) for uid, c in sorted(claims.items())}
        doc = {
            "version": VERSION,
            "boot_id": self.boot,
            "checksum": _checksum(body),
            "claims": body,
        }
        write_atomic(self.path, json.dumps(doc, indent=1, sort_keys=True).encode())
