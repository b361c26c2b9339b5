"""Build or fetch, once, what a real node of the local test bed runs, into the cache outside the
repository (`agent.devcluster.realnode` starts it):

- **kubelet** and **kube-controller-manager** of the control plane's Kubernetes version, from the
  Go module proxy through a wrapper module like kube-apiserver's (`building.staging_replaces`),
  into the same `<cache>/k8s/<version>/bin`;
- **containerd** (`containerd`, `ctr`, `containerd-shim-runc-v2`) from the Go module proxy
  (`github.com/containerd/containerd/v2`), into `<cache>/containerd/<version>/bin`. Debian 12's
  containerd is 1.6, which does not inject CDI devices; 2.x does (CDI is on by default there).
  Built with `-tags no_btrfs` (the btrfs snapshotter needs libbtrfs headers; nothing here uses it);
- **runc** and the **CNI plugins** (bridge, host-local, loopback) from Debian's archive:
  `apt-get download` + `dpkg -x` into `<cache>/debian/<package>_<version>`, nothing installed
  system-wide;
- the **pause** image: `build/pause/linux/pause.c` of the k8s.io/kubernetes module, compiled
  statically with the C compiler and wrapped into an OCI image archive (`static_image`), which
  `RealNode.import_image` loads into containerd. No registry is reachable here, so every image a
  pod runs is built this way.

Builds are serialised across processes by a file lock of their own and land atomically, as
in `agent.devcluster.building`. Each function returns at once when its result is in the cache.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent import errors
from agent.devcluster import building, debian

#: The containerd release built (>= 1.7 is needed for CDI; 2.x enables it by default).
CONTAINERD_VERSION: Final = "v2.4.2"
_CONTAINERD_MODULE: Final = "github.com/containerd/containerd/v2"
_CONTAINERD_COMMANDS: Final = ("containerd", "ctr", "containerd-shim-runc-v2")
_KUBE_NODE_COMMANDS: Final = ("kubelet", "kube-controller-manager")
#: Debian packages unpacked into the cache: (package, the files of it we use).
_DEBS: Final = {
    "runc": ("usr/sbin/runc",),
    "containernetworking-plugins": (
        "usr/lib/cni/bridge",
        "usr/lib/cni/host-local",
        "usr/lib/cni/loopback",
    ),
}
#: The tag of the pause image the Kubernetes release pins (build/pause/Makefile `TAG`).
PAUSE_TAG: Final = "3.10.2"
PAUSE_IMAGE: Final = f"registry.k8s.io/pause:{PAUSE_TAG}"
#: Our builds' own lock: their outputs are disjoint from the control plane's (kubelet's wrapper
#: module has a source directory of its own), so they need not wait for its build.
_LOCK: Final = ".node-build.lock"


@dataclass(frozen=True, slots=True)
class NodeBinaries:
    """Everything a real node runs, all absolute paths in the cache."""

    kubelet: Path
    kube_controller_manager: Path
    containerd: Path
    ctr: Path
    containerd_shim: Path
    runc: Path
    #: Holds `bridge`, `host-local`, `loopback`.
    cni_bin_dir: Path
    #: OCI image archive of `PAUSE_IMAGE`.
    pause_image: Path


def ensure_built(
    cache_dir: Path, *, kube_version: str, progress: building.Progress
) -> NodeBinaries:
    """All of a node's programs and the pause image, building or fetching what is missing.

    Raises DevClusterError (Go, apt-get or the C compiler missing, a step failing: the message
    carries the tool's output tail)."""
    kubelet, kcm = ensure_kube_node(cache_dir, kube_version=kube_version, progress=progress)
    containerd = ensure_containerd(cache_dir, progress=progress)
    debs = {pkg: ensure_deb(cache_dir, pkg, progress=progress) for pkg in _DEBS}
    pause = ensure_pause_image(cache_dir, kube_version=kube_version, progress=progress)
    ensure_host_tools(progress=progress)
    return NodeBinaries(
        kubelet=kubelet,
        kube_controller_manager=kcm,
        containerd=containerd / "containerd",
        ctr=containerd / "ctr",
        containerd_shim=containerd / "containerd-shim-runc-v2",
        runc=debs["runc"] / "usr/sbin/runc",
        cni_bin_dir=debs["containernetworking-plugins"] / "usr/lib/cni",
        pause_image=pause,
    )


def _need_go(what: str) -> None:
    if shutil.which("go") is None:
        raise errors.DevClusterError(
            f"the Go toolchain is not on PATH: install Go >= 1.26 to build {what}"
        )


# --- kubelet, kube-controller-manager ------------------------------------------------------------


def kube_node_paths(cache_dir: Path, kube_version: str) -> tuple[Path, Path]:
    """(kubelet, kube-controller-manager) in `<cache>/k8s/<version>/bin`."""
    bindir = cache_dir / "k8s" / kube_version / "bin"
    return bindir / "kubelet", bindir / "kube-controller-manager"


def ensure_kube_node(
    cache_dir: Path, *, kube_version: str, progress: building.Progress
) -> tuple[Path, Path]:
    """kubelet and kube-controller-manager of `kube_version`, built when missing (~3 and ~1.5 min
    on 2 cores when kube-apiserver's build filled the Go build cache)."""
    want = kube_node_paths(cache_dir, kube_version)
    if all(os.access(p, os.X_OK) for p in want):
        return want
    _need_go(f"kubelet {kube_version}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with building._locked(cache_dir / _LOCK, progress):
        if not all(p.exists() for p in want):
            _build_kube_node(want[0].parent.parent, kube_version, progress)
    return want


def _build_kube_node(root: Path, version: str, progress: building.Progress) -> None:
    """The wrapper module of `building._build_kube` in its own source directory (`node-src`), so
    it never races the control plane's; the Go build cache is shared, so packages the API server
    already compiled are not compiled again."""
    src = root / "node-src"
    src.mkdir(parents=True, exist_ok=True)
    progress(f"building kubelet and kube-controller-manager {version} (first run only; ~5 min)")
    gomod = Path(_download("k8s.io/kubernetes", version, src)["GoMod"]).read_text()
    go_line = re.search(r"^go (\S+)", gomod, flags=re.M)
    (src / "go.mod").write_text(
        "module cohdi.local/kube-node-build\n\n"
        f"go {go_line.group(1) if go_line else '1.26.0'}\n\n"
        f"require k8s.io/kubernetes {version}\n\n"
        "replace (\n" + "\n".join(building.staging_replaces(gomod, version)) + "\n)\n"
    )
    packages = [f"k8s.io/kubernetes/cmd/{c}" for c in _KUBE_NODE_COMMANDS]
    building._write_tools(src, packages)
    building._go(["mod", "tidy"], src, progress)
    building._build_into(
        root / "bin", src, packages, progress, ldflags=building._version_ldflags(version)
    )


def _download(module: str, version: str, cwd: Path) -> dict[str, str]:
    """`go mod download -json module@version`: {"Dir", "GoMod", ...}. Raises DevClusterError when
    the proxy does not serve it."""
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{version}"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, GO111MODULE="on"),
    )
    try:
        info: dict[str, str] = json.loads(done.stdout)
    except ValueError:
        info = {"Error": done.stderr.strip() or f"exit {done.returncode}"}
    if "Error" in info:
        raise errors.DevClusterError(f"go could not fetch {module}@{version}: {info['Error']}")
    return info


# --- containerd ----------------------------------------------------------------------------------


def containerd_dir(cache_dir: Path, version: str = CONTAINERD_VERSION) -> Path:
    """`<cache>/containerd/<version>/bin`, holding containerd, ctr, containerd-shim-runc-v2."""
    return cache_dir / "containerd" / version / "bin"


def ensure_containerd(
    cache_dir: Path, *, version: str = CONTAINERD_VERSION, progress: building.Progress
) -> Path:
    """The directory of containerd's three programs, built when missing."""
    bindir = containerd_dir(cache_dir, version)
    if all(os.access(bindir / c, os.X_OK) for c in _CONTAINERD_COMMANDS):
        return bindir
    _need_go(f"containerd {version}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with building._locked(cache_dir / _LOCK, progress):
        if not all((bindir / c).exists() for c in _CONTAINERD_COMMANDS):
            _build_containerd(bindir.parent, version, progress)
    return bindir


def _build_containerd(root: Path, version: str, progress: building.Progress) -> None:
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    progress(f"building containerd {version} (first run only; a few minutes)")
    gomod = Path(_download(_CONTAINERD_MODULE, version, src)["GoMod"]).read_text()
    go_line = re.search(r"^go (\S+)", gomod, flags=re.M)
    (src / "go.mod").write_text(
        "module cohdi.local/containerd-build\n\n"
        f"go {go_line.group(1) if go_line else '1.26.0'}\n\n"
        f"require {_CONTAINERD_MODULE} {version}\n"
    )
    packages = [f"{_CONTAINERD_MODULE}/cmd/{c}" for c in _CONTAINERD_COMMANDS]
    building._write_tools(src, packages)
    building._go(["mod", "tidy"], src, progress)
    # The version stamp of containerd's Makefile (`containerd --version`, the CRI version).
    ldflags = f"-s -w -X {_CONTAINERD_MODULE}/version.Version={version}"
    bindir = root / "bin"
    tmp = Path(tempfile.mkdtemp(prefix=".bin-", dir=root))
    try:
        building._go(
            [
                "build",
                "-v",
                "-trimpath",
                "-tags=no_btrfs",
                f"-ldflags={ldflags}",
                "-o",
                f"{tmp}/",
                *packages,
            ],
            src,
            progress,
        )
        bindir.mkdir(exist_ok=True)
        for exe in tmp.iterdir():
            exe.replace(bindir / exe.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- Debian packages -----------------------------------------------------------------------------


def ensure_deb(cache_dir: Path, package: str, *, progress: building.Progress) -> Path:
    """The root of Debian `package` unpacked into `<cache>/debian/<package>` (`debian.unpack`:
    `apt-get download` + `dpkg -x`, nothing installed); the archive's candidate version. Raises
    DevClusterError when apt-get cannot download it or the package lacks a file we use."""
    wanted = _DEBS[package]
    root = cache_dir / "debian" / package
    if all(os.access(root / f, os.X_OK) for f in wanted):
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    with building._locked(cache_dir / _LOCK, progress):
        progress(f"fetching Debian's {package} (apt-get download; first run only)")
        root = debian.unpack(cache_dir, package, [package], wanted[0])
    missing = [f for f in wanted if not (root / f).exists()]
    if missing:
        raise errors.DevClusterError(f"Debian's {package} lacks {', '.join(missing)}")
    return root


#: Programs of the machine the node needs, and the Debian package that has each: `ip` makes the
#: node's interface (and the CNI plugins need the kernel's bridge and veth, not the tool);
#: `umount` is for clean-up. Both are in a standard Debian 12 install, not in every container.
HOST_TOOLS: Final = {"ip": "iproute2", "umount": "mount"}


def ensure_host_tools(*, progress: building.Progress) -> None:
    """Install (apt-get, as root) the Debian package of any `HOST_TOOLS` program missing from
    PATH. Raises DevClusterError naming the packages when that is not possible."""
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise errors.DevClusterError(
            f"the real node needs {', '.join(missing)} (Debian packages) installed"
        )
    progress(f"installing {', '.join(missing)} (apt-get)")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    try:
        _run(install, what="apt-get install")
    except errors.DevClusterError:
        _run(["apt-get", "update", "-q"], what="apt-get update")
        _run(install, what="apt-get install")


def _run(args: list[str], *, what: str, cwd: Path | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise errors.DevClusterError(
            f"`{what}` failed (exit {done.returncode}):\n{(done.stderr or done.stdout)[-2000:]}"
        )
    return done.stdout


# --- images --------------------------------------------------------------------------------------


def ensure_pause_image(cache_dir: Path, *, kube_version: str, progress: building.Progress) -> Path:
    """`PAUSE_IMAGE` as an OCI archive: pause.c of k8s.io/kubernetes@`kube_version`, static."""
    out = cache_dir / "images" / f"pause-{PAUSE_TAG}-{kube_version}.oci.tar"
    if out.exists():
        return out
    _need_go(f"the pause image ({kube_version}'s pause.c)")
    info = _download("k8s.io/kubernetes", kube_version, cache_dir / "images")
    pause_c = Path(info["Dir"]) / "build" / "pause" / "linux" / "pause.c"
    progress(f"building the pause image {PAUSE_IMAGE} from {pause_c}")
    return static_image(
        cache_dir,
        pause_c,
        image=PAUSE_IMAGE,
        binary="pause",
        cflags=[f"-DVERSION=v{PAUSE_TAG}-cohdi"],
        out=out,
    )


def static_image(
    cache_dir: Path,
    c_source: Path,
    *,
    image: str,
    binary: str,
    cflags: list[str] | None = None,
    out: Path | None = None,
) -> Path:
    """A one-file image: `c_source` compiled statically (`cc -Os -static`) to `/<binary>`, the
    image's entrypoint; written as an OCI image archive (oci-layout, index.json, blobs) named
    `image` (annotations `io.containerd.image.name` and `org.opencontainers.image.ref.name`, what
    `ctr images import` names it by). Cached by the source's digest unless `out` is given.
    Raises DevClusterError when no C compiler or static libc is there."""
    source = c_source.read_bytes()
    if out is None:
        digest = hashlib.sha256(source + image.encode() + repr(cflags).encode()).hexdigest()[:12]
        out = cache_dir / "images" / f"{binary}-{digest}.oci.tar"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise errors.DevClusterError(f"no C compiler on PATH (cc/gcc) to build {image}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".img-", dir=out.parent) as tmp:
        exe = Path(tmp) / binary
        _run(
            [cc, "-Os", "-Wall", "-static", *(cflags or []), "-o", str(exe), str(c_source)],
            what=f"cc -static {c_source.name} (static libc: Debian's libc6-dev)",
        )
        archive = oci_archive(image, {binary: exe.read_bytes()}, entrypoint=[f"/{binary}"])
        part = Path(tmp) / "image.tar"
        part.write_bytes(archive)
        part.replace(out)
    return out


def oci_archive(image: str, files: dict[str, bytes], *, entrypoint: list[str]) -> bytes:
    """An OCI image archive (image-spec v1.1 layout in a tar) of one gzip layer holding `files`
    (name in / -> content, mode 0755), linux/amd64, the given entrypoint."""
    layer_tar = io.BytesIO()
    with tarfile.open(fileobj=layer_tar, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, 0
            tar.addfile(info, io.BytesIO(data))
    diff = layer_tar.getvalue()
    layer = gzip.compress(diff, mtime=0)
    config = _json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": entrypoint, "Env": ["PATH=/"]},
            "rootfs": {"type": "layers", "diff_ids": [_digest(diff)]},
        }
    )
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": _descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [_descriptor("application/vnd.oci.image.layer.v1.tar+gzip", layer)],
        }
    )
    tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else "latest"
    index = _json(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    **_descriptor("application/vnd.oci.image.manifest.v1+json", manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": image,
                        "org.opencontainers.image.ref.name": tag,
                    },
                }
            ],
        }
    )
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries = [
            ("oci-layout", _json({"imageLayoutVersion": "1.0.0"})),
            ("index.json", index),
            *((f"blobs/sha256/{_digest(b)[7:]}", b) for b in (layer, config, manifest)),
        ]
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _json(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _descriptor(media_type: str, data: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "digest": _digest(data), "size": len(data)}
