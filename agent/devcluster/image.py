"""The agent's container image, built on this machine with no container registry, into the cache
outside the repository: `ensure_image(cache_dir, progress)` -> an OCI archive that
`ctr images import`, `podman load` and `skopeo` read.

Steps (each cached). From an empty cache on this 2-core machine the first build took 2 min 38 s
(mmdebstrap 37 s + 64 s for the two bases, the image 50 s) and 6 min under a load of 10;
installing buildah and runc adds about 20 s. A rebuild after a code change takes 40-50 s (the
bases are kept); an unchanged source returns the cached archive at once, without buildah.

1. **Tools**: buildah and runc (`apt-get install --no-install-recommends`, root), and mmdebstrap
   (`agent.devcluster.debian`). buildah runs with a storage and a `containers.conf` of its own
   under `<cache>/image/containers/`: runtime `runc` (crun cannot set the rlimits or use the
   hybrid cgroups of these machines) and `nofile`/`nproc` ulimits of 1024 (no CAP_SYS_RESOURCE
   to raise them).
2. **Base images** from Debian's packages: `mmdebstrap --variant=essential` of bookworm (its
   Python is 3.11) into a tarball, imported `FROM scratch` as `localhost/cohdi-base:bookworm`
   (python3, libstdc++6 for grpcio, libudev1 for pyudev, ca-certificates) and
   `localhost/cohdi-base:bookworm-build` (the same plus gcc, libc6-dev, python3-dev,
   python3-venv), each also tagged with the key of its package list.
3. **Context** `<cache>/image/context/`: the package's source (pyproject.toml, setup.py,
   README.md, agent/ without compiled files), `packaging/image/Containerfile`, and `wheelhouse/`:
   the build and run-time requirements (with the `demo` extra, for `fabric-emulator`) downloaded
   by the host's pip (its index, proxy and certificates) as cp311 manylinux wheels, with a
   `requirements.txt`. The build installs from it with the network off. The context stays
   after the build (`podman build` by hand can use it); the key is that of the copy.
4. **Image** `localhost/cohdi-agent:<version>`, `buildah build --network=none` (no step reaches
   the network), pushed to `<cache>/image/cohdi-agent-<version>-<key>.oci.tar`; older archives
   and images are removed (the storage keeps the two bases and the newest image).
   The index names the image both ways containerd reads it (`org.opencontainers.image.ref.name`
   and `io.containerd.image.name`), so `ctr -n k8s.io images import <archive>` needs no flags.

The cache key is a digest of every file that goes into the image (and of the recipe: package
lists, requirements): a code change rebuilds, anything else reuses the archive without starting
buildah. Builds are serialised across processes by a file lock; the archive lands atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent import __version__, errors
from agent.devcluster import building, debian

REPOSITORY: Final = "localhost/cohdi-agent"
BASE_IMAGE: Final = "localhost/cohdi-base:bookworm"
BUILD_IMAGE: Final = "localhost/cohdi-base:bookworm-build"
#: What the runtime needs beyond Debian's Essential set: Python 3.11, grpcio's libstdc++,
#: pyudev's libudev (dlopened), the public CA roots for a fabric manager with a public certificate.
RUNTIME_PACKAGES: Final = ("python3", "libstdc++6", "libudev1", "ca-certificates")
#: The build stage's additions: a C compiler and Python's headers for the cffi PCI scan, venv.
BUILD_PACKAGES: Final = (*RUNTIME_PACKAGES, "gcc", "libc6-dev", "python3-dev", "python3-venv")
#: Changed when the way the image is made changes, so old archives are not reused.
_RECIPE: Final = "image-v1"
_CONTAINERFILE: Final = "packaging/image/Containerfile"
_SOURCE_FILES: Final = ("pyproject.toml", "setup.py", "README.md", _CONTAINERFILE)
_SKIPPED_DIRS: Final = frozenset({"__pycache__", ".mypy_cache", ".pytest_cache"})
_SKIPPED_SUFFIXES: Final = (".pyc", ".pyo", ".so", ".o", ".egg-info")
#: The container's Python, for which the wheelhouse is downloaded (Debian bookworm's).
_PYTHON: Final = "3.11"
_ANNOTATION_REF: Final = "org.opencontainers.image.ref.name"
_ANNOTATION_CONTAINERD: Final = "io.containerd.image.name"


@dataclass(frozen=True, slots=True)
class Image:
    """A built image: `archive` (an OCI layout in a tar, `ctr images import`-able), the
    `reference` it carries (`localhost/cohdi-agent:<version>`), and `key`, the digest of its
    sources (also the `io.cohdi.source-key` label)."""

    archive: Path
    reference: str
    key: str


def repo_root() -> Path:
    """The source checkout this package runs from. Raises DevClusterError for an installed
    wheel (it has no setup.py, README or Containerfile to build from)."""
    root = Path(__file__).resolve().parents[2]
    missing = [f for f in _SOURCE_FILES if not (root / f).is_file()]
    if missing:
        raise errors.DevClusterError(
            f"building the image needs a source checkout of cohdi-agent; {root} lacks "
            + ", ".join(missing)
        )
    return root


def source_files(root: Path) -> list[str]:
    """The files (relative, POSIX, sorted) that go into the image's build context: the build
    files and agent/ without caches and compiled objects (the build compiles its own)."""
    files = list(_SOURCE_FILES)
    for path in (root / "agent").rglob("*"):
        rel = path.relative_to(root)
        if any(p in _SKIPPED_DIRS or p.endswith(".egg-info") for p in rel.parts[:-1]):
            continue
        if path.is_file() and not path.name.endswith(_SKIPPED_SUFFIXES):
            files.append(rel.as_posix())
    return sorted(files)


def requirements(root: Path) -> tuple[list[str], list[str]]:
    """What the wheelhouse holds, as pyproject.toml states it: (the build system's
    requirements, the run-time dependencies with the `demo` extra)."""
    project = tomllib.loads((root / "pyproject.toml").read_text())
    build: list[str] = list(project["build-system"]["requires"])
    run: list[str] = [*project["project"]["dependencies"]]
    run += project["project"]["optional-dependencies"]["demo"]
    return build, run


def _package_key(packages: Sequence[str]) -> str:
    recipe = f"{debian.SUITE} {' '.join(packages)} {' '.join(debian.SLIM_DPKG_OPTIONS)} v1"
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def source_key(root: Path) -> str:
    """Digest (16 hex digits) of every file going into the image and of the recipe."""
    h = hashlib.sha256()
    h.update(f"{_RECIPE} {platform.machine()} {__version__}\0".encode())
    h.update(f"{_package_key(RUNTIME_PACKAGES)} {_package_key(BUILD_PACKAGES)}\0".encode())
    for rel in source_files(root):
        h.update(rel.encode() + b"\0" + hashlib.sha256((root / rel).read_bytes()).digest())
    return h.hexdigest()[:16]


def image_dir(cache_dir: Path) -> Path:
    return cache_dir / "image"


def archive_path(cache_dir: Path, key: str) -> Path:
    return image_dir(cache_dir) / f"cohdi-agent-{__version__}-{key}.oci.tar"


def ensure_image(cache_dir: Path, progress: building.Progress) -> Image:
    """The image's OCI archive for the current source, built when missing (see the module's
    docstring). Raises DevClusterError when a tool is missing or a step fails (with its output's
    tail); needs root for apt-get, mmdebstrap and buildah."""
    root = repo_root()
    key = source_key(root)
    reference = f"{REPOSITORY}:{__version__}"
    want = archive_path(cache_dir, key)
    if want.is_file():
        return Image(want, reference, key)
    if os.geteuid() != 0:
        raise errors.DevClusterError(
            "building the image needs root (apt-get, mmdebstrap, buildah's storage): run "
            f"`cohdi-agent dev-cluster --dev-cache-dir {cache_dir} image` as root (sudo); "
            "later runs by any user find the archive it leaves there"
        )
    image_dir(cache_dir).mkdir(parents=True, exist_ok=True)
    with building._locked(image_dir(cache_dir) / ".build.lock", progress):
        if want.is_file():  # another process built it while we waited
            return Image(want, reference, key)
        return _build(cache_dir, root, reference, progress)


def _build(cache_dir: Path, root: Path, reference: str, progress: building.Progress) -> Image:
    started = time.monotonic()
    tool = Buildah.ensure(cache_dir)
    bases = {
        "BASE_IMAGE": _ensure_base(cache_dir, tool, BASE_IMAGE, RUNTIME_PACKAGES, progress),
        "BUILD_IMAGE": _ensure_base(cache_dir, tool, BUILD_IMAGE, BUILD_PACKAGES, progress),
    }
    context = image_dir(cache_dir) / "context"
    progress(f"image: build context and wheelhouse in {context}")
    _assemble_context(root, context)
    # the key of what was copied (the working tree may have changed since the caller looked)
    key = source_key(context)
    want = archive_path(cache_dir, key)
    _download_wheelhouse(*requirements(context), context / "wheelhouse")
    progress(f"image: building {reference} (source key {key})")
    tool.run("rm", "--all", what="buildah rm --all")  # working containers a failed build left
    args = {**bases, "VERSION": __version__, "REVISION": _revision(root), "SOURCE_KEY": key}
    tool.run(
        "build",
        "--pull=never",
        "--network=none",
        "-f",
        str(context / _CONTAINERFILE),
        *(a for k, v in args.items() for a in ("--build-arg", f"{k}={v}")),
        "-t",
        reference,
        str(context),
        what="buildah build",
        timeout=1800,
    )
    partial = want.with_name(f".{want.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        tool.run("push", reference, f"oci-archive:{partial}:{reference}", what="buildah push")
        _name_for_containerd(partial, reference)
        partial.rename(want)
    finally:
        partial.unlink(missing_ok=True)
    for old in image_dir(cache_dir).glob("cohdi-agent-*.oci.tar"):
        if old != want:
            old.unlink(missing_ok=True)
    # the previous build's image, untagged by this one (the archive is what is kept)
    tool.run("rmi", "--prune", what="buildah rmi --prune")
    progress(f"image: {want} in {time.monotonic() - started:.0f} s")
    return Image(want, reference, key)


@dataclass(frozen=True, slots=True)
class Buildah:
    """buildah with the storage and containers.conf of `<cache>/image/containers/`."""

    binary: str
    env: dict[str, str]

    @classmethod
    def ensure(cls, cache_dir: Path) -> Buildah:
        """buildah and runc, installed from Debian when missing; the configuration written."""
        if shutil.which("buildah") is None or shutil.which("runc") is None:
            _apt_install(["buildah", "runc"])
        binary = shutil.which("buildah")
        if binary is None:
            raise errors.DevClusterError("buildah is not on PATH after installing it")
        return cls(binary, containers_env(cache_dir))

    def run(self, *args: str, what: str, timeout: float = 600) -> str:
        return debian.run([self.binary, *args], what=what, timeout=timeout, env=self.env)

    def has(self, name: str) -> bool:
        done = subprocess.run(
            [self.binary, "inspect", "--type", "image", "--format", "{{.FromImageID}}", name],
            capture_output=True,
            env=self.env,
            check=False,
        )
        return done.returncode == 0


def containers_env(cache_dir: Path) -> dict[str, str]:
    """The environment that points buildah (or podman, for a person looking at the images) at
    the cache's own storage and containers.conf; the files written on first use."""
    conf = image_dir(cache_dir) / "containers"
    conf.mkdir(parents=True, exist_ok=True)
    storage = conf / "storage.conf"
    engine = conf / "containers.conf"
    _write_if_changed(
        storage,
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{conf / "storage"}"\n'
        f'runroot = "{conf / "run"}"\n',
    )
    _write_if_changed(
        engine,
        "[containers]\n"
        "# no CAP_SYS_RESOURCE here: rlimits cannot be raised above the hard limit\n"
        'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
        "[engine]\n"
        "# crun fails on these machines (setrlimit, hybrid cgroups); runc works\n"
        'runtime = "runc"\n',
    )
    return {
        **os.environ,
        "CONTAINERS_STORAGE_CONF": str(storage),
        "CONTAINERS_CONF": str(engine),
        "BUILDAH_ISOLATION": "oci",
    }


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def _apt_install(packages: list[str]) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise errors.DevClusterError(
            f"{' and '.join(packages)} are needed to build the image: install them "
            f"(apt-get install --no-install-recommends {' '.join(packages)})"
        )
    argv = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        debian.run(argv, what="apt-get install", timeout=900, env=env)
    except errors.DevClusterError:
        debian.run(["apt-get", "update"], what="apt-get update", timeout=600, env=env)
        debian.run(argv, what="apt-get install", timeout=900, env=env)


