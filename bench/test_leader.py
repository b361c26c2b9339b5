"""The leader at scale: N Nodes on a local control plane of its own, one fabric (the emulator's
inventory) of N * G GPUs with one machine per Node, 2,000 ResourceClaims, and
`cohdi-agent run --roles cluster` as its own process (under bench/sampler.py: a sampling
profile and the objects alive, written when it stops).

One timed round per scale: from the process's start until the pool is published (every
device in a slice, seen through a watch). extra_info: set-up time, publication time, RSS
sampled every second (peak, at publication, last), the leader's CPU seconds, Nodes labelled,
and the profile. Goal (5,000 Nodes / 40,000 GPUs): published in ≤ 5 s, RSS ≤ 500 MB.
The scales are --leader-scales (NODESxGPUS_PER_NODE); each waits --leader-seconds at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent import settings
from agent.controllers.publishing import NODES, SLICES
from agent.demo import objects
from agent.devcluster import local
from agent.devcluster.controlplane import ControlPlane
from agent.kube.client import Kube
from agent.kube.watching import Informer
from agent.manifests import installing
from bench import worlds
from bench.conftest import Site
from bench.harness import CLAIMS, bounded, cpu_seconds, memory

HERE = Path(__file__).resolve().parent
DRIVER = "leader.bench.cohdi.io"
CLAIM_COUNT = 2000
SETTLE_S = 10.0  # RSS keeps being sampled this long after publication


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "scale" in metafunc.fixturenames:
        text = metafunc.config.getoption("--leader-scales")
        scales = [tuple(int(x) for x in s.split("x")) for s in text.split(",") if s]
        metafunc.parametrize("scale", scales, ids=[f"{n}x{g}" for n, g in scales])


def _claim(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": f"idle-{i:05d}"},
        "spec": {
            "devices": {
                "requests": [
                    {
                        "name": "gpu",
                        "exactly": {
                            "deviceClassName": f"gpu.{DRIVER}",
                            "selectors": [{"cel": {"expression": f'device.driver == "{DRIVER}"'}}],
                        },
                    }
                ]
            }
        },
    }


async def _populate(kube: Kube, names: list[str]) -> None:
    await installing.install(kube, DRIVER)
    await bounded((objects.make_node(kube, n, pods=110) for n in names), 32)
    await bounded((kube.create(CLAIMS, _claim(i)) for i in range(CLAIM_COUNT)), 32)


def _leader(
    cp: ControlPlane, em_url: str, ca: Path, profile: Path, log: Path
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return _spawn_leader(cp, em_url, ca, profile, out)


def _spawn_leader(
    cp: ControlPlane, em_url: str, ca: Path, profile: Path, out: Any
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.sampler",
            str(profile),
            "--",
            "run",
            "--roles",
            "cluster",
            "--kubeconfig",
            str(cp.kubeconfig),
            "--driver",
            DRIVER,
            "--fabric-url",
            em_url,
            "--fabric-user",
            "admin",
            "--fabric-ca-bundle",
            str(ca),
            "--fabric-poll-interval",
            "5",
            "--lease-name",
            "leader-bench",
            "--log-format",
            "json",
        ],
        env={**os.environ, "COHDI_FABRIC_PASSWORD": worlds.PASSWORD},
        stdout=subprocess.DEVNULL,
        stderr=out,
        cwd=HERE.parent,
    )


def _served(em: worlds.TimedEmulator, started: float) -> dict[str, Any]:
    """What the fabric (the emulator, in this process) served the leader until publication:
    request count, and the slowest requests as [path, started after the leader's start (s),
    seconds it took to serve]."""
    slow = sorted(em.served, key=lambda r: -r[3])[:8]
    return {
        "requests": len(em.served),
        "slowest": [[path, round(t0 - started, 2), round(took, 2)] for _m, path, t0, took in slow],
    }


def _log_lines(log: Path, limit: int = 30) -> list[str]:
    """The leader's log (JSON lines) as 'time message', runs of the same kind of message (the
    first two words) folded into one line with their count and the time of the last."""
    out: list[list[Any]] = []  # [time, message, count, last time]
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        ts, msg = str(doc.get("ts", "")), str(doc.get("msg", ""))
        if out and out[-1][1].split()[:2] == msg.split()[:2]:
            out[-1][2] += 1
            out[-1][3] = ts
        else:
            out.append([ts, msg, 1, ts])
    return [
        f"{ts} {msg}" + (f" (and {n - 1} more like it until {last})" if n > 1 else "")
        for ts, msg, n, last in out[:limit]
    ]


class Publication:
    """Watches our slices; `done` once `devices` devices are in them."""

    def __init__(self, kube: Kube, devices: int) -> None:
        self.devices = devices
        self.informer = Informer(
            kube, SLICES, name="leader-slices", field_selector=f"spec.driver={DRIVER}"
        )
        self.done = asyncio.Event()
        self.at = 0.0  # perf_counter when the last device was seen published
        self.first = 0.0  # perf_counter when the first slice was seen
        self.informer.add_handler(lambda _e: self._check())

    def published(self) -> int:
        return sum(len(s["spec"].get("devices") or []) for s in self.informer.store.values())

    def _check(self) -> None:
        if not self.first and self.informer.store:
            self.first = time.perf_counter()
        if not self.done.is_set() and self.published() >= self.devices:
            self.at = time.perf_counter()
            self.done.set()


def test_leader_at_scale(
    benchmark: Any,
    site: Site,
    runner: asyncio.Runner,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    scale: tuple[int, int],
) -> None:
    if not site.embedded:
        pytest.skip("the leader's scale is measured on a local control plane of its own")
    nodes, per_node = scale
    devices = nodes * per_node
    limit = request.config.getoption("--leader-seconds")
    cp = ControlPlane(
        binaries=local.binaries(settings.Settings().cache_dir),
        state_dir=tmp_path / "cp",
        progress=local.progress,
        with_scheduler=False,  # nothing here is scheduled; the scheduler would only cost CPU
    )
    cp.start()
    names = [f"big-node-{i:05d}" for i in range(nodes)]
    figures: dict[str, Any] = {"nodes": nodes, "devices": devices, "claims": CLAIM_COUNT}
    samples: list[dict[str, float]] = []
    profile = tmp_path / "profile.json"
    try:

        async def set_up() -> tuple[Kube, Any, Publication, asyncio.Task[None]]:
            kube = await Kube.connect(kubeconfig=str(cp.kubeconfig))
            t0 = time.perf_counter()
            await _populate(kube, names)
            figures["setup_s"] = round(time.perf_counter() - t0, 1)
            em = worlds.emulator("big", names, devices, tmp_path)
            await em.start()
            pub = Publication(kube, devices)
            task = asyncio.create_task(pub.informer.run())
            await pub.informer.synced.wait()
            return kube, em, pub, task

        kube, em, pub, watch = runner.run(set_up())
        log = tmp_path / "leader.log"
        assert em.ca_file is not None
        proc = _leader(cp, em.url, em.ca_file, profile, log)
        started = time.perf_counter()

        async def sample_until(stop: asyncio.Event | None, seconds: float) -> None:
            """RSS every second for `seconds`, or until `stop` is set."""
            end = time.perf_counter() + seconds
            while time.perf_counter() < end and not (stop and stop.is_set()):
                if proc.poll() is not None:
                    raise RuntimeError(f"the leader exited with {proc.returncode}")
                samples.append({"t": round(time.perf_counter() - started, 1), **memory(proc.pid)})
                if stop is None:
                    await asyncio.sleep(1.0)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 1.0)

        def published() -> None:
            runner.run(sample_until(pub.done, limit))

        try:
            benchmark.pedantic(published, rounds=1, iterations=1)
            Path(f"{profile}.mark").touch()  # the sampler writes the profile so far
            done = pub.done.is_set()
            figures["published_after_s"] = round(pub.at - started, 2) if done else None
            figures["published_devices"] = pub.published()
            figures["first_slice_after_s"] = round(pub.first - started, 2) if pub.first else None
            figures["fabric_requests"] = _served(em, started)
            figures["rss_at_publication_mib"] = samples[-1]["rss_mib"] if samples else None
            runner.run(sample_until(None, SETTLE_S))
            figures["leader_cpu_s"] = round(cpu_seconds(proc.pid), 1)
            figures["rss_peak_mib"] = max(s["rss_mib"] for s in samples)
            figures["rss_last_mib"] = samples[-1]["rss_mib"]
            figures["threads"] = samples[-1]["threads"]
        finally:
            # Stopped with the loop running: the emulator it serves must answer the logout.
            proc.terminate()
            try:
                runner.run(asyncio.to_thread(proc.wait, 60))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        async def tear_down() -> int:
            labelled = sum(
                1
                for n in (await kube.get(NODES))["items"]
                if n["metadata"].get("labels", {}).get("cohdi.io/fabric")
            )
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            await em.stop()
            await kube.close()
            return labelled

        figures["nodes_labelled"] = runner.run(tear_down())
    finally:
        cp.stop()
    until = Path(f"{profile}.mark.json")
    if until.exists():
        figures["profile_until_published"] = json.loads(until.read_text())
    if profile.exists():
        figures["profile_whole_run"] = json.loads(profile.read_text())
    figures["rss_samples"] = [[s["t"], s["rss_mib"]] for s in samples]
    figures["leader_log"] = _log_lines(tmp_path / "leader.log")
    benchmark.extra_info.update(figures)
