"""Small pure helpers over raw Kubernetes JSON (no I/O)."""

from __future__ import annotations

from typing import Any


def dropped_fields(sent: Any, stored: Any, path: str = "") -> list[str]:
    """Paths present in what we sent but absent from what the server stored.

    The API server silently drops fields whose feature gate is off (for DRA: `bindsToNode`,
    `bindingConditions`, `perDeviceNodeSelection`, ...). Comparing the create/update answer with
    the request is how a publisher notices, instead of the scheduler quietly binding pods to GPUs
    that were never attached. Values the server normalises (quantities, defaults) are not reported:
    only missing keys and shortened lists.
    """
    missing: list[str] = []
    if isinstance(sent, dict):
        if not isinstance(stored, dict):
            return [path or "."]
        for key, value in sent.items():
            sub = f"{path}.{key}" if path else key
            if key not in stored:
                if value not in (None, [], {}, False):
                    missing.append(sub)
            else:
                missing.extend(dropped_fields(value, stored[key], sub))
    elif isinstance(sent, list):
        if not isinstance(stored, list) or len(stored) < len(sent):
            return [path]
        for i, (a, b) in enumerate(zip(sent, stored, strict=False)):
            missing.extend(dropped_fields(a, b, f"{path}[{i}]"))
    return missing
