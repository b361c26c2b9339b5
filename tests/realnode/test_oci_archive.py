"""The OCI image archive `nodebuild.oci_archive` writes (what `ctr images import` loads into the
real node's containerd): a valid image layout whose every descriptor names a blob of that digest
and size, a config whose diff_id is the uncompressed layer's digest, the files as executables,
and the image name where containerd and the OCI spec read it."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile

from agent.devcluster import nodebuild


def _members(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def _blob(files: dict[str, bytes], descriptor: dict[str, object]) -> bytes:
    algo, hexdigest = str(descriptor["digest"]).split(":")
    data = files[f"blobs/{algo}/{hexdigest}"]
    assert hashlib.sha256(data).hexdigest() == hexdigest
    assert len(data) == descriptor["size"]
    return data


def test_archive_is_a_named_oci_layout_of_one_executable_layer() -> None:
    archive = nodebuild.oci_archive(
        "registry.k8s.io/pause:3.10.2", {"pause": b"\x7fELF fake"}, entrypoint=["/pause"]
    )
    files = _members(archive)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(files["index.json"])
    (entry,) = index["manifests"]
    assert entry["annotations"] == {
        "io.containerd.image.name": "registry.k8s.io/pause:3.10.2",
        "org.opencontainers.image.ref.name": "3.10.2",
    }
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    manifest = json.loads(_blob(files, entry))
    assert manifest["mediaType"] == entry["mediaType"]
    config = json.loads(_blob(files, manifest["config"]))
    assert config["config"]["Entrypoint"] == ["/pause"]
    (layer_desc,) = manifest["layers"]
    diff = gzip.decompress(_blob(files, layer_desc))
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(diff).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(diff)) as layer:
        (member,) = layer.getmembers()
        assert (member.name, member.mode) == ("pause", 0o755)
        assert layer.extractfile(member).read() == b"\x7fELF fake"  # type: ignore[union-attr]
    # the same input gives the same bytes: an image's digest is stable across builds
    assert archive == nodebuild.oci_archive(
        "registry.k8s.io/pause:3.10.2", {"pause": b"\x7fELF fake"}, entrypoint=["/pause"]
    )


def test_an_untagged_name_is_latest() -> None:
    files = _members(nodebuild.oci_archive("cohdi.local/devcheck", {"x": b""}, entrypoint=["/x"]))
    (entry,) = json.loads(files["index.json"])["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "latest"
    ported = _members(
        nodebuild.oci_archive("localhost:5000/devcheck", {"x": b""}, entrypoint=["/x"])
    )
    (entry,) = json.loads(ported["index.json"])["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "latest"
