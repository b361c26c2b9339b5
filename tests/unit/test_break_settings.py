"""`--driver` values that nothing checks, found by trying to break issue 10 ("bad values exit 2
naming the setting"). Each failed before its fix and now guards it.

Seen with real processes: `cohdi-agent run --driver Bad_Driver ...` starts, becomes leader, and
every slice write is refused (`422 ... spec.driver: Invalid value: "Bad_Driver": a lowercase RFC
1123 subdomain ...`, /readyz failing) — the agent runs but can never publish; `cohdi-agent
install-crds --driver 9gpu.example.com` succeeds (the API server accepts the DRA driver name), but
the kubelet plugin of that driver can never prepare a claim: the CDI library the runtimes use
wants the vendor part of a kind to start with a letter (`CDI vendor '9gpu.example.com' is not
valid`).
"""

from __future__ import annotations

import pytest

from agent import errors, settings
from agent.node import cdi

UID = "1fae45b2-07d4-4ba3-885b-8166ca39cf27"


@pytest.mark.parametrize("driver", ["Bad_Driver", "x" * 80 + ".example.com"])
def test_a_driver_the_api_server_refuses_is_a_config_error(driver: str) -> None:
    with pytest.raises(errors.ConfigError) as info:
        settings.load({"--driver": driver})
    assert "--driver" in str(info.value)


def test_a_driver_starting_with_a_digit_is_refused_or_usable() -> None:
    try:
        cfg = settings.load({"--driver": "9gpu.example.com"})
    except errors.ConfigError:
        return  # refused at start: a fix
    spec = cdi.build(cfg.cluster.driver, UID, [("gpu-0", ["/dev/nvidia0"], {})])
    assert cdi.qualified_ids(spec)
