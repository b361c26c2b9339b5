"""`kubectl explain` documents both CRDs: every field of ComposableResource and
ComposabilityRequest, as the real kube-apiserver publishes them in its OpenAPI v3 (what kubectl
explain reads), has a description.

Before: most ComposabilityRequest fields and 9 of the 10 ComposableResource status fields had
none, so `kubectl explain composableresource.status.state` printed an empty DESCRIPTION."""

from __future__ import annotations

from typing import Any

import pytest

from agent.kube.client import Kube
from agent.manifests import crds, installing
from tests.waiting import until

pytestmark = pytest.mark.controlplane

KINDS = ("ComposableResource", "ComposabilityRequest")


def _schema_name(kind: str) -> str:
    """The name kube-apiserver gives a CRD kind's schema: the group reversed, then version."""
    return ".".join(reversed(crds.GROUP.split("."))) + f".{crds.VERSION}.{kind}"


def undocumented(node: dict[str, Any], path: str) -> list[str]:
    """Every field path under `node` without a description, as `kubectl explain` walks them:
    object properties, array items, map values. References to Kubernetes' own types (metadata:
    ObjectMeta) are not ours to document; the field that holds one must still say what it is."""
    missing = [] if node.get("description") else [path]
    for name, child in (node.get("properties") or {}).items():
        missing += undocumented(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        missing += undocumented(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        missing += undocumented(node["additionalProperties"], f"{path}{{}}")
    return missing


def fields(node: dict[str, Any]) -> int:
    count = len(node.get("properties") or {})
    for child in (node.get("properties") or {}).values():
        count += fields(child)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            count += fields(node[key])
    return count


async def _published(kube: Kube) -> dict[str, Any]:
    index = await kube.get("/openapi/v3")
    entry = index["paths"].get(f"apis/{crds.GROUP}/{crds.VERSION}")
    if entry is None:
        return {}
    doc = await kube.get("/" + entry["serverRelativeURL"].lstrip("/"))
    schemas = doc.get("components", {}).get("schemas", {})
    found = {kind: schemas.get(_schema_name(kind)) for kind in KINDS}
    return found if all(found.values()) else {}


async def test_every_field_of_both_crds_is_documented_in_the_published_openapi(
    kube: Kube,
) -> None:
    await installing.install(kube, "explain.cohdi.io")
    schemas = await until(
        lambda: _published(kube), what="the CRDs' OpenAPI v3 published", interval=0.2
    )
    for kind, schema in schemas.items():
        missing = undocumented(schema, kind.lower())
        print(f"{kind}: {fields(schema)} fields walked, {len(missing)} without a description")
        assert missing == [], f"{kind} fields without a description: {missing}"
    state = schemas["ComposableResource"]["properties"]["status"]["properties"]["state"]
    print(
        "KIND: ComposableResource\nFIELD: state <string>\nDESCRIPTION:\n    " + state["description"]
    )
    assert "Attaching" in state["description"]
    assert "Online" in state["description"]
