"""The command line as an operator meets it: each command's help lists only the settings it uses,
under their groups, with what each value is; the global settings work before the command; `run`
says which roles it runs and why; fatal start-up errors come in the chosen log format;
`manifests --out -` writes to standard output; the DeviceClass is named sensibly for any driver.

Before: every `--help` listed all ~50 settings (262-279 lines, `version --help` included),
integers and paths showed VALUE, `cohdi-agent --log-format json run` failed with "invalid choice:
'json'", --roles defaulted to cluster (a GPU server without --roles ran no node role), a bad
setting under --log-format json was plain text, `manifests --out -` made a directory named `-`, and
`--driver gpu.example.com` gave the DeviceClass `gpu.gpu.example.com`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import yaml

from agent import cli, errors, settings
from agent.manifests import cluster

ROOT = Path(__file__).resolve().parents[2]


def _run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT), **(env or {})},
        cwd=cwd,
        timeout=60,
        check=False,
    )


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def _help(parser: argparse.ArgumentParser) -> str:
    os.environ["COLUMNS"] = "80"
    try:
        return parser.format_help()
    finally:
        del os.environ["COLUMNS"]


def _group_titles(parser: argparse.ArgumentParser) -> set[str]:
    return {g.title for g in parser._action_groups if g._group_actions and g.title}


@pytest.mark.parametrize("command", settings.COMMANDS)
def test_each_command_lists_only_the_settings_it_uses_under_their_groups(command: str) -> None:
    sub = _subparsers(cli.build_parser())[command]
    text = _help(sub)
    used = cli.settings_of(command)
    assert used, f"{command} uses no setting at all?"
    for info in settings.describe():
        listed = f"  {info.flag} " in text or text.count(info.flag + "\n") > 0
        assert listed == (info in used), f"{command} --help and {info.flag}"
    titles = {info.title for info in used}
    own = _group_titles(sub) - titles - {"options", "positional arguments"}
    assert own <= {"the demo", "the manifests"}, own
    assert titles <= _group_titles(sub)
    # every value says what it is: no VALUE/TEXT placeholder anywhere
    assert "VALUE" not in text
    assert " TEXT" not in text


def test_every_setting_is_used_by_a_command_that_exists() -> None:
    for info in settings.describe():
        assert info.commands, info.flag
        assert set(info.commands) <= set(settings.COMMANDS), info.flag
        assert info.metavar, info.flag
        assert info.metavar != "TEXT", f"{info.flag} says what its value is"
        if info.unit == "s":
            assert info.metavar == "SECONDS", info.flag
        if info.choices:
            assert info.metavar == "|".join(info.choices), info.flag


def test_version_help_fits_one_screen_and_names_no_foreign_group() -> None:
    done = _run("version", "--help")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    print(f"version --help: {len(lines)} lines, widest {max(map(len, lines))} columns")
    assert len(lines) <= 24
    assert max(map(len, lines)) <= 80
    for foreign in ("--fabric", "--emulator", "--dev-", "--lease", "--node-", "--kubeconfig"):
        assert foreign not in done.stdout


def test_global_settings_work_before_and_after_the_command() -> None:
    parser = cli.build_parser()
    before = parser.parse_args(["--log-format", "json", "--kubeconfig", "/k", "run"])
    assert cli.load_settings(before, {}).logging.format == "json"
    assert cli.load_settings(before, {}).kube.kubeconfig == "/k"
    after = parser.parse_args(["run", "--log-format", "json"])
    assert cli.load_settings(after, {}).logging.format == "json"
    both = parser.parse_args(["--log-level", "debug", "run", "--log-level", "warning"])
    assert cli.load_settings(both, {}).logging.level == "warning"  # the later flag wins
    # a flag absent after the command keeps the value given before it
    kept = parser.parse_args(["--log-level", "debug", "install-crds"])
    assert cli.load_settings(kept, {}).logging.level == "debug"


def test_json_then_run_help_works() -> None:
    done = _run("--log-format", "json", "run", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: cohdi-agent run")
    assert "--roles ROLE[,ROLE]" in done.stdout
    assert "--node-kubelet-dir DIR" in done.stdout
    assert "--emulator-" not in done.stdout


def test_top_level_help_says_where_to_start_and_install_crds_needs_cluster_admin() -> None:
    top = _run("--help")
    assert top.returncode == 0
    assert "where to start:" in top.stdout
    for line in ("cohdi-agent demo", "run --roles cluster", "run --roles node", "install-crds"):
        assert line in top.stdout
    crds = _run("install-crds", "--help")
    assert "cluster-admin" in " ".join(crds.stdout.split())


# --- roles ---------------------------------------------------------------------------------------


def _cfg(**cluster: str) -> settings.Settings:
    fabric = {"url": cluster.pop("url")} if "url" in cluster else {}
    return settings.Settings(
        cluster=settings.ClusterSettings(**cluster),
        fabric=settings.FabricSettings(**fabric),
        node=settings.NodeSettings(kubelet_dir="/kubelet"),
    )


def test_roles_given_are_taken_in_order() -> None:
    roles, why = settings.implied_roles(_cfg(roles="node, cluster"), is_dir=lambda _p: False)
    assert roles == ("cluster", "node")
    assert why == "from --roles"
    with pytest.raises(errors.ConfigError, match="--roles"):
        settings.implied_roles(_cfg(roles="gpu"), is_dir=lambda _p: True)


def test_roles_implied_by_the_host() -> None:
    seen: list[Path] = []

    def registry(path: Path) -> bool:
        seen.append(path)
        return True

    roles, why = settings.implied_roles(_cfg(url="https://fm:443"), is_dir=registry)
    assert roles == ("cluster",)
    assert "--fabric-url is set" in why
    roles, why = settings.implied_roles(_cfg(), is_dir=registry)
    assert roles == ("node",)
    assert seen == [Path("/kubelet/plugins_registry")]
    assert "/kubelet/plugins_registry exists" in why
    with pytest.raises(errors.ConfigError) as info:
        settings.implied_roles(_cfg(), is_dir=lambda _p: False)
    assert "--roles" in str(info.value)
    assert "is required here" in str(info.value)


def test_run_without_roles_and_nothing_implied_exits_2_in_json(tmp_path: Path) -> None:
    done = _run("--log-format", "json", "run", "--node-kubelet-dir", str(tmp_path / "no-kubelet"))
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    doc = orjson.loads(lines[0])
    assert doc["level"] == "error"
    assert doc["exit"] == 2
    assert "--roles" in doc["msg"]


# --- fatal start-up errors in the chosen format --------------------------------------------------


def test_bad_setting_under_json_is_one_json_object() -> None:
    done = _run("version", env={"COHDI_LEASE_DURATION": "soon", "COHDI_LOG_FORMAT": "json"})
    assert done.returncode == 2
    doc = orjson.loads(done.stderr.strip())
    assert doc["level"] == "error"
    assert doc["fault"] == "config"
    assert "--lease-duration (COHDI_LEASE_DURATION)" in doc["msg"]
    text = _run("version", env={"COHDI_LEASE_DURATION": "soon"})
    assert text.stderr.startswith("cohdi-agent: config error: invalid setting --lease-duration")


def test_usage_error_under_json_is_one_json_object() -> None:
    done = _run("--log-format", "json", "run", "--no-such-flag")
    assert done.returncode == 2
    doc = orjson.loads(done.stderr.strip())
    assert "unrecognized arguments: --no-such-flag" in doc["msg"]
    assert doc["exit"] == 2


# --- manifests and the DeviceClass ---------------------------------------------------------------


def test_manifests_to_standard_output(tmp_path: Path) -> None:
    done = _run("manifests", "--out", "-", "--driver", "gpu.example.com", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.iterdir()) == [], "nothing written into the working directory"
    docs = list(yaml.safe_load_all(done.stdout))
    kinds = [d["kind"] for d in docs]
    assert kinds == [
        "CustomResourceDefinition",
        "CustomResourceDefinition",
        "DeviceClass",
        "ServiceAccount",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    assert docs[2]["metadata"]["name"] == "gpu.example.com"


@pytest.mark.parametrize(
    ("driver", "name"),
    [
        ("composable.cohdi.io", "gpu.composable.cohdi.io"),
        ("gpu.example.com", "gpu.example.com"),
        ("gpus.example.com", "gpu.gpus.example.com"),
        ("gpu", "gpu"),
    ],
)
def test_device_class_name_never_doubles_gpu(driver: str, name: str) -> None:
    assert cluster.device_class_name(driver) == name
    obj = cluster.device_class(driver)
    assert obj["metadata"]["name"] == name
    assert obj["spec"]["selectors"][0]["cel"]["expression"] == f'device.driver == "{driver}"'
    assert not name.startswith("gpu.gpu.")
