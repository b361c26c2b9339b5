"""`cohdi-agent demo`: start the embedded default, run a workload in bursts, show it live, and
end with a latency summary and a timeline plot (with the `plot` extra; without matplotlib the demo
says so in one line and does everything else).

SIGTERM, SIGINT (Ctrl-C) and SIGHUP (the terminal closed) stop every process the demo started
and end it with status 128 + the signal's number; a signal that arrives while it is stopping is
noted and changes nothing. Should the demo be killed outright (SIGKILL), its children get
SIGTERM from the kernel (`agent.demo.world`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from agent import errors, settings
from agent.demo import consistency
from agent.demo import world as worlds
from agent.demo.workload import PodRecord, Workload
from agent.model.fabric import DeviceState


def _say(text: str) -> None:
    print(text, flush=True)


class LiveView:
    """One status block a second: pods by phase, devices by state, attached GPUs per server."""

    def __init__(self, world: worlds.World, workload: Workload) -> None:
        self.world = world
        self.workload = workload
        self.tty = sys.stdout.isatty()
        self._lines = 0

    def render(self) -> list[str]:
        recs = self.workload.records.values()
        phases = {
            p: sum(r.phase == p for r in recs)
            for p in ("pending", "attaching", "bound", "running", "done")
        }
        devices = list(self.world.emulator.state.devices.values())
        states = {s.value: sum(d.state == s for d in devices) for s in DeviceState}
        per_node = {
            n: sum(1 for d in devices if d.machine == f"m-{n}" and d.state == DeviceState.ATTACHED)
            for n in self.world.nodes
        }
        t = time.monotonic() - self.workload.t0
        return [
            f"t={t:5.1f}s  pods  " + "  ".join(f"{k} {v:3d}" for k, v in phases.items()),
            "         GPUs  "
            + "  ".join(f"{k} {v:3d}" for k, v in states.items() if v or k != "failed"),
            "         attached per server  "
            + "  ".join(
                f"{n} {'#' * c}{'.' * (4 - c) if c < 4 else ''}" for n, c in per_node.items()
            ),
        ]

    def draw(self) -> None:
        lines = self.render()
        if self.tty and self._lines:
            sys.stdout.write(f"\x1b[{self._lines}F\x1b[J")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        self._lines = len(lines) if self.tty else 0


#: The phases the summary reports, label → (which pods, from, to). A cold pod's device had to be
#: attached (its allocation carries binding conditions: allocated → ready → bound); a warm pod
#: landed on a GPU already attached to its node (no binding conditions, so no `ready` instant and
#: no wait in the scheduler's PreBind: only submitted → bound means anything for it).
PHASES: dict[str, tuple[str, str, str]] = {
    "cold: claim allocated → device ready (FabricDeviceReady)": ("cold", "allocated", "ready"),
    "cold: device ready → pod bound (scheduler re-check)": ("cold", "ready", "bound"),
    "cold: pod submitted → pod bound": ("cold", "submitted", "bound"),
    "warm: pod submitted → pod bound (GPU already attached)": ("warm", "submitted", "bound"),
    "all: pod submitted → pod bound": ("all", "submitted", "bound"),
}


def _span(r: PodRecord, start: str, end: str) -> float | None:
    """Seconds between two recorded instants of one pod; None when either was never recorded
    (0.0 is "not seen", never an instant of the monotonic clock) or they are out of order."""
    a, b = getattr(r, start), getattr(r, end)
    return b - a if a and b and b >= a else None


def phase_samples(records: list[PodRecord]) -> dict[str, list[float]]:
    """Label of PHASES → seconds, one sample per bound pod that went through that phase."""
    done = [r for r in records if r.bound]
    which = {
        "cold": [r for r in done if not r.warm],
        "warm": [r for r in done if r.warm],
        "all": done,
    }
    out: dict[str, list[float]] = {}
    for label, (group, start, end) in PHASES.items():
        spans = (_span(r, start, end) for r in which[group])
        out[label] = [s for s in spans if s is not None]
    return out


def percentiles(samples: list[float]) -> dict[str, float]:
    """n, p50, p99 and max of `samples` (seconds) in milliseconds, nearest rank (the p99 of
    fewer than 100 samples is the largest); empty → {"n": 0}."""
    if not samples:
        return {"n": 0}
    s = sorted(samples)
    return {
        "n": len(s),
        "p50_ms": round(s[len(s) // 2] * 1e3, 1),
        "p99_ms": round(s[min(len(s) - 1, int(0.99 * len(s)))] * 1e3, 1),
        "max_ms": round(s[-1] * 1e3, 1),
    }


def figures(records: list[PodRecord]) -> dict[str, object]:
    """The summary as data (written beside the plot as summary.json): pods submitted, bound,
    bound warm (no binding-condition wait) and cold, and the percentiles of every phase."""
    done = [r for r in records if r.bound]
    return {
        "pods": len(records),
        "bound": len(done),
        "warm": sum(r.warm for r in done),
        "cold": sum(not r.warm for r in done),
        "reallocated": sorted(r.name for r in records if r.reallocated),
        "failed": sorted(r.name for r in records if r.error or not r.bound),
        "phases": {label: percentiles(xs) for label, xs in phase_samples(records).items()},
    }


def summary(records: list[PodRecord]) -> str:
    done = [r for r in records if r.bound]
    head = ("pod", "model", "node", "alloc→ready", "ready→bound", "submit→bound")
    rows = [f"{head[0]:<16} {head[1]:<22} {head[2]:<13} {head[3]:>12} {head[4]:>12} {head[5]:>13}"]

    def ms(r: PodRecord, start: str, end: str) -> str:
        span = _span(r, start, end)
        return "-" if span is None else f"{span * 1e3:.0f}ms"

    for r in sorted(done, key=lambda r: r.submitted):
        middle = (
            f"{'warm':>12} {'no wait':>12}"
            if r.warm
            else f"{ms(r, 'allocated', 'ready'):>12} {ms(r, 'ready', 'bound'):>12}"
        )
        rows.append(
            f"{r.name:<16} {r.model:<22} {r.node:<13} {middle} {ms(r, 'submitted', 'bound'):>13}"
        )
    if done:
        rows.append("")
        for label, xs in phase_samples(records).items():
            p = percentiles(xs)
            figure = (
                f"p50 {p['p50_ms']:6.0f} ms  p99 {p['p99_ms']:6.0f} ms  (n={p['n']})"
                if p["n"]
                else "none"
            )
            rows.append(f"{label:<58} {figure}")
    warm = sum(r.warm for r in done)
    again = [r.name for r in done if r.reallocated]
    failed = [r for r in records if r.error or not r.bound]
    cycles = (
        "in one scheduling cycle each"
        if not again
        else f"({len(again)} allocated more than once: {', '.join(again)})"
    )
    rows.append(
        f"\n{len(done)} of {len(records)} pods bound {cycles}; {warm} of "
        f"{len(done)} on an already-attached GPU (no binding-condition wait)"
        + (f"; not bound or failed: {', '.join(r.name for r in failed)}" if failed else "")
    )
    return "\n".join(rows)


def plot(records: list[PodRecord], t0: float, path: Path, title: str) -> None:
    """Write the per-pod timeline (PNG) to `path`. matplotlib is optional (the `plot` extra):
    without it, raises errors.MissingExtra and writes nothing."""
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise errors.MissingExtra(
            "matplotlib", extra="plot", needed_for="the timeline plot"
        ) from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = sorted(records, key=lambda r: r.submitted)
    fig, ax = plt.subplots(figsize=(11, max(3.0, 0.22 * len(recs) + 1.5)))
    colors = {
        "pending": "#c8c8c8",
        "attaching": "#f5a623",
        "binding": "#4a90d9",
        "warm: allocated → bound": "#9013fe",
        "running": "#7ed321",
    }
    labelled: set[str] = set()
    for i, r in enumerate(recs):
        end = r.finished or time.monotonic()
        if r.warm:  # no attach, no binding-condition wait: allocated straight to bound
            spans = [
                ("pending", r.submitted, r.allocated or r.bound or end),
                ("warm: allocated → bound", r.allocated, r.bound or end),
                ("running", r.bound, end),
            ]
        else:
            spans = [
                ("pending", r.submitted, r.allocated or end),
                ("attaching", r.allocated, r.ready or end),
                ("binding", r.ready, r.bound or end),
                ("running", r.bound, end),
            ]
        for label, a, b in spans:
            if a and b > a:
                ax.barh(
                    i,
                    b - a,
                    left=a - t0,
                    color=colors[label],
                    height=0.7,
                    label=None if label in labelled else label,
                )
                labelled.add(label)
    ax.set_yticks(
        range(len(recs)),
        [f"{r.name} ({r.node}{', warm' if r.warm else ''})" for r in recs],
        fontsize=7,
    )
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the demo started")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


#: The signals that stop the demo cleanly.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _Stop:
    """The first stop signal cancels the demo's task; later ones are noted and ignored (the
    processes are being stopped already)."""

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.caught: signal.Signals | None = None

    def __call__(self, sig: signal.Signals) -> None:
        if self.caught is not None:
            _say(f"{sig.name}: already stopping every process")
            return
        self.caught = sig
        _say(f"\n{sig.name}: stopping every process the demo started ...")
        self.task.cancel()


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_Stop]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stop = _Stop(task)
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop, sig)
    try:
        yield stop
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


async def run(
    cfg: settings.Settings,
    *,
    pods: int,
    duration: float,
    nodes: int,
    gpus: int,
    attach_latency: float,
    keep: bool,
) -> int:
    """The demo; 0 when every pod was bound and the fabric, the API server and the nodes agree,
    1 otherwise, 128 + the signal's number when a stop signal ended it."""
    with _stop_on_signals() as stop:
        try:
            return await _run(
                cfg,
                pods=pods,
                duration=duration,
                nodes=nodes,
                gpus=gpus,
                attach_latency=attach_latency,
                keep=keep,
            )
        except asyncio.CancelledError:
            if stop.caught is None:
                raise
            stop.task.uncancel()
            return 128 + int(stop.caught)