def _ensure_base(
    cache_dir: Path, tool: Buildah, name: str, packages: Sequence[str], progress: building.Progress
) -> str:
    """`name` tagged also `<name>-<key of packages>`, made from a mmdebstrap tarball when that
    tag is missing; the keyed reference (what the build uses)."""
    keyed = f"{name}-{_package_key(packages)}"
    if tool.has(keyed):
        return keyed
    tar = image_dir(cache_dir) / f"{keyed.rsplit(':', 1)[1]}.tar"
    progress(f"image: Debian {debian.SUITE} with {', '.join(packages)} (mmdebstrap)")
    took = debian.rootfs_tar(cache_dir, tar, packages)
    progress(f"image: root filesystem in {took:.0f} s; importing it as {name}")
    try:
        container = tool.run("from", "--pull=never", "scratch", what="buildah from").strip()
        try:
            tool.run("add", container, str(tar), "/", what="buildah add")
            tool.run(
                "config",
                "--env",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--env",
                "LANG=C.UTF-8",
                "--cmd",
                "/bin/sh",
                "--label",
                f"io.cohdi.packages={','.join(packages)}",
                container,
                what="buildah config",
            )
            tool.run("commit", "--rm", container, keyed, what="buildah commit")
        except errors.DevClusterError:
            with contextlib.suppress(errors.DevClusterError):
                tool.run("rm", container, what="buildah rm")
            raise
        tool.run("tag", keyed, name, what="buildah tag")
    finally:
        tar.unlink(missing_ok=True)
    return keyed


