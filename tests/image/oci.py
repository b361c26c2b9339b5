"""Run an OCI archive's image with runc, the way a container runtime would: the layers of its
manifest unpacked in order into a root filesystem (whiteouts applied), and a runtime bundle whose
process is the image's ENTRYPOINT + CMD (or given arguments), user, environment and working
directory — so what runs is the archive itself, not a builder's copy of it.

`runc spec` gives the bundle's defaults (new PID, mount, IPC, UTS namespaces; the process is
PID 1); the network namespace is dropped so the container shares the host's loopback with the
test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_OPAQUE = ".wh..wh..opq"


def layout(archive: Path) -> dict[str, Any]:
    """{"index", "manifest", "config", "layers"} of the archive's only image: the JSON
    documents, and the layer descriptors."""
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> bytes:
            algo, hexdigest = digest.split(":", 1)
            member = tar.extractfile(f"blobs/{algo}/{hexdigest}")
            assert member is not None, digest
            return member.read()

        index_file = tar.extractfile("index.json")
        assert index_file is not None
        index = json.loads(index_file.read())
        (entry,) = index["manifests"]
        manifest = json.loads(blob(entry["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        return {
            "index": index,
            "manifest": manifest,
            "config": config,
            "layers": manifest["layers"],
        }


def unpack(archive: Path, rootfs: Path) -> dict[str, Any]:
    """The image's root filesystem into `rootfs` (created); the image config. Layers are
    extracted with GNU tar (numeric owners, devices); a whiteout `.wh.<name>` removes `<name>`
    from the layers below. Raises AssertionError on an opaque whiteout (our images make none)."""
    doc = layout(archive)
    rootfs.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        for layer in doc["layers"]:
            algo, hexdigest = layer["digest"].split(":", 1)
            source = tar.extractfile(f"blobs/{algo}/{hexdigest}")
            assert source is not None
            argv = ["tar", "-x", "--numeric-owner", "-C", str(rootfs)]
            if "gzip" in layer["mediaType"]:
                argv.append("-z")
            with subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
            ) as proc:
                assert proc.stdin is not None
                shutil.copyfileobj(source, proc.stdin, 1 << 20)
                proc.stdin.close()
            assert proc.returncode == 0, f"tar failed on layer {layer['digest']}"
            _whiteouts(rootfs)
    return doc["config"]


def _whiteouts(rootfs: Path) -> None:
    for dirpath, _dirs, files in os.walk(rootfs):
        for name in files:
            if not name.startswith(".wh."):
                continue
            assert name != _OPAQUE, f"opaque whiteout in {dirpath}: not supported here"
            os.unlink(os.path.join(dirpath, name))
            target = Path(dirpath) / name[len(".wh.") :]
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)


@dataclass
class Container:
    """A runc container of an unpacked image. `args` replace the image's CMD (ENTRYPOINT kept),
    or with `entrypoint` the whole command line."""

    rootfs: Path
    config: dict[str, Any]
    bundle: Path
    args: Sequence[str] = ()
    entrypoint: Sequence[str] | None = None
    user: str | None = None
    binds: Sequence[str] = ()  # host paths mounted at the same path, read-write
    tmpfs: Sequence[str] = ()  # paths given an empty tmpfs owned by the process's user
    env: dict[str, str] = field(default_factory=dict)
    id: str = field(default_factory=lambda: f"cohdi-test-{uuid.uuid4().hex[:10]}")
    proc: subprocess.Popen[bytes] | None = None

    def spec(self) -> dict[str, Any]:
        image = self.config["config"]
        self.bundle.mkdir(parents=True, exist_ok=True)
        (self.bundle / "config.json").unlink(missing_ok=True)
        subprocess.run(["runc", "spec", "--bundle", str(self.bundle)], check=True)
        spec: dict[str, Any] = json.loads((self.bundle / "config.json").read_text())
        command = (
            list(self.entrypoint)
            if self.entrypoint is not None
            else [
                *image.get("Entrypoint", []),
                *(self.args or image.get("Cmd", [])),
            ]
        )
        uid, _, gid = (self.user or image.get("User") or "0:0").partition(":")
        process = spec["process"]
        process["terminal"] = False
        process["args"] = command
        process["cwd"] = image.get("WorkingDir") or "/"
        process["user"] = {"uid": int(uid), "gid": int(gid or uid)}
        env = dict(e.split("=", 1) for e in image.get("Env", []))
        process["env"] = [f"{k}={v}" for k, v in {**env, **self.env}.items()]
        spec["root"] = {"path": str(self.rootfs), "readonly": True}
        spec["linux"]["namespaces"] = [
            ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"
        ]
        spec["hostname"] = "cohdi-agent"
        for path in self.binds:
            spec["mounts"].append(
                {"destination": path, "type": "bind", "source": path, "options": ["rbind", "rw"]}
            )
        for path in self.tmpfs:
            spec["mounts"].append(
                {
                    "destination": path,
                    "type": "tmpfs",
                    "source": "tmpfs",
                    "options": ["nosuid", "nodev", "mode=0755", f"uid={uid}", f"gid={gid or uid}"],
                }
            )
        (self.bundle / "config.json").write_text(json.dumps(spec))
        return spec

    def start(self, log: Path) -> None:
        self.spec()
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["runc", "run", "--bundle", str(self.bundle), self.id],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def run(self, log: Path, timeout: float = 120) -> int:
        """Run to the end; the exit status."""
        self.start(log)
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            self.delete()

    def init_pid(self) -> int:
        """The host pid of the container's process (runc state), 0 while it has none."""
        done = subprocess.run(
            ["runc", "state", self.id], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            return 0
        state = json.loads(done.stdout)
        return int(state.get("pid", 0)) if state.get("status") == "running" else 0

    def terminate(self, timeout: float = 20) -> int:
        """`runc kill <id> TERM` (to the container's PID 1, from the host); the exit status.
        Past `timeout` seconds the container is killed and the test fails (a hang)."""
        assert self.proc is not None
        subprocess.run(["runc", "kill", self.id, "TERM"], check=True, capture_output=True)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.delete()
            raise AssertionError(f"PID 1 still running {timeout} s after SIGTERM") from None

    def delete(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run(["runc", "kill", self.id, "KILL"], capture_output=True, check=False)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        subprocess.run(["runc", "delete", "--force", self.id], capture_output=True, check=False)


def wait_for(predicate: Any, what: str, log: Path, timeout: float = 60) -> None:
    """Poll `predicate` until true; past `timeout` seconds fail with the tail of `log` (a
    deadline for a container that will not get there, not a timing assert)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no output)"
    raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{tail}")
