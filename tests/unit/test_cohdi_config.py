"""CoHDI's configuration as a source: the ConfigMap and Secret validated with CoHDI's limits
(errors name the object and the key), CoHDI's deployment variables, and the watch that applies a
changed Secret or device-info to the running fabric client (on the in-memory API server and the
emulator)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import errors, settings
from agent.controllers.cohdiconfig import CohdiSource, configmap_path, secret_path
from agent.fabric.emulator import config as emuconfig
from agent.fabric.emulator.server import EmulatorServer
from agent.fabric.fti import FtiFabric
from agent.model import cohdi
from agent.testing.fakekube import FakeKube
from tests.waiting import until

W = "ConfigMap composable-dra/composable-dra-dds"
TENANT = "060ea5a5-46e4-42b4-8d95-70578718d8d0"
CHART_DEVICE_INFO = """\
- index: 1
  cdi-model-name: "a100"
  dra-attributes:
    productName: "NVIDIA A100 80GB PCIe"
  driver-name: "gpu.nvidia.com"
  k8s-device-name: "nvidia-a100-80"
  cannot-coexist-with: [2]
- index: 2
  cdi-model-name: "L40S"
  dra-attributes:
    productName: "NVIDIA L40S"
    type: "gpu"
    uuid: ""
  driver-name: "gpu.nvidia.com"
  k8s-device-name: "nvidia-l40s"
  cannot-coexist-with: [1]
