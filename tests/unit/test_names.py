"""Kubernetes names made from fabric ids: always valid by the Kubernetes rule they go to, the id
itself when it already is one, and never the same name for two ids.

The rules are written out again here, independently of `agent.model.names`, from
k8s.io/apimachinery/pkg/util/validation (IsDNS1123Label, IsDNS1123Subdomain, IsValidLabelValue,
IsQualifiedName) and the DRA API's validatePoolName. Inputs are generated from `random` with a
fixed seed (property-style, reproducible), plus the collisions seen in the field.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable

import pytest

from agent.kube.resources import resource_name
from agent.model import names
from agent.model import pool as poolmodel
from agent.model.fabric import (
    DeviceId,
    DeviceState,
    FabricId,
    Inventory,
    Machine,
    MachineId,
    PoolDevice,
)

LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
SUBDOMAIN = rf"{LABEL}(\.{LABEL})*"
MIXED = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"


def k8s_dns_label(s: str) -> bool:
    return len(s) <= 63 and re.fullmatch(LABEL, s, re.ASCII) is not None


def k8s_dns_subdomain(s: str) -> bool:
    return len(s) <= 253 and re.fullmatch(SUBDOMAIN, s, re.ASCII) is not None


def k8s_pool_name(s: str) -> bool:
    return len(s) <= 253 and all(k8s_dns_subdomain(part) for part in s.split("/"))


def k8s_label_value(s: str) -> bool:
    return len(s) <= 63 and (s == "" or re.fullmatch(MIXED, s, re.ASCII) is not None)


def k8s_qualified_name_part(s: str) -> bool:
    return len(s) <= 63 and re.fullmatch(MIXED, s, re.ASCII) is not None


def k8s_label_key(s: str) -> bool:
    prefix, _, name = s.rpartition("/")
    return (not prefix or k8s_dns_subdomain(prefix)) and k8s_qualified_name_part(name)


#: Each normaliser with the Kubernetes rule its output must obey.
RULES: list[tuple[str, Callable[[str], str], Callable[[str], bool]]] = [
    ("device name", poolmodel.device_name, k8s_dns_label),
    ("pool name", poolmodel.pool_name, k8s_pool_name),
    ("fabric label value", poolmodel.fabric_label, k8s_label_value),
    ("model label key", poolmodel.model_label, k8s_label_key),
    ("ComposableResource name", resource_name, k8s_dns_subdomain),
    ("object name", names.dns_subdomain, k8s_dns_subdomain),
    ("label name part", names.qualified_name_part, k8s_qualified_name_part),
]

#: Pairs that collided before: the API server refused the whole pool with 422 `Duplicate value`.
REPORTED = [("GPU_0", "gpu-0"), ("GPU-A", "gpu-a"), ("gpu.b", "gpu_b"), ("Fabric_1", "fabric-1")]

ALPHABET = "abcxyzABCXYZ0189-_./:@ %#ÄßЖ漢\u0301\t"


def generated(seed: int, n: int) -> list[str]:
    """`n` ids of 0..500 characters, mostly short, from an alphabet of valid characters,
    separators, punctuation, spaces and unicode; plus edge shapes (empty, only punctuation)."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test inputs, not secrets
    out = ["", "-", "_", ".", "/", "...", "---", "-_.-", " ", "漢字", "Ж" * 500, "a" * 500]
    for _ in range(n):
        length = rng.choice([rng.randint(0, 12), rng.randint(0, 70), rng.randint(0, 500)])
        out.append("".join(rng.choice(ALPHABET) for _ in range(length)))
    return out


@functools.cache
def inputs() -> list[str]:
    """The generated ids every rule is checked on: made once per process, on first use (not at
    import, which every pytest-xdist worker pays for while collecting)."""
    return generated(20240611, 3000)


@pytest.mark.parametrize(("what", "normalise", "valid"), RULES, ids=[r[0] for r in RULES])
def test_every_output_obeys_its_kubernetes_rule(
    what: str, normalise: Callable[[str], str], valid: Callable[[str], bool]
) -> None:
    bad = [(raw, normalise(raw)) for raw in inputs() if not valid(normalise(raw))]
    print(f"{what}: {len(inputs())} generated ids, {len(bad)} invalid outputs")
    assert not bad, bad[:5]


def built_valid(rng: random.Random, alnum: str, seps: str, max_len: int) -> str:
    """An id made to obey a rule: alphanumerics with single separators between them."""
    out = [rng.choice(alnum)]
    for _ in range(rng.randint(0, max_len - 1)):
        c = rng.choice(alnum + seps * 2)
        out.append(rng.choice(alnum) if c in seps and out[-1] in seps else c)
    return "".join(out).rstrip(seps) or "a"


@pytest.mark.parametrize(
    ("normalise", "valid", "alnum", "seps", "max_len"),
    [
        (names.dns_label, k8s_dns_label, "abz09", "-", 63),
        (names.dns_subdomain, k8s_dns_subdomain, "abz09", "-.", 253),
        (names.pool_name, k8s_pool_name, "abz09", "-./", 253),
        (names.label_value, k8s_label_value, "abzAZ09", "-_.", 63),
        (names.qualified_name_part, k8s_qualified_name_part, "abzAZ09", "-_.", 63),
    ],
    ids=["dns label", "dns subdomain", "pool name", "label value", "label name part"],
)
def test_valid_ids_are_kept_as_they_are(
    normalise: Callable[[str], str],
    valid: Callable[[str], bool],
    alnum: str,
    seps: str,
    max_len: int,
) -> None:
    rng = random.Random(7)  # noqa: S311 - reproducible test inputs, not secrets
    kept = [raw for raw in inputs() if valid(raw)]
    kept += [built_valid(rng, alnum, seps, max_len) for _ in range(3000)]
    assert all(valid(raw) for raw in kept)
    changed = [raw for raw in kept if normalise(raw) != raw]
    print(f"{normalise.__name__}: {len(kept)} valid ids, {len(changed)} changed")
    assert not changed, changed[:5]


