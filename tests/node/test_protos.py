"""Our hand-written .proto files against kubelet's own (k8s.io/kubelet v0.36.3 from the Go module
cache): identical packages, services, methods (with request/response types), and for every
message identical field names, numbers, types and labels, and identical enums. Plus: agent/_proto
is not stale."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools
import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]
OURS = REPO / "proto"
KUBELET = "k8s.io/kubelet@v0.36.3"
APIS = {
    "dra/v1": "pkg/apis/dra/v1/api.proto",
    "dra/v1beta1": "pkg/apis/dra/v1beta1/api.proto",
    # a Python package cannot be called dra-health: ours lives at drahealth/, same wire package
    "drahealth/v1alpha1": "pkg/apis/dra-health/v1alpha1/api.proto",
    "pluginregistration/v1": "pkg/apis/pluginregistration/v1/api.proto",
}


@pytest.fixture(scope="module")
def upstream() -> Path:
    """k8s.io/kubelet's source in the Go module cache (downloaded from the Go module proxy if
    this machine has not fetched it yet)."""
    modcache = subprocess.run(
        ["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True
    ).stdout.strip()
    root = Path(modcache) / KUBELET
    if not root.exists():
        subprocess.run(
            ["go", "mod", "download", KUBELET],
            check=True,
            cwd=tempfile.gettempdir(),
            env={**os.environ, "GOFLAGS": "-mod=mod"},
        )
    assert (root / APIS["dra/v1"]).exists()
    return root


def descriptor(include: Path, rel: str, tmp: Path) -> descriptor_pb2.FileDescriptorProto:
    out = tmp / (rel.replace("/", "_") + ".pb")
    std = Path(grpc_tools.__file__).parent / "_proto"
    assert (
        protoc.main(["protoc", f"-I{include}", f"-I{std}", f"--descriptor_set_out={out}", rel]) == 0
    )
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return fds.file[0]


def shape(fd: descriptor_pb2.FileDescriptorProto) -> dict[str, object]:
    return {
        "package": fd.package,
        "services": {
            s.name: {
                m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
                for m in s.method
            }
            for s in fd.service
        },
        "messages": {m.name: _fields(m) for m in fd.message_type},
        "enums": {e.name: {v.name: v.number for v in e.value} for e in fd.enum_type},
    }


def _fields(m: descriptor_pb2.DescriptorProto) -> dict[str, object]:
    out: dict[str, object] = {
        f.name: (
            f.number,
            f.type,
            f.label,
            f.type_name,
            f.HasField("proto3_optional") and f.proto3_optional,
        )
        for f in m.field
    }
    for nested in m.nested_type:  # map entries
        out[f"<{nested.name}>"] = _fields(nested)
    return out


@pytest.mark.parametrize("api", sorted(APIS))
def test_our_protos_match_kubelet(api: str, upstream: Path, tmp_path: Path) -> None:
    ours = descriptor(OURS, f"agent/_proto/{api}/api.proto", tmp_path)
    theirs = descriptor(upstream, APIS[api], tmp_path)
    assert shape(ours) == shape(theirs)
    assert ours.service, "a service is defined"


def test_generated_code_is_not_stale() -> None:
    done = subprocess.run(
        [sys.executable, str(OURS / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr + done.stdout
