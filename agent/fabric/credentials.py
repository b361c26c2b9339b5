"""Fabric-manager secrets: read from a file or an environment variable, held in a `Secret` whose
repr and str never show the value, so a stray log line or traceback cannot leak it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from agent import errors


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__


def load_secret(
    *, file: str, env_var: str, what: str, environ: Mapping[str, str] | None = None
) -> Secret:
    """The secret from `file` (its first line) if given, else from `$env_var`, else empty."""
    env = os.environ if environ is None else environ
    if file:
        try:
            text = Path(file).read_text()
        except OSError as exc:
            raise errors.ConfigError(
                f"{what} file", file, f"cannot be read ({exc.strerror}); give a readable file"
            ) from exc
        lines = text.splitlines()
        return Secret(lines[0].strip() if lines else "")
    return Secret(env.get(env_var, ""))