@pytest.mark.parametrize(("a", "b"), REPORTED)
def test_reported_pairs_get_distinct_valid_names(a: str, b: str) -> None:
    for _, normalise, valid in RULES:
        na, nb = normalise(a), normalise(b)
        assert na != nb, (a, b, na)
        assert valid(na), (a, na)
        assert valid(nb), (b, nb)
    for raw in (a, b):  # a valid one keeps its name
        assert poolmodel.device_name(raw) == raw or not k8s_dns_label(raw)


@functools.cache
def near_identical(seed: int) -> list[str]:
    """Ids that differ only in case, separators, padding or an invisible character: what a
    lossy normalisation folds together. Made once per seed and process (20,000 of them: each
    rule's test reads the same list)."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test inputs, not secrets
    bases = ["gpu-0", "GPU_0", "gpu.0", "Fabric_1/GPU-07", "a" * 70, "x" * 300, "n" * 62]
    seps = ["-", "_", ".", " ", "", "--", "/", ":"]
    out = set(bases)
    while len(out) < 20000:
        base = rng.choice(bases)
        chars = [c.upper() if rng.random() < 0.3 else c for c in base]
        text = "".join(rng.choice(seps) if c in "-_." else c for c in chars)
        text = rng.choice(["", "-", "_", " ", "."]) + text + rng.choice(["", "-", "_", "\u200b"])
        if rng.random() < 0.3:
            text += str(rng.randint(0, 9))
        out.add(text)
    return sorted(out)


@pytest.mark.parametrize(("what", "normalise", "valid"), RULES, ids=[r[0] for r in RULES])
def test_no_two_near_identical_ids_share_a_name(
    what: str, normalise: Callable[[str], str], valid: Callable[[str], bool]
) -> None:
    ids = near_identical(3)
    seen: dict[str, str] = {}
    clashes = []
    for raw in ids:
        name = normalise(raw)
        if name in seen:
            clashes.append((seen[name], raw, name))
        seen[name] = raw
    print(f"{what}: {len(ids)} near-identical ids, {len(set(seen))} names, {len(clashes)} clashes")
    assert not clashes, clashes[:5]


def test_the_format_is_pinned() -> None:
    """On-the-wire identities: these exact names are in stored claims and ComposableResources,
    so any change here breaks upgrades."""
    assert names.id_hash("GPU_0") == "733r6jeacl"
    assert poolmodel.device_name("GPU_0") == "gpu-0-733r6jeacl"
    assert poolmodel.device_name("gpu-0") == "gpu-0"
    assert poolmodel.pool_name("Fabric_1") == f"fabric-1-{names.id_hash('Fabric_1')}"
    # one segment: two-segment names are the node pools'
    assert poolmodel.pool_name("fabric0/rack-2") == names.dns_subdomain("fabric0/rack-2")
    assert "/" not in poolmodel.pool_name("fabric0/rack-2")
    assert poolmodel.fabric_label("Fabric_1") == "Fabric_1"
    assert resource_name("gpu.b") == "gpu-gpu.b"
    assert resource_name("gpu_b") == f"gpu-gpu-b-{names.id_hash('gpu-gpu_b')}"
    assert poolmodel.model_label("NVIDIA-A100-PCIE-40GB") == "cohdi.io/NVIDIA-A100-PCIE-40GB-full"
    long = "X" * 100
    assert poolmodel.device_name(long) == "x" * 52 + "-" + names.id_hash(long)
    assert poolmodel.device_name("---") == names.id_hash("---")


def test_attribute_strings_fit_64_bytes_without_splitting_a_character() -> None:
    for raw in inputs():
        out = names.attribute_string(raw)
        assert len(out.encode()) <= 64
        assert raw.startswith(out)
    assert names.attribute_string("Ж" * 40) == "Ж" * 32


def test_a_fabric_of_colliding_ids_publishes_one_entry_per_device() -> None:
    fabric = FabricId("Fabric_1")
    ids = ["GPU_0", "gpu-0", "GPU-A", "gpu-a", "gpu.b", "gpu_b", "Ж" * 70]
    inventory = Inventory(
        (Machine(MachineId("m0"), "node-0", fabric, "node-0"),),
        tuple(PoolDevice(DeviceId(i), fabric, "A100", DeviceState.FREE) for i in ids),
    )
    out = poolmodel.desired_slices(driver="gpu.cohdi.io", inventory=inventory, node_of_machine={})
    (pool,) = out
    assert k8s_pool_name(pool)
    (slice_,) = out[pool]
    assert k8s_dns_subdomain(slice_.name)
    assert slice_.spec["pool"]["name"] == pool
    devices = slice_.spec["devices"]
    got = [d["name"] for d in devices]
    assert len(set(got)) == len(ids)
    assert all(k8s_dns_label(n) for n in got)
    raw = {d["attributes"][poolmodel.DEVICE_ID_ATTRIBUTE]["string"] for d in devices}
    assert raw >= set(ids[:-1])
    for d in devices:
        assert d["attributes"]["fabric"] == {"string": "Fabric_1"}
        (term,) = d["nodeSelector"]["nodeSelectorTerms"]
        for expr in term["matchExpressions"]:
            assert k8s_label_key(expr["key"])
            assert all(k8s_label_value(v) for v in expr.get("values", []))
