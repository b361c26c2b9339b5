"""Settings and the command line: defaults, environment twins, precedence, and bad values exiting
with status 2 and a message that names the setting, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from agent import cli, errors, settings


def test_defaults_are_valid_and_documented() -> None:
    cfg = settings.Settings()
    assert cfg.leader.renew_deadline < cfg.leader.duration
    infos = list(settings.describe())
    assert len({i.flag for i in infos}) == len(infos), "flags must be unique"
    for info in infos:
        assert info.help.endswith("."), info.flag
        assert info.env == "COHDI_" + info.flag[2:].replace("-", "_").upper()


def test_flag_beats_environment_beats_default() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["run", "--lease-duration", "20"])
    env = {"COHDI_LEASE_DURATION": "30", "COHDI_LOG_FORMAT": "json"}
    cfg = cli.load_settings(args, env)
    assert cfg.leader.duration == 20.0
    assert cfg.logging.format == "json"
    assert cfg.leader.retry_period == settings.LeaderSettings().retry_period


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        (
            {"--lease-duration": "soon"},
            ["--lease-duration", "COHDI_LEASE_DURATION", "soon", "number"],
        ),
        ({"--lease-duration": "0"}, ["--lease-duration", ">= 1"]),
        ({"--lease-duration": "nan"}, ["--lease-duration", "finite"]),
        ({"--log-format": "xml"}, ["--log-format", "'xml'", "text, json"]),
        ({"--kube-watch-timeout": "7200"}, ["--kube-watch-timeout", "<= 3600"]),
        ({"--lease-renew-deadline": "20"}, ["--lease-renew-deadline", "below --lease-duration"]),
    ],
)
def test_bad_values_name_setting_value_and_rule(raw: dict[str, str], names: list[str]) -> None:
    with pytest.raises(errors.ConfigError) as info:
        settings.load(raw)
    for name in names:
        assert name in str(info.value)


def test_settings_are_frozen() -> None:
    cfg = settings.Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.leader.duration = 1  # type: ignore[misc]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


def test_bad_setting_exits_2_naming_it() -> None:
    done = _run("version", env={"COHDI_LEASE_RETRY_PERIOD": "-1"})
    assert done.returncode == 2
    assert "--lease-retry-period (COHDI_LEASE_RETRY_PERIOD)" in done.stderr
    assert "'-1'" in done.stderr
    assert ">= 0.05" in done.stderr


def test_help_explains_every_setting() -> None:
    top = _run("--help")
    assert top.returncode == 0
    for command in ("version", "demo", "dev-cluster"):
        assert command in top.stdout
    assert "COHDI_LEASE_DURATION" in top.stdout  # the epilog explains env twins
    helps = {c: " ".join(_run(c, "--help").stdout.split()) for c in settings.COMMANDS}
    for info in settings.describe():  # each setting with its env twin, in its commands' help
        for command in info.commands:
            assert info.flag in helps[command], (command, info.flag)
            assert info.env in helps[command], (command, info.flag)
    assert "Default: 15.0 s" in helps["run"]


def test_version_names_python_and_kubernetes() -> None:
    done = _run("version")
    assert done.returncode == 0
    assert "cohdi-agent 0." in done.stdout
    assert "python 3." in done.stdout
    assert "kubernetes v1.36" in done.stdout
