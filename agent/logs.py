"""Logging: one structured logger for the whole process, readable text on a terminal or one JSON
object a line for log collectors.

`configure()` is called once by `agent.cli` after settings are loaded; nothing in the package
configures logging at import. Every line goes through the root logger's one handler (our own
loggers, libraries', Python warnings, uncaught exceptions), so every line has the chosen format.

Fields. A line about an object carries it as a field, not only in its message: pass
``extra=logs.fields(claim="default/c1", device="gpu-3", duration=0.27)``. The names are
`FIELDS`; in JSON they are keys beside ``ts``, ``level``, ``logger`` and ``msg``, in text they
follow the message as ``key=value``. ``duration`` is seconds (a number, rounded to the
millisecond; text shows ``duration=0.270s``). A decision (attach requested, ready, failed,
detached, prepared, unprepared...) is one line at INFO (WARNING when it failed) with
``decision=<kind>``, the same kind as the `cohdi_decisions_total` counter, so a log query and a
metric count the same thing.

Fatal start-up errors (a bad setting, a command-line mistake, a failed start) are written by
`fatal()` in the chosen format too: in JSON one object with ``level: "error"`` and ``exit``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final, TextIO

import orjson

#: The structured fields, in the order text lines show them. ``duration`` is seconds.
FIELDS: Final = (
    "decision",
    "claim",
    "pod",
    "request",
    "resource",
    "device",
    "model",
    "node",
    "machine",
    "fabric",
    "reason",
    "duration",
    "error",
)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def fields(**values: Any) -> dict[str, Any]:
    """The `extra=` of a log call: the given fields, without empty ones (None, ""), durations
    rounded to the millisecond. Raises ValueError for a name outside `FIELDS` (a typo would
    otherwise become a field nobody queries)."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown log fields {sorted(unknown)}; known: {', '.join(FIELDS)}")
    out: dict[str, Any] = {}
    for name in FIELDS:
        value = values.get(name)
        if value is None or value == "":
            continue
        out[name] = round(float(value), 3) if name == "duration" else value
    return out


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
    ordered = {k: extras.pop(k) for k in FIELDS if k in extras}
    return ordered | extras


def _timestamp(created: float) -> str:
    millis = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (UTC, ms), level, logger, msg, the fields, exc (a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_extras(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def _text_value(name: str, value: Any) -> str:
    if name == "duration" and isinstance(value, int | float):
        return f"{value:.3f}s"
    text = str(value)
    return repr(text) if (" " in text or not text) else text


class TextFormatter(logging.Formatter):
    """``HH:MM:SS LEVEL logger: message key=value ...`` for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            tail = " ".join(f"{k}={_text_value(k, v)}" for k, v in extras.items())
            head, sep, trace = line.partition("\n")
            line = f"{head} {tail}{sep}{trace}"
        return line


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(*, level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Route every log line of the process through one handler on stderr (or `stream`) in `fmt`
    ('text' or 'json'): replaces any handler already on the root logger, takes Python warnings
    and uncaught exceptions (main thread and others) into the log."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    # aiohttp's access log and kubernetes-asyncio's debug dumps would drown our own lines.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("kubernetes_asyncio").setLevel(logging.WARNING)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_thread


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("agent").critical("uncaught exception", exc_info=(kind, exc, tb))


def _log_uncaught_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("agent").critical(
        "uncaught exception in thread %s",
        name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def wanted_format(argv: list[str], environ: Mapping[str, str]) -> str:
    """The log format asked for, read before the settings are (to report a bad setting or a
    command-line mistake in it): the last --log-format on the command line, else
    $COHDI_LOG_FORMAT; 'json' if that says json, else 'text'."""
    chosen = environ.get("COHDI_LOG_FORMAT", "text")
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--log-format" and i + 1 < len(argv):
            chosen = argv[i + 1]
        elif arg.startswith("--log-format="):
            chosen = arg.partition("=")[2]
    return "json" if chosen.strip() == "json" else "text"


def fatal(
    message: str,
    *,
    fmt: str,
    code: int,
    fault: str = "",
    usage: bool = False,
    stream: TextIO | None = None,
) -> None:
    """Write a fatal start-up error as the last line before exiting with `code`. JSON: one
    object (level error, logger agent.cli, msg, fault when known, exit). Text:
    ``cohdi-agent: [<fault> ]error: <message>``, or `message` as it is for a usage error
    (argparse's own line)."""
    out = stream or sys.stderr
    if fmt == "json":
        doc: dict[str, Any] = {
            "ts": _timestamp(time.time()),
            "level": "error",
            "logger": "agent.cli",
            "msg": message,
        }
        if fault:
            doc["fault"] = fault
        doc["exit"] = code
        out.write(orjson.dumps(doc).decode() + "\n")
    elif usage:
        out.write(message + "\n")
    else:
        out.write(f"cohdi-agent: {fault + ' ' if fault else ''}error: {message}\n")
    out.flush()
