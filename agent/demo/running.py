"""`cohdi-agent demo`: start the embedded default, run a workload in bursts, show it live, and
end with a latency summary and a timeline plot (with the `plot` extra; without matplotlib the demo
says so in one line and does everything else). Ctrl-C stops every process cleanly."""

from __future__ import annotations

import asyncio
import sys
import time
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


def summary(records: list[PodRecord]) -> str:
    done = [r for r in records if r.bound]
    head = ("pod", "model", "node", "alloc→ready", "ready→bound", "submit→bound")
    rows = [f"{head[0]:<16} {head[1]:<22} {head[2]:<13} {head[3]:>12} {head[4]:>12} {head[5]:>13}"]
    for r in sorted(done, key=lambda r: r.submitted):
        rows.append(
            f"{r.name:<16} {r.model:<22} {r.node:<13} {(r.ready - r.allocated) * 1e3:10.0f}ms "
            f"{(r.bound - r.ready) * 1e3:10.0f}ms {(r.bound - r.submitted) * 1e3:11.0f}ms"
        )

    def pct(xs: list[float]) -> str:
        s = sorted(xs)
        p99 = s[min(len(s) - 1, int(0.99 * len(s)))]
        return f"p50 {s[len(s) // 2] * 1e3:6.0f} ms  p99 {p99 * 1e3:6.0f} ms"

    if done:
        spans = {
            "claim allocated → device ready (FabricDeviceReady)": [
                r.ready - r.allocated for r in done
            ],
            "device ready → pod bound (scheduler re-check)": [r.bound - r.ready for r in done],
            "pod submitted → pod bound": [r.bound - r.submitted for r in done],
        }
        rows += ["", *(f"{label:<52} {pct(xs)}" for label, xs in spans.items())]
    failed = [r for r in records if r.error or not r.bound]
    rows.append(
        f"\n{len(done)} of {len(records)} pods bound in one scheduling cycle each"
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
        "running": "#7ed321",
    }
    for i, r in enumerate(recs):
        end = r.finished or time.monotonic()
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
                    label=label if i == 0 else None,
                )
    ax.set_yticks(range(len(recs)), [f"{r.name} ({r.node})" for r in recs], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the demo started")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


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
        _say("\nworkload finished; waiting for idle GPUs to go back to the pool ...")
        while time.monotonic() < deadline and any(
            d.state != DeviceState.FREE for d in world.emulator.state.devices.values()
        ):
            view.draw()
            await asyncio.sleep(1.0)
        view.draw()
        records = list(workload.records.values())
        _say("\n" + summary(records))
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
