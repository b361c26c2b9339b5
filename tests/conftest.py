"""Shared fixtures: the real local control plane (one per test session) and API clients.

The control plane is built from the Go module proxy on first use (`./dev test` builds it before
pytest starts, so its progress is visible) and started on 127.0.0.1 in a temporary directory; every
process it starts is stopped at the end of the session, also when tests fail. Its Kubernetes
release is `--kube-version` (else $COHDI_DEV_KUBE_VERSION, else the default of
`settings.KUBE_VERSIONS`); `./dev test` runs the tests marked `all_kube_versions` once more on
each other release.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml

from agent import settings
from agent.devcluster import local
from agent.devcluster.controlplane import ControlPlane
from agent.kube.client import Kube

#: the order xdist deals tests out in (tests/ordering.py); where bytecode goes (tests/bytecode.py);
#: a leaked socket blamed on the control-plane test that leaked it (tests/leaks.py)
pytest_plugins = ("tests.ordering", "tests.bytecode", "tests.leaks")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kube-version",
        default=os.environ.get("COHDI_DEV_KUBE_VERSION", settings.KUBE_VERSIONS[0]),
        choices=settings.KUBE_VERSIONS,
        help="the Kubernetes release of the session's control plane (built and cached on first "
        "use; default: $COHDI_DEV_KUBE_VERSION, else %(default)s)",
    )


def pytest_configure(config: pytest.Config) -> None:
    kube_version(config)  # a release we cannot build fails the run at once, not at first use


def pytest_report_header(config: pytest.Config) -> str:
    return f"control plane: Kubernetes {kube_version(config)}"


def kube_version(config: pytest.Config) -> str:
    """The Kubernetes release this session's control planes run (`--kube-version`). Raises
    UsageError for one not in `settings.KUBE_VERSIONS` (argparse checks a flag's value against
    its choices, not a default taken from the environment)."""
    version = str(config.getoption("--kube-version"))
    if version not in settings.KUBE_VERSIONS:
        raise pytest.UsageError(
            f"Kubernetes {version} (--kube-version or $COHDI_DEV_KUBE_VERSION) is not one of "
            + ", ".join(settings.KUBE_VERSIONS)
        )
    return version


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts the real control plane must say so (marker `controlplane`): `./dev
    test` runs the unmarked tests in parallel workers, where each would start its own."""
    unmarked = [
        i.nodeid
        for i in items
        if "control_plane" in getattr(i, "fixturenames", ())
        and not i.get_closest_marker("controlplane")
    ]
    if unmarked:
        raise pytest.UsageError(
            "these tests use the control_plane fixture but lack the `controlplane` marker: "
            + ", ".join(unmarked[:10])
        )
    # `all_kube_versions` is selected together with `controlplane` (./dev test's last tier): a
    # test with the one but not the other would silently never run on the other releases.
    lone = [
        i.nodeid
        for i in items
        if i.get_closest_marker("all_kube_versions") and not i.get_closest_marker("controlplane")
    ]
    if lone:
        raise pytest.UsageError(
            "these tests are marked `all_kube_versions` but not `controlplane`: "
            + ", ".join(lone[:10])
        )


@pytest.fixture(scope="session")
def control_plane(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[ControlPlane]:
    binaries = local.binaries(settings.Settings().cache_dir, kube_version(pytestconfig))
    cp = ControlPlane(
        binaries=binaries,
        state_dir=tmp_path_factory.mktemp("controlplane"),
        binding_timeout_s=60,
        progress=local.progress,
    )
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
async def kube(control_plane: ControlPlane) -> AsyncIterator[Kube]:
    async with await Kube.connect(kubeconfig=str(control_plane.kubeconfig)) as client:
        yield client


def kubeconfig_via(control_plane: ControlPlane, port: int, path: Path) -> Path:
    """A copy of the admin kubeconfig that talks to the API server through 127.0.0.1:`port`
    (a fault-injecting proxy); the serving cert has an IP SAN for 127.0.0.1, so TLS verifies."""
    doc = yaml.safe_load(control_plane.kubeconfig.read_text())
    doc["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
    path.write_text(yaml.safe_dump(doc))
    return path
