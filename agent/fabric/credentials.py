"""Fabric-manager secrets: read from a file, a systemd credential or an environment variable,
held in a `Secret` whose repr and str never show the value, so a stray log line or traceback
cannot leak it."""

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
    *,
    file: str,
    env_var: str,
    what: str,
    credential: str = "",
    environ: Mapping[str, str] | None = None,
) -> Secret:
    """The secret from, in this order: `file` (its first line) if given; the systemd credential
    `$CREDENTIALS_DIRECTORY/<credential>` (a unit's `LoadCredential=<credential>:...`) if
    systemd passed a credentials directory holding it; `$env_var`; else empty. A file or
    credential that exists but cannot be read is a ConfigError."""
    env = os.environ if environ is None else environ
    if file:
        return Secret(_first_line(Path(file), f"{what} file"))
    directory = env.get("CREDENTIALS_DIRECTORY", "")
    if credential and directory:
        path = Path(directory) / credential
        if path.exists():
            return Secret(_first_line(path, f"systemd credential {credential!r} of {what}"))
    return Secret(env.get(env_var, ""))


def _first_line(path: Path, what: str) -> str:
    try:
        text = path.read_text()
    except OSError as exc:
        raise errors.ConfigError(
            what, str(path), f"cannot be read ({exc.strerror}); give a readable file"
        ) from exc
    lines = text.splitlines()
    return lines[0].strip() if lines else ""
