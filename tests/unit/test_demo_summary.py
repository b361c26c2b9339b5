"""The demo's summary tells pods that landed on an already-attached GPU (warm: no binding
conditions, no `ready` instant, no PreBind wait) from pods whose GPU had to be attached (cold).

Reproduction: a warm pod used to print `alloc→ready 0ms` and `ready→bound 704981ms` (bound minus
an unset `ready` of 0.0, i.e. the monotonic clock's value), and the p99 line took it in."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

from agent.demo.running import PHASES, figures, phase_samples, summary, warm_kept
from agent.demo.workload import PodRecord, Workload
from agent.kube.watching import Event

DRIVER = "gpu.test.cohdi.io"
T = 705_000.0  # the monotonic clock after a while: a missing instant must not turn into this


def _cold(name: str, at: float, ready_after: float, bound_after: float) -> PodRecord:
    return PodRecord(
        name,
        "A100",
        submitted=T + at,
        allocated=T + at + 0.05,
        ready=T + at + 0.05 + ready_after,
        bound=T + at + 0.05 + ready_after + bound_after,
        node="n0",
    )


def _warm(name: str, at: float, bound_after: float) -> PodRecord:
    return PodRecord(
        name, "A100", submitted=T + at, allocated=T + at + 0.03, bound=T + at + bound_after,
        node="n1", warm=True,
    )  # fmt: skip


def _records() -> list[PodRecord]:
    return [
        _cold("job-000", 0.0, 0.4, 4.6),
        _cold("job-001", 0.1, 0.5, 4.5),
        _warm("job-002", 0.2, 0.35),
        _warm("job-003", 0.3, 0.25),
        PodRecord("job-004", "A100", submitted=T + 0.4, error="prepare failed"),
    ]


def test_warm_pods_have_only_submit_to_bound_and_no_clock_zero_figures() -> None:
    text = summary(_records())
    figures_ms = [float(x) for x in re.findall(r"(\d+(?:\.\d+)?)\s*ms", text)]
    assert figures_ms, text
    assert max(figures_ms) < 10_000, text  # no span measured from the clock's zero
    warm_rows = [line for line in text.splitlines() if line.startswith(("job-002", "job-003"))]
    assert len(warm_rows) == 2
    assert all("warm" in line and "no wait" in line for line in warm_rows), warm_rows
    assert "2 of 4 on an already-attached GPU" in text, text
    assert "not bound or failed: job-004" in text


def test_phase_maths() -> None:
    samples = phase_samples(_records())
    assert set(samples) == set(PHASES)
    cold_ready = samples["cold: claim allocated → device ready (FabricDeviceReady)"]
    assert [round(x, 3) for x in cold_ready] == [0.4, 0.5]
    cold_wait = samples["cold: device ready → pod bound (scheduler re-check)"]
    assert [round(x, 3) for x in cold_wait] == [4.6, 4.5]
    cold_total = samples["cold: pod submitted → pod bound"]
    assert [round(x, 3) for x in cold_total] == [5.05, 5.05]
    warm = samples["warm: pod submitted → pod bound (GPU already attached)"]
    assert [round(x, 3) for x in warm] == [0.35, 0.25]
    assert len(samples["all: pod submitted → pod bound"]) == 4

    doc: dict[str, Any] = figures(_records())
    assert (doc["pods"], doc["bound"], doc["warm"], doc["cold"]) == (5, 4, 2, 2)
    assert doc["failed"] == ["job-004"]
    w = doc["phases"]["warm: pod submitted → pod bound (GPU already attached)"]
    # nearest rank: p50 of [0.25, 0.35] is the upper one, p99 of fewer than 100 is the largest
    assert (w["n"], w["p50_ms"], w["p99_ms"], w["max_ms"]) == (2, 350.0, 350.0, 350.0)
    every = doc["phases"]["all: pod submitted → pod bound"]
    assert (every["n"], every["p50_ms"], every["max_ms"]) == (4, 5050.0, 5050.0)


def test_a_phase_no_pod_went_through_is_reported_as_none() -> None:
    only_warm = [_warm("job-000", 0.0, 0.3)]
    doc: dict[str, Any] = figures(only_warm)
    assert doc["phases"]["cold: pod submitted → pod bound"] == {"n": 0}
    line = next(x for x in summary(only_warm).splitlines() if x.startswith("cold: claim allocated"))
    assert line.rstrip().endswith("none")


def _claim(name: str, results: list[dict[str, Any]], conditions: bool = False) -> dict[str, Any]:
    status: dict[str, Any] = {"allocation": {"devices": {"results": results}}}
    if conditions:
        status["devices"] = [
            {
                "driver": DRIVER,
                "pool": r["pool"],
                "device": r["device"],
                "conditions": [{"type": "FabricDeviceReady", "status": "True"}],
            }
            for r in results
        ]
    return {"metadata": {"name": name, "namespace": "default", "uid": "u"}, "status": status}


def test_workload_marks_an_allocation_without_binding_conditions_warm() -> None:
    world: Any = SimpleNamespace(kube=None, driver=DRIVER)
    w = Workload(world, lifetime=(1.0, 1.0))
    w.records["warm-pod"] = PodRecord("warm-pod", "A100", submitted=T)
    w.records["cold-pod"] = PodRecord("cold-pod", "A100", submitted=T)
    attached = {"driver": DRIVER, "pool": "n1-local", "device": "gpu-7", "request": "gpu"}
    free = {**attached, "pool": "fabric0", "device": "gpu-3"}
    free["bindingConditions"] = ["FabricDeviceReady"]
    free["bindingFailureConditions"] = ["FabricDeviceFailed"]

    w._on_claim(Event("MODIFIED", _claim("warm-pod", [attached])))
    w._on_claim(Event("MODIFIED", _claim("cold-pod", [free])))
    warm, cold = w.records["warm-pod"], w.records["cold-pod"]
    assert (warm.warm, warm.device, warm.ready) == (True, "gpu-7", 0.0)
    assert warm.allocated > 0
    assert (cold.warm, cold.device, cold.ready) == (False, "gpu-3", 0.0)
    assert cold.allocated > 0

    w._on_claim(Event("MODIFIED", _claim("cold-pod", [free], conditions=True)))
    assert cold.ready >= cold.allocated > 0


def test_a_pod_allocated_again_is_neither_warm_nor_one_cycle() -> None:
    world: Any = SimpleNamespace(kube=None, driver=DRIVER)
    w = Workload(world, lifetime=(1.0, 1.0))
    w.records["p"] = PodRecord("p", "A100", submitted=T)
    free = {"driver": DRIVER, "pool": "fabric0", "device": "gpu-3", "request": "gpu"}
    free["bindingConditions"] = ["FabricDeviceReady"]
    attached = {"driver": DRIVER, "pool": "n1-local", "device": "gpu-7", "request": "gpu"}
    w._on_claim(Event("MODIFIED", _claim("p", [free])))
    w._on_claim(Event("MODIFIED", {**_claim("p", []), "status": {}}))  # the binding failed
    w._on_claim(Event("MODIFIED", _claim("p", [attached])))  # and it lands on a warm GPU
    rec = w.records["p"]
    assert (rec.reallocated, rec.warm, rec.device) == (1, False, "gpu-7")
    rec.bound = rec.allocated + 9.0
    text = summary([rec])
    assert "1 allocated more than once: p" in text, text
    assert "0 of 1 on an already-attached GPU" in text
    assert figures([rec])["reallocated"] == ["p"]


def test_the_demo_waits_only_for_gpus_warm_capacity_does_not_keep() -> None:
    # 4 servers, 16 GPUs of two models (8 each): warm capacity per node and model, capped
    assert warm_kept(0, nodes=4, gpus=16) == 0
    assert warm_kept(1, nodes=4, gpus=16) == 8
    assert warm_kept(3, nodes=4, gpus=16) == 16
    assert warm_kept(2, nodes=4, gpus=5) == 5
