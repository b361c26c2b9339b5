"""Pure pieces of the edges: error mapping, dropped-field detection, JSON logs, the Go wrapper
module's replace list."""

from __future__ import annotations

import io
import json
import logging

import orjson
import pytest

from agent import errors, logs
from agent.devcluster.building import staging_replaces
from agent.kube.client import _raise_for, path_of
from agent.kube.objects import dropped_fields


@pytest.mark.parametrize(
    ("status", "reason", "cls", "transient"),
    [
        (404, "NotFound", errors.KubeNotFound, False),
        (409, "Conflict", errors.KubeConflict, True),
        (409, "AlreadyExists", errors.KubeAlreadyExists, False),
        (410, "Expired", errors.KubeGone, True),
        (401, "Unauthorized", errors.KubeUnauthorized, True),
        (403, "Forbidden", errors.KubeForbidden, False),
        (422, "Invalid", errors.KubeInvalid, False),
        (429, "TooManyRequests", errors.KubeUnavailable, True),
        (503, "ServiceUnavailable", errors.KubeUnavailable, True),
    ],
)
def test_status_codes_map_to_the_error_tree(
    status: int, reason: str, cls: type[errors.KubeError], transient: bool
) -> None:
    body = orjson.dumps({"kind": "Status", "reason": reason, "message": "spec.x: Invalid value"})
    with pytest.raises(cls) as info:
        _raise_for(status, body, "PUT", "/apis/x")
    assert info.value.transient is transient
    assert info.value.status == status
    assert "spec.x: Invalid value" in str(info.value)
    assert "PUT /apis/x" in str(info.value)


def test_retry_after_comes_from_the_header_or_the_status_details() -> None:
    body = orjson.dumps({"kind": "Status", "reason": "TooManyRequests", "message": "slow down"})
    with pytest.raises(errors.KubeUnavailable) as info:
        _raise_for(429, body, "GET", "/api/v1", {"retry-after": "2"})
    assert info.value.retry_after == 2.0
    assert info.value.headers["Retry-After"] == "2"  # kept, and case-insensitive
    details = orjson.dumps(
        {"kind": "Status", "reason": "TooManyRequests", "details": {"retryAfterSeconds": 4}}
    )
    with pytest.raises(errors.KubeUnavailable) as info:
        _raise_for(429, details, "GET", "/api/v1")
    assert info.value.retry_after == 4.0
    with pytest.raises(errors.KubeNotFound) as missing:  # only 429/5xx ask us to wait
        _raise_for(404, body, "GET", "/api/v1", {"Retry-After": "2"})
    assert missing.value.retry_after is None


def test_non_json_error_bodies_are_truncated() -> None:
    with pytest.raises(errors.KubeUnavailable) as info:
        _raise_for(502, b"<html>" + b"x" * 5000, "GET", "/api/v1")
    assert len(str(info.value)) < 400


def test_paths() -> None:
    assert path_of(group="", version="v1", plural="pods", namespace="a b", name="p") == (
        "/api/v1/namespaces/a%20b/pods/p"
    )
    assert path_of(group="resource.k8s.io", version="v1", plural="resourceslices") == (
        "/apis/resource.k8s.io/v1/resourceslices"
    )


def test_dropped_fields_finds_gated_fields_the_server_removed() -> None:
    sent = {
        "perDeviceNodeSelection": True,
        "devices": [{"name": "d", "bindsToNode": True, "bindingConditions": ["Ready"]}],
    }
    stored = {"devices": [{"name": "d"}]}
    assert dropped_fields(sent, stored) == [
        "perDeviceNodeSelection",
        "devices[0].bindsToNode",
        "devices[0].bindingConditions",
    ]
    assert dropped_fields(sent, sent) == []
    assert dropped_fields({"devices": [1, 2]}, {"devices": [1]}) == ["devices"]
    # empty values the server omits are not "dropped"
    assert dropped_fields({"taints": [], "x": None}, {}) == []


def test_json_log_lines_carry_extras() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    log = logging.getLogger("test.json")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("claim %s waits", "c1", extra={"claim": "uid-1"})
    finally:
        log.removeHandler(handler)
    doc = json.loads(stream.getvalue())
    assert doc["msg"] == "claim c1 waits"
    assert doc["level"] == "warning"
    assert doc["claim"] == "uid-1"
    assert doc["ts"].endswith("Z")


def test_staging_replaces_point_at_published_modules() -> None:
    gomod = """module k8s.io/kubernetes
go 1.26.0
require (
\tk8s.io/api v0.0.0
)
replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/kube-scheduler => ./staging/src/k8s.io/kube-scheduler
)
"""
    assert staging_replaces(gomod, "v1.36.3") == [
        "\tk8s.io/api => k8s.io/api v0.36.3",
        "\tk8s.io/kube-scheduler => k8s.io/kube-scheduler v0.36.3",
    ]
    with pytest.raises(errors.DevClusterError, match="no staging replace"):
        staging_replaces("module x\n", "v1.36.3")