"""


def items() -> list[dict[str, Any]]:
    return list(yaml.safe_load(CHART_DEVICE_INFO))


def test_the_charts_configmap() -> None:
    got = cohdi.parse_devices("cohdi.io", items(), [0], where=W)
    assert got.models == ("a100", "L40S")
    assert got.fabric_id_range == (0,)
    l40s = got.devices[1]
    assert (l40s.driver, l40s.device_name, l40s.cannot_coexist_with) == (
        "gpu.nvidia.com",
        "nvidia-l40s",
        (1,),
    )
    assert l40s.attributes == {"productName": "NVIDIA L40S", "type": "gpu", "uuid": ""}


def edit(i: int, **change: Any) -> list[dict[str, Any]]:
    out = items()
    for key, value in change.items():
        key = key.replace("_", "-")
        if value is None:
            out[i].pop(key)
        else:
            out[i][key] = value
    return out


@pytest.mark.parametrize(
    ("prefix", "info", "ranges", "key"),
    [
        ("cohdi.io", edit(0, index=10001), None, "device-info[0].index"),
        ("cohdi.io", edit(0, index=-1), None, "device-info[0].index"),
        ("cohdi.io", edit(1, index=1), None, "device-info[1].index"),
        ("cohdi.io", edit(0, cdi_model_name="x" * 1001), None, "device-info[0].cdi-model-name"),
        ("cohdi.io", edit(1, cdi_model_name="a100"), None, "device-info[1].cdi-model-name"),
        ("cohdi.io", edit(0, cdi_model_name=""), None, "device-info[0].cdi-model-name"),
        (
            "cohdi.io",
            edit(0, dra_attributes={"productName": "p", **{f"a{i}": "v" for i in range(32)}}),
            None,
            "device-info[0].dra-attributes",
        ),
        (
            "cohdi.io",
            edit(0, dra_attributes={"productName": "p", "n" * 64: "v"}),
            None,
            f"device-info[0].dra-attributes.{'n' * 64}",
        ),
        (
            "cohdi.io",
            edit(0, dra_attributes={"productName": "p" * 65}),
            None,
            "device-info[0].dra-attributes.productName",
        ),
        (
            "cohdi.io",
            edit(0, dra_attributes={"type": "gpu"}),
            None,
            "device-info[0].dra-attributes",
        ),
        (  # a label-key name CoHDI takes, but not a DRA attribute name: the slice is refused
            "cohdi.io",
            edit(0, dra_attributes={"productName": "p", "product-name": "v"}),
            None,
            "device-info[0].dra-attributes.product-name",
        ),
        (
            "cohdi.io",
            edit(0, dra_attributes={"productName": "p", "c" * 33: "v"}),
            None,
            f"device-info[0].dra-attributes.{'c' * 33}",
        ),
        ("cohdi.io", edit(0, driver_name="GPU.nvidia.com"), None, "device-info[0].driver-name"),
        ("cohdi.io", edit(0, driver_name="g" * 64), None, "device-info[0].driver-name"),
        ("cohdi.io", edit(0, k8s_device_name="n" * 51), None, "device-info[0].k8s-device-name"),
        ("cohdi.io", edit(0, k8s_device_name="a.b"), None, "device-info[0].k8s-device-name"),
        (
            "cohdi.io",
            edit(1, k8s_device_name="nvidia-a100-80"),
            None,
            "device-info[1].k8s-device-name",
        ),
        ("cohdi.io", edit(0, cannot_coexist_with=None), None, "device-info[0].cannot-coexist-with"),
        (
            "cohdi.io",
            edit(0, cannot_coexist_with=[7]),
            None,
            "device-info[0].cannot-coexist-with[0]",
        ),
        (
            "cohdi.io",
            edit(0, cannot_coexist_with=list(range(101))),
            None,
            "device-info[0].cannot-coexist-with",
        ),
        ("cohdi.io", [], None, "device-info"),
        ("cohdi.io", items(), list(range(101)), "fabric-id-range"),
        ("Cohdi.IO", items(), None, "label-prefix"),
        ("a" * 101, items(), None, "label-prefix"),
        ("example.com", items(), None, "label-prefix"),
        (None, items(), None, "label-prefix"),
    ],
)
def test_configmap_limits_name_the_key(prefix: Any, info: Any, ranges: Any, key: str) -> None:
    with pytest.raises(errors.ConfigError) as exc:
        cohdi.parse_devices(prefix, info, ranges, where=W)
    assert exc.value.setting == f"{W} {key}"


SECRET = {
    "username": "u",
    "password": "p",
    "realm": "r",
    "client_id": "cdi",
    "client_secret": "s",
    "certificate": "",
}


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"username": ""}, "username"),
        ({"realm": ""}, "realm"),
        ({"password": "x" * 1000}, "password"),
        ({"client_secret": "x" * 1000}, "client_secret"),
        ({"certificate": "-----BEGIN CERTIFICATE-----" + "x" * 10_000}, "certificate"),
        ({"certificate": "not a pem"}, "certificate"),
    ],
)
def test_secret_limits_name_the_key(change: dict[str, str], key: str) -> None:
    with pytest.raises(errors.ConfigError) as exc:
        cohdi.parse_credentials({**SECRET, **change}, where="Secret ns/composable-dra-secret")
    assert exc.value.setting == f"Secret ns/composable-dra-secret {key}"
    assert "x" * 100 not in str(exc.value)  # a secret value is never shown


def test_secret_repr_hides_the_secrets() -> None:
    creds = cohdi.parse_credentials({**SECRET, "password": "hunter2"}, where="s")
    assert "hunter2" not in repr(creds)


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"CDI_ENDPOINT": "http://fm:443"}, "CDI_ENDPOINT"),
        ({"CDI_ENDPOINT": "https://" + "h" * 1000}, "CDI_ENDPOINT"),
        ({"TENANT_ID": "tenant-1"}, "TENANT_ID"),
        ({"USE_CM": "true", "CLUSTER_ID": ""}, "CLUSTER_ID"),
        ({"USE_CM": "maybe"}, "USE_CM"),
    ],
)
def test_deployment_variables_as_cohdi_checks_them(env: dict[str, str], key: str) -> None:
    with pytest.raises(errors.ConfigError) as exc:
        cohdi.parse_deployment(env)
    assert exc.value.setting == f"environment {key}"


def test_deployment_variables() -> None:
    dep = cohdi.parse_deployment(
        {"CDI_ENDPOINT": "https://cdimgr.localdomain", "TENANT_ID": TENANT, "CLUSTER_ID": TENANT}
    )
    assert dep == cohdi.Deployment("https://cdimgr.localdomain", TENANT, "", False)
    with_cm = cohdi.parse_deployment({"USE_CM": "true", "CLUSTER_ID": TENANT})
    assert (with_cm.cluster, with_cm.use_cm) == (TENANT, True)


def test_the_namespace_implies_the_cluster_role() -> None:
    cfg = settings.load({"--cohdi-config-namespace": "composable-dra"})
    roles, why = settings.implied_roles(cfg, is_dir=lambda _p: False)
    assert roles == ("cluster",)
    assert "--cohdi-config-namespace" in why


# --- the source, read and watched -----------------------------------------------------------------

NS = "composable-dra"
PASSWORD = "first-pass-1"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret_obj(password: str, ca: str) -> dict[str, Any]:
    data = {**SECRET, "username": "admin", "password": password, "realm": "cdi", "certificate": ca}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": cohdi.SECRET, "namespace": NS},
        "data": {k: b64(v) for k, v in data.items()},
    }


def configmap_obj(info: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": cohdi.CONFIGMAP, "namespace": NS},
        "data": {"label-prefix": "cohdi.io", "fabric-id-range": "[0]", "device-info": info},
    }


@pytest.fixture
async def emulator(tmp_path: Path) -> AsyncIterator[EmulatorServer]:
    conf = emuconfig.parse(
        {
            "tenant": TENANT,
            "machines": [{"id": "m-1", "name": "host-1", "fabric": "f"}],
            "devices": [
                {"model": "a100", "count": 2, "fabric": "f"},
                {"model": "L40S", "count": 3, "fabric": "f"},
            ],
            "users": [{"name": "admin", "password": PASSWORD}],
        }
    )
    server = EmulatorServer(conf, tls_dir=tmp_path / "tls")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_missing_objects_and_invalid_content_stop_the_start() -> None:
    kube = FakeKube()
    source = CohdiSource(kube, NS, environ={})  # type: ignore[arg-type]
    with pytest.raises(errors.ConfigError) as exc:
        await source.load()
    assert "ConfigMap composable-dra/composable-dra-dds does not exist" in str(exc.value)
    bad = configmap_obj(CHART_DEVICE_INFO.replace('"nvidia-l40s"', '"NVIDIA L40S"'))
    kube.add(configmap_path(NS), bad)
    kube.add(secret_path(NS), secret_obj("p", ""))
    with pytest.raises(errors.ConfigError) as exc:
        await source.load()
    assert exc.value.setting == f"{W} device-info[1].k8s-device-name"


async def test_start_from_cohdi_objects_then_apply_changes_without_restart(
    emulator: EmulatorServer,
) -> None:
    assert emulator.ca_file is not None
    ca = emulator.ca_file.read_text()
    kube = FakeKube(bookmark_interval=60)
    only_a100 = CHART_DEVICE_INFO.split("- index: 2")[0].replace("[2]", "[]")
    kube.add(configmap_path(NS), configmap_obj(only_a100))
    kube.add(secret_path(NS), secret_obj(PASSWORD, ca))
    env = {"CDI_ENDPOINT": emulator.url, "TENANT_ID": TENANT}
    source = CohdiSource(kube, NS, environ=env)  # type: ignore[arg-type]
    await source.load()
    cfg = source.settings_for(settings.Settings())
    assert (cfg.fabric.backend, cfg.fabric.url, cfg.fabric.tenant, cfg.fabric.models) == (
        "fti",
        emulator.url,
        TENANT,
        "a100",
    )
    fabric = source.open_fabric(cfg.fabric)  # TLS trusts the Secret's certificate alone
    fti = source.fabric
    assert isinstance(fti, FtiFabric)
    watch = asyncio.create_task(source.run())
    try:
        inv = await fabric.inventory()
        assert sum(d.model == "a100" for d in inv.devices) == 2
        assert not any(d.model == "L40S" for d in inv.devices)

        # device-info gains L40S: the next read counts it, no restart
        kube.edit(
            f"{configmap_path(NS)}/{cohdi.CONFIGMAP}",
            lambda o: o["data"].update({"device-info": CHART_DEVICE_INFO}),
        )
        await _until(lambda: fti.models == ("a100", "L40S"))
        inv = await fabric.inventory()
        assert sum(d.model == "L40S" for d in inv.devices) == 3

        # the fabric manager's password changes, then the Secret: the client logs in anew
        emulator.creds.accounts["admin"].password = "second-pass-2"
        emulator.creds.expire_all()
        with pytest.raises(errors.FabricAuthError):
            await fabric.inventory()
        kube.edit(
            f"{secret_path(NS)}/{cohdi.SECRET}",
            lambda o: o["data"].update(secret_obj("second-pass-2", ca)["data"]),
        )
        await _until(lambda: source.credentials and source.credentials.password == "second-pass-2")
        assert len((await fabric.inventory()).machines) == 1

        # an invalid change is refused; the last good configuration stays in force
        kube.edit(
            f"{configmap_path(NS)}/{cohdi.CONFIGMAP}",
            lambda o: o["data"].update({"label-prefix": "example.com"}),
        )
        await _until(lambda: bool(source.error))
        assert f"{W} label-prefix" in source.error
        assert source.not_ready() == [f"CoHDI configuration change refused: {source.error}"]
        assert fti.models == ("a100", "L40S")
        assert len((await fabric.inventory()).machines) == 1
        assert not watch.done()
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await fabric.close()


async def _until(probe: Any) -> None:
    async def check() -> Any:
        return probe()

    await until(check, what=f"the change applied ({probe})", timeout=5.0, interval=0.02)


def test_cluster_manager_needs_the_fti_backend() -> None:
    with pytest.raises(errors.ConfigError) as exc:
        settings.load({"--fabric-cm-cluster": TENANT})
    assert exc.value.setting == "--fabric-cm-cluster"
    cfg = settings.load({"--fabric-cm-cluster": TENANT, "--fabric-backend": "fti"})
    assert cfg.fabric.cm_cluster == TENANT


# --- attacks: certificate garbage, the objects deleted and recreated ------------------------------

GARBAGE_PEM = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize("tail", ["", "\n" + GARBAGE_PEM])
def test_a_pem_shaped_certificate_that_is_garbage_is_refused_by_the_parse(tail: str) -> None:
    """PEM armour around garbage (or a good CA followed by garbage) is refused when the Secret is
    read, naming the key — not later, when a TLS context happens to load it (over plain http,
    never)."""
    pem = GARBAGE_PEM if not tail else _a_real_ca() + tail
    with pytest.raises(errors.ConfigError) as exc:
        cohdi.parse_credentials({**SECRET, "certificate": pem}, where="Secret ns/s")
    assert exc.value.setting == "Secret ns/s certificate"


def _a_real_ca() -> str:
    import ssl

    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile):
        if path and Path(path).is_file():
            text = Path(path).read_text()
            end = text.find("-----END CERTIFICATE-----")
            start = text.rfind("-----BEGIN CERTIFICATE-----", 0, end)
            if start >= 0:
                return text[start : end + len("-----END CERTIFICATE-----")] + "\n"
    pytest.skip("no system CA bundle to take a real certificate from")


async def test_a_secret_change_with_a_garbage_certificate_is_refused_whole(
    emulator: EmulatorServer,
) -> None:
    """A Secret edited to a new password and a PEM-shaped garbage certificate while running: the
    change is refused as a whole (named in /readyz), the watch keeps running, the old password
    stays in force (not half of the change applied), and a later good edit is applied."""
    assert emulator.ca_file is not None
    ca = emulator.ca_file.read_text()
    kube = FakeKube(bookmark_interval=60)
    kube.add(configmap_path(NS), configmap_obj(CHART_DEVICE_INFO))
    kube.add(secret_path(NS), secret_obj(PASSWORD, ca))
    env = {"CDI_ENDPOINT": emulator.url, "TENANT_ID": TENANT}
    source = CohdiSource(kube, NS, environ=env)  # type: ignore[arg-type]
    await source.load()
    fabric = source.open_fabric(source.settings_for(settings.Settings()).fabric)
    watch = asyncio.create_task(source.run())
    try:
        await _until(lambda: source.synced.is_set())
        kube.edit(
            f"{secret_path(NS)}/{cohdi.SECRET}",
            lambda o: o["data"].update(secret_obj("other-pass", GARBAGE_PEM)["data"]),
        )
        await _until(lambda: bool(source.error) or watch.done())
        assert not watch.done(), watch.exception()
        assert f"Secret {NS}/{cohdi.SECRET} certificate" in source.error
        assert source.credentials is not None
        assert source.credentials.password == PASSWORD
        assert len((await fabric.inventory()).machines) == 1  # the old password still works
        kube.edit(
            f"{secret_path(NS)}/{cohdi.SECRET}",
            lambda o: o["data"].update(secret_obj(PASSWORD, ca)["data"]),
        )
        await _until(lambda: not source.error)
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await fabric.close()


async def test_the_configmap_deleted_and_recreated_while_running(
    emulator: EmulatorServer,
) -> None:
    """Deleted: refused and named, the last models stay in force. Recreated with other models:
    applied. Recreated exactly as before: valid again, nothing refused."""
    kube = FakeKube(bookmark_interval=60)
    assert emulator.ca_file is not None
    ca = emulator.ca_file.read_text()
    kube.add(configmap_path(NS), configmap_obj(CHART_DEVICE_INFO))
    kube.add(secret_path(NS), secret_obj(PASSWORD, ca))
    env = {"CDI_ENDPOINT": emulator.url, "TENANT_ID": TENANT}
    source = CohdiSource(kube, NS, environ=env)  # type: ignore[arg-type]
    await source.load()
    fabric = source.open_fabric(source.settings_for(settings.Settings()).fabric)
    fti = source.fabric
    assert fti is not None
    watch = asyncio.create_task(source.run())
    try:
        await _until(lambda: source.synced.is_set())
        kube.remove(f"{configmap_path(NS)}/{cohdi.CONFIGMAP}")
        await _until(lambda: "was deleted" in source.error)
        assert fti.models == ("a100", "L40S")
        assert sum(d.model == "L40S" for d in (await fabric.inventory()).devices) == 3
        only_a100 = CHART_DEVICE_INFO.split("- index: 2")[0].replace("[2]", "[]")
        kube.add(configmap_path(NS), configmap_obj(only_a100))
        await _until(lambda: not source.error and fti.models == ("a100",))
        assert source.pool_attributes.by_model == {
            "a100": {"productName": "NVIDIA A100 80GB PCIe"}
        }, "the pool's attributes follow the ConfigMap"
        kube.remove(f"{configmap_path(NS)}/{cohdi.CONFIGMAP}")
        await _until(lambda: bool(source.error))
        kube.add(configmap_path(NS), configmap_obj(only_a100))
        await _until(lambda: not source.error)
        assert not watch.done()
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await fabric.close()


def test_a_vendor_driver_other_than_cohdis_driver_name_stops_the_start() -> None:
    """--vendor-driver publishes the pool under that driver; CoHDI's claims ask for the DeviceClass
    of device-info's `driver-name`. Different: no claim would ever match the pool — refused at
    start, naming the item."""
    source = CohdiSource(None, NS, environ={"CDI_ENDPOINT": "https://fm", "TENANT_ID": TENANT})  # type: ignore[arg-type]
    source.devices = cohdi.parse_devices("cohdi.io", items(), where=W)
    source.credentials = cohdi.parse_credentials(SECRET, where="s")
    ok = settings.Settings(cluster=settings.ClusterSettings(vendor_driver="gpu.nvidia.com"))
    assert source.settings_for(ok).fabric.backend == "fti"
    other = settings.Settings(cluster=settings.ClusterSettings(vendor_driver="gpu.example.com"))
    with pytest.raises(errors.ConfigError) as exc:
        source.settings_for(other)
    assert exc.value.setting == "--vendor-driver"
    assert f"{W} device-info[0].driver-name" in str(exc.value)

    # while running: a ConfigMap edit to another driver-name is refused, the last one stays
    source.error = ""
    source.settings_for(ok)
    cm = configmap_obj(CHART_DEVICE_INFO.replace('"gpu.nvidia.com"', '"gpu.example.com"'))
    secret = secret_obj("p", "")
    assert not source.apply(cm, secret)
    assert "--vendor-driver" in source.error
    assert source.devices is not None
    assert {d.driver for d in source.devices.devices} == {"gpu.nvidia.com"}


async def test_a_valid_secret_change_applies_while_the_configmap_is_invalid(
    emulator: EmulatorServer,
) -> None:
    """The fabric manager's password rotates (and the Secret with it) while someone's ConfigMap
    edit is invalid: the new password is applied — each object stands alone, the invalid one
    keeping its last good content — and both are named until the ConfigMap is fixed."""
    assert emulator.ca_file is not None
    ca = emulator.ca_file.read_text()
    kube = FakeKube(bookmark_interval=60)
    kube.add(configmap_path(NS), configmap_obj(CHART_DEVICE_INFO))
    kube.add(secret_path(NS), secret_obj(PASSWORD, ca))
    env = {"CDI_ENDPOINT": emulator.url, "TENANT_ID": TENANT}
    source = CohdiSource(kube, NS, environ=env)  # type: ignore[arg-type]
    await source.load()
    fabric = source.open_fabric(source.settings_for(settings.Settings()).fabric)
    watch = asyncio.create_task(source.run())
    try:
        await _until(lambda: source.synced.is_set())
        kube.edit(
            f"{configmap_path(NS)}/{cohdi.CONFIGMAP}",
            lambda o: o["data"].update({"label-prefix": "example.com"}),
        )
        await _until(lambda: f"{W} label-prefix" in source.error)
        emulator.creds.accounts["admin"].password = "rotated-3"
        emulator.creds.expire_all()
        kube.edit(
            f"{secret_path(NS)}/{cohdi.SECRET}",
            lambda o: o["data"].update(secret_obj("rotated-3", ca)["data"]),
        )
        await _until(lambda: source.credentials and source.credentials.password == "rotated-3")
        assert len((await fabric.inventory()).machines) == 1, "logged in with the new password"
        assert f"{W} label-prefix" in source.error, "the ConfigMap is still named"
        kube.edit(
            f"{configmap_path(NS)}/{cohdi.CONFIGMAP}",
            lambda o: o["data"].update({"label-prefix": "cohdi.io"}),
        )
        await _until(lambda: not source.error)
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await fabric.close()