def warm_kept(warm: int, *, nodes: int, gpus: int) -> int:
    """GPUs the cluster role keeps attached while idle with warm capacity `warm` (per node and
    model) in the demo's world: `nodes` servers, `gpus` split between its two models."""
    per_model = (gpus // 2, gpus - gpus // 2)
    return sum(min(count, warm * nodes) for count in per_model)


def _warm_ready(world: worlds.World, kept: int) -> bool:
    """Warm capacity in place: `kept` GPUs attached and none attaching."""
    devices = list(world.emulator.state.devices.values())
    if any(d.state == DeviceState.ATTACHING for d in devices):
        return False
    return sum(d.state == DeviceState.ATTACHED for d in devices) >= kept


def _settled(world: worlds.World, kept: int) -> bool:
    """Nothing attaching or detaching, and no more GPUs attached than warm capacity keeps."""
    devices = list(world.emulator.state.devices.values())
    if any(d.state in (DeviceState.ATTACHING, DeviceState.DETACHING) for d in devices):
        return False
    return sum(d.state != DeviceState.FREE for d in devices) <= kept


async def _run(
    cfg: settings.Settings,
    *,
    pods: int,
    duration: float,
    nodes: int,
    gpus: int,
    attach_latency: float,
    keep: bool,
) -> int:
    workdir = cfg.dev_state_dir.parent / "demo"
    started = time.monotonic()
    world = await worlds.start(
        cfg,
        workdir=workdir,
        nodes=nodes,
        gpus=gpus,
        attach_latency=attach_latency,
        idle_grace=max(2.0, duration / 6),
        kubeconfig=cfg.kube.kubeconfig,
        progress=_say,
    )
    workload = Workload(world, lifetime=(duration * 0.15, duration * 0.35))
    view = LiveView(world, workload)
    try:
        await workload.start()
        _say(
            f"embedded default up in {time.monotonic() - started:.1f} s; {nodes} GPU servers, "
            f"{gpus} pooled GPUs; submitting {pods} pods in three bursts\n"
        )
        models = worlds.MODELS
        kept = warm_kept(cfg.cluster.warm_devices, nodes=nodes, gpus=gpus)
        if kept:
            # Warm capacity is there before demand on a real site: let it fill before the
            # first burst, so every burst shows what warm capacity does.
            _say(f"waiting for warm capacity: {kept} idle GPUs attached ...")
            warm_by = time.monotonic() + 120
            while time.monotonic() < warm_by and not _warm_ready(world, kept):
                view.draw()
                await asyncio.sleep(1.0)
        waves = [
            (0.0, pods - 2 * (pods // 3)),
            (duration * 0.25, pods // 3),
            (duration * 0.5, pods // 3),
        ]
        sent = 0
        t_start = time.monotonic()
        deadline = t_start + duration * 3 + 60
        for at, count in waves:
            while time.monotonic() - t_start < at:
                view.draw()
                await asyncio.sleep(1.0)
            await asyncio.gather(
                *(
                    workload.submit(f"job-{sent + i:03d}", models[(sent + i) % 2])
                    for i in range(count)
                )
            )
            sent += count
        while time.monotonic() < deadline:
            view.draw()
            if all(r.finished or r.error for r in workload.records.values()):
                break
            await asyncio.sleep(1.0)
        _say(
            "\nworkload finished; waiting for idle GPUs to go back to the pool"
            + (f" (all but the {kept} kept warm)" if kept else "")
            + " ..."
        )
        while time.monotonic() < deadline and not _settled(world, kept):
            view.draw()
            await asyncio.sleep(1.0)
        view.draw()
        records = list(workload.records.values())
        _say("\n" + summary(records))
        (workdir / "summary.json").write_text(json.dumps(figures(records), indent=2) + "\n")
        # The three views converge (a GPU moving to its node's pool is withheld for a few
        # seconds on the way): look until they agree, for at most 30 s.
        agree_by = time.monotonic() + 30
        rows, problems = await consistency.check(world)
        while problems and time.monotonic() < agree_by:
            await asyncio.sleep(1.0)
            rows, problems = await consistency.check(world)
        if problems:
            _say("\nfabric, API server and node checkpoints DISAGREE:\n  " + "\n  ".join(problems))
            _say(consistency.table(rows))
        else:
            _say(f"fabric, API server and node checkpoints agree on all {len(rows)} devices")
        png = workdir / "timeline.png"
        try:
            await asyncio.to_thread(
                plot,
                records,
                workload.t0,
                png,
                f"cohdi-agent demo: {pods} pods, {nodes} servers, {gpus} GPUs",
            )
            _say(f"\ntimeline plot: {png}")
        except errors.MissingExtra:
            _say("\nno matplotlib: install cohdi-agent[plot] for the timeline plot")
        if keep:
            _say(f"running until Ctrl-C; export KUBECONFIG={world.kubeconfig}")
            await asyncio.Event().wait()
        ok = all(r.bound and not r.error for r in records) and not problems
        return 0 if ok else 1
    finally:
        await workload.close()
        await worlds.stop(world)
        _say("stopped every process")