def _assemble_context(root: Path, context: Path) -> None:
    shutil.rmtree(context, ignore_errors=True)
    for rel in source_files(root):
        dest = context / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest)


def _download_wheelhouse(build: list[str], run: list[str], dest: Path) -> None:
    """`pip download` of the build and run-time requirements as wheels for the container's
    CPython 3.11 on glibc (manylinux up to 2.36, bookworm's) and this architecture, through the
    host's pip configuration (index, proxy, certificates); `requirements.txt` lists the
    run-time ones."""
    dest.mkdir(parents=True, exist_ok=True)
    arch = platform.machine()
    platforms = [f"manylinux_2_{minor}_{arch}" for minor in range(36, 16, -1)]
    platforms += [f"manylinux2014_{arch}"]
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(dest)]
    argv += ["--only-binary=:all:", "--python-version", _PYTHON, "--implementation", "cp"]
    argv += ["--abi", "cp311", "--abi", "abi3", "--abi", "none"]
    argv += [a for p in platforms for a in ("--platform", p)]
    debian.run([*argv, *build, *run], what="pip download (the image's wheelhouse)", timeout=900)
    (dest / "requirements.txt").write_text("".join(f"{r}\n" for r in run))


def _revision(root: Path) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if done.returncode == 0:
            return done.stdout.strip()
    return "unknown"


def _name_for_containerd(archive: Path, reference: str) -> None:
    """Give every manifest of the archive's index.json both names: `ref.name` (OCI, what
    podman and skopeo read) and `io.containerd.image.name` (what `ctr images import` takes as
    the image's name as is). The tar is rewritten in place, other members unchanged."""
    rewritten = archive.with_name(archive.name + ".rewrite")
    with tarfile.open(archive) as src, tarfile.open(rewritten, "w") as dst:
        for member in src:
            data = src.extractfile(member) if member.isfile() else None
            if member.name.lstrip("./") == "index.json" and data is not None:
                index = json.loads(data.read())
                for manifest in index.get("manifests", []):
                    notes = manifest.setdefault("annotations", {})
                    notes[_ANNOTATION_REF] = reference
                    notes[_ANNOTATION_CONTAINERD] = reference
                raw = json.dumps(index, separators=(",", ":")).encode()
                member.size = len(raw)
                dst.addfile(member, io.BytesIO(raw))
            else:
                dst.addfile(member, data)
    rewritten.replace(archive)
