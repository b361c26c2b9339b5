"""Kubernetes names made from ids that come from outside (fabric device ids, fabric ids, models).

Every Kubernetes name we derive from a fabric's id goes through this module, one function per
Kubernetes rule, so that the result is always accepted by the API server, whatever the fabric sends
(upper case, `_`, unicode, 500 characters, nothing but punctuation, the empty string), and two
distinct ids never share a name (the API server answers 422 `Duplicate value` when two devices of a
slice share one, and the pool is not published at all).

The format is an on-the-wire identity (device names end up in claims' allocations,
ComposableResource names are how two scaler passes agree on one attachment): it must not change
between releases.

    name(id) = id                              when id already obeys the rule
             = <stem>-<hash>                   otherwise
             = <hash>                          when the stem is empty

- `hash`: the first 10 characters of the lower-case, unpadded base32 of SHA-256 of the *raw* id's
  UTF-8 bytes (50 bits, characters `a-z2-7`). It is taken of the raw id, so ids that normalise
  alike (`GPU_0` and `Gpu_0`, or two 500-character ids sharing a prefix) still differ.
- `stem`: the id made to obey the rule — for the lower-case rules lower-cased; every run of
  characters the rule does not allow becomes one `-` (`.` too, inside a DNS label); leading and
  trailing characters that may not start or end a name removed; cut to leave room for `-<hash>`.

Why this is collision-free: an id that obeys the rule maps to itself, and one that does not maps to
a name ending in the hash of the raw id, so two such ids share a name only if their 50-bit hashes
do. The one remaining way to collide is a valid id that spells out exactly the normalised name of
another (`gpu-0-<hash of GPU_0>`), which a fabric would have to do on purpose. Lookups from a name
back to an id go through an index built from the forward mapping (see the publisher), never by
guessing the reverse.

Rules mirrored, from k8s.io/apimachinery/pkg/util/validation (and the DRA API's own validation):
- DNS-1123 label, `IsDNS1123Label`: <= 63, `[a-z0-9]([-a-z0-9]*[a-z0-9])?` — DRA device names
  (`resource.k8s.io/v1` `Device.name`).
- DNS-1123 subdomain, `IsDNS1123Subdomain`: <= 253, `[a-z0-9]([-a-z0-9]*[a-z0-9])?` labels joined by
  `.` — object names (ResourceSlice, ComposableResource).
- DRA pool name (`ResourcePool.name`, `validatePoolName` in pkg/apis/resource/validation): <= 253
  characters, one or more DNS-1123 subdomains separated by `/`.
- Label value, `IsValidLabelValue`: <= 63, empty or `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`.
- Name part of a qualified name (label keys), `IsQualifiedName`: <= 63,
  `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Final

HASH_LENGTH: Final = 10

DNS_LABEL_MAX: Final = 63
DNS_SUBDOMAIN_MAX: Final = 253
POOL_NAME_MAX: Final = 253
LABEL_VALUE_MAX: Final = 63
QUALIFIED_NAME_PART_MAX: Final = 63
ATTRIBUTE_STRING_MAX: Final = 64  # bytes

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = rf"{_LABEL}(\.{_LABEL})*"
_MIXED = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"

DNS_LABEL: Final = re.compile(_LABEL)
DNS_SUBDOMAIN: Final = re.compile(_SUBDOMAIN)
POOL_NAME: Final = re.compile(rf"{_SUBDOMAIN}(/{_SUBDOMAIN})*")
LABEL_VALUE: Final = re.compile(rf"({_MIXED})?")
QUALIFIED_NAME_PART: Final = re.compile(_MIXED)


def id_hash(raw: str) -> str:
    """The 10-character hash of a raw id (`a-z2-7`), as appended to normalised names."""
    digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:HASH_LENGTH]


def is_dns_label(text: str) -> bool:
    return len(text) <= DNS_LABEL_MAX and DNS_LABEL.fullmatch(text) is not None


def is_dns_subdomain(text: str) -> bool:
    return len(text) <= DNS_SUBDOMAIN_MAX and DNS_SUBDOMAIN.fullmatch(text) is not None


def is_pool_name(text: str) -> bool:
    return len(text) <= POOL_NAME_MAX and POOL_NAME.fullmatch(text) is not None


def is_label_value(text: str) -> bool:
    return len(text) <= LABEL_VALUE_MAX and LABEL_VALUE.fullmatch(text) is not None


def is_qualified_name_part(text: str) -> bool:
    return len(text) <= QUALIFIED_NAME_PART_MAX and QUALIFIED_NAME_PART.fullmatch(text) is not None


def _with_hash(raw: str, stem: str, limit: int, trim: str) -> str:
    """`<stem>-<hash(raw)>` within `limit`, or `<hash>` when nothing of the stem is left. `trim`:
    the characters that may not end the cut stem (the hash is always preceded by `-`)."""
    room = limit - HASH_LENGTH - 1
    stem = stem[:room].rstrip(trim)
    return f"{stem}-{id_hash(raw)}" if stem else id_hash(raw)


_NOT_LABEL = re.compile(r"[^a-z0-9]+")
_NOT_SUBDOMAIN = re.compile(r"[^a-z0-9.]+")
_NOT_MIXED = re.compile(r"[^A-Za-z0-9_.-]+")


def dns_label(raw: str, *, limit: int = DNS_LABEL_MAX) -> str:
    """A DNS-1123 label (<= `limit` <= 63) for `raw`: `raw` itself when it is one, else
    `<stem>-<hash>` (see the module's docstring). DRA device names."""
    if len(raw) <= limit and is_dns_label(raw):
        return raw
    stem = _NOT_LABEL.sub("-", raw.lower()).strip("-")
    return _with_hash(raw, stem, limit, "-")


def dns_subdomain(raw: str, *, limit: int = DNS_SUBDOMAIN_MAX) -> str:
    """A DNS-1123 subdomain (<= `limit` <= 253) for `raw`: `raw` itself when it is one, else
    `<stem>-<hash>`. Object names (ComposableResource, ResourceSlice)."""
    if len(raw) <= limit and is_dns_subdomain(raw):
        return raw
    return _with_hash(raw, _subdomain_stem(raw), limit, "-.")


def hashed_subdomain(raw: str, *, readable: str, limit: int = DNS_SUBDOMAIN_MAX) -> str:
    """`<stem of readable>-<hash of raw>`, a DNS subdomain (<= `limit`), hashed even when
    `readable` is valid: names of objects that are ours alone (ResourceSlices), where `raw` says
    unambiguously what the object is for and `readable` is only for people."""
    return _with_hash(raw, _subdomain_stem(readable), limit, "-.")


def _subdomain_stem(raw: str) -> str:
    stem = _NOT_SUBDOMAIN.sub("-", raw.lower())
    # each dot-separated label must start and end alphanumeric: drop empty labels and edge dashes
    return ".".join(p for p in (part.strip("-") for part in stem.split(".")) if p)


def pool_name(raw: str) -> str:
    """A DRA pool name for `raw`: `raw` itself when it is one (subdomains joined by `/`, <= 253),
    else the DNS subdomain `<stem>-<hash>` (no `/`)."""
    if is_pool_name(raw):
        return raw
    return dns_subdomain(raw)


def attribute_string(raw: str) -> str:
    """`raw` cut to the 64 bytes a DRA device attribute's string may hold (`validateDeviceAttribute`
    counts UTF-8 bytes, Go's `len`), never inside a character. The raw id stays findable through
    the publisher's index; the attribute is for people and CEL selectors."""
    data = raw.encode("utf-8", "surrogatepass")
    if len(data) <= ATTRIBUTE_STRING_MAX:
        return raw
    return data[:ATTRIBUTE_STRING_MAX].decode("utf-8", "ignore")


def _mixed(raw: str, limit: int, *, empty_ok: bool) -> str:
    if (empty_ok and raw == "") or (len(raw) <= limit and QUALIFIED_NAME_PART.fullmatch(raw)):
        return raw
    stem = _NOT_MIXED.sub("-", raw).strip("-_.")
    return _with_hash(raw, stem, limit, "-_.")


def label_value(raw: str) -> str:
    """A label value for `raw` (<= 63, case kept, `-_.` allowed inside): `raw` itself when it is
    one (the empty string included), else `<stem>-<hash>`."""
    return _mixed(raw, LABEL_VALUE_MAX, empty_ok=True)


def qualified_name_part(raw: str, *, limit: int = QUALIFIED_NAME_PART_MAX) -> str:
    """The name part of a label key (after `prefix/`) for `raw`, <= `limit` <= 63: `raw` itself
    when it is one, else `<stem>-<hash>`."""
    return _mixed(raw, limit, empty_ok=False)
