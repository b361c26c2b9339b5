"""The one structured logger: the same record as one JSON object and as a readable text line, the
fields in a fixed order, durations in seconds, unknown field names refused, fatal errors in the
chosen format, and everything (library lines, warnings, uncaught exceptions) through one handler."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from agent import logs

ROOT = Path(__file__).resolve().parents[2]


def _record(**fields: object) -> logging.LogRecord:
    record = logging.makeLogRecord(
        {
            "name": "agent.controllers.composing",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "%s: %s attached to %s in %.3f s",
            "args": ("gpu-gpu-1", "gpu-1", "node-0", 0.27),
            "created": 1_790_000_000.25,
            "msecs": 250.0,
        }
    )
    record.__dict__.update(fields)
    return record


def test_the_same_line_in_json_and_in_text() -> None:
    fields = logs.fields(
        device="gpu-1", decision="attached", node="node-0", duration=0.2704, resource="gpu-gpu-1"
    )
    doc = orjson.loads(logs.JsonFormatter().format(_record(**fields)))
    assert list(doc) == [
        "ts",
        "level",
        "logger",
        "msg",
        "decision",
        "resource",
        "device",
        "node",
        "duration",
    ]
    assert doc["ts"] == "2026-09-21T14:13:20.250Z"
    assert doc["msg"] == "gpu-gpu-1: gpu-1 attached to node-0 in 0.270 s"
    assert doc["duration"] == 0.27
    text = logs.TextFormatter().format(_record(**fields))
    print(text)
    assert text.endswith(
        "INFO    agent.controllers.composing: gpu-gpu-1: gpu-1 attached to node-0 in 0.270 s "
        "decision=attached resource=gpu-gpu-1 device=gpu-1 node=node-0 duration=0.270s"
    )


def test_fields_drop_empty_values_and_refuse_unknown_names() -> None:
    assert logs.fields(claim="default/c1", device="", node=None) == {"claim": "default/c1"}
    with pytest.raises(ValueError, match="unknown log fields"):
        logs.fields(devcie="gpu-1")


def test_a_text_value_with_spaces_is_quoted() -> None:
    text = logs.TextFormatter().format(_record(error="no answer within 30 s"))
    assert text.endswith("error='no answer within 30 s'")


def test_fatal_in_each_format() -> None:
    out = io.StringIO()
    logs.fatal("invalid setting --x='1': bad", fmt="json", code=2, fault="config", stream=out)
    doc = orjson.loads(out.getvalue())
    assert (doc["level"], doc["fault"], doc["exit"]) == ("error", "config", 2)
    out = io.StringIO()
    logs.fatal("invalid setting --x='1': bad", fmt="text", code=2, fault="config", stream=out)
    assert out.getvalue() == "cohdi-agent: config error: invalid setting --x='1': bad\n"


def test_wanted_format_reads_the_command_line_then_the_environment() -> None:
    assert logs.wanted_format(["--log-format", "json", "run"], {}) == "json"
    assert logs.wanted_format(["run", "--log-format=json"], {}) == "json"
    assert logs.wanted_format(["run"], {"COHDI_LOG_FORMAT": "json"}) == "json"
    assert logs.wanted_format(["run", "--log-format", "text"], {"COHDI_LOG_FORMAT": "json"}) == (
        "text"
    )
    assert logs.wanted_format(["run", "--", "--log-format", "json"], {}) == "text"


def test_every_line_of_a_process_goes_through_the_one_handler() -> None:
    """Library loggers, Python warnings and an uncaught exception in a thread all come out as
    JSON objects once logging is configured."""
    code = """
import logging, threading, warnings
from agent import logs
logs.configure(level="info", fmt="json")
logging.getLogger("aiohttp.client").warning("a library line")
warnings.warn("a Python warning")
t = threading.Thread(target=lambda: 1 / 0, name="worker")
t.start(); t.join()
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "default"},
        check=True,
    )
    lines = done.stderr.splitlines()
    docs = [orjson.loads(line) for line in lines]  # raises if any line is not JSON
    loggers = [d["logger"] for d in docs]
    print(loggers)
    assert loggers == ["aiohttp.client", "py.warnings", "agent"]
    assert "ZeroDivisionError" in docs[2]["exc"]
