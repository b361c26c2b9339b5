"""The emulator's single state model, shared by both wire protocols.

Devices move free → attaching → attached → detaching → free (or → failed); each transition that
takes time runs as a task on the loop (`attach_latency`, `detach_latency`, faults). Every change
bumps `seq`, is written atomically to the state file (temp + fsync + rename), wakes waiters
(`wait_change`), and runs the appear/disappear hooks — the hook is how a simulated node sees a
hot-plugged GPU in its synthetic sysfs tree.

Operations raise `EmulatorError` subclasses with an HTTP status; the protocol adapters render them
in their own error formats.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import orjson

from agent.fabric.emulator.config import DeviceSpec, EmulatorConfig, MachineSpec
from agent.files import write_atomic
from agent.model.fabric import DeviceState

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class EmulatorError(Exception):
    status = 400
    code = "BadRequest"


class NotFound(EmulatorError):
    status = 404
    code = "ResourceNotFound"


class Conflict(EmulatorError):
    status = 409
    code = "ResourceInUse"


@dataclass
class Device:
    spec: DeviceSpec
    state: DeviceState = DeviceState.FREE
    machine: str | None = None
    pci_address: str = ""
    reason: str = ""
    #: The device's own health, whatever its composition: "OK", "Warning" or "Critical"
    #: (Redfish `Status.Health` of its block and Processor; FTI's resource status), set from the
    #: admin API (`set_health`) or a link flap (`DeviceFaults.link_flap_period`).
    health: str = "OK"
    #: Why the health is not "OK", in words (Redfish `Status.Conditions[].Message`).
    health_reason: str = ""
    #: Bumped on every change; the Redfish ETag of the block.
    revision: int = 1

    #: Bumped whenever any device's `machine` is set: `EmulatorState.attached_to` regroups the
    #: devices by machine only after that (a collection of 5,000 systems asks per system).
    moves: ClassVar[int] = 0

    def __setattr__(self, name: str, value: object) -> None:
        if name == "machine":
            Device.moves += 1
        super().__setattr__(name, value)


@dataclass
class DeviceFaults:
    """Per-device knobs (set from the admin API or tests)."""

    fail_next_attaches: int = 0
    fail_next_detaches: int = 0
    #: Attaches of this device never finish (the fabric hangs).
    stuck: bool = False
    #: While attached, flip between healthy and failed every `flap_period` seconds (0: off).
    flap_period: float = 0.0
    #: A flapping link, attached or free: the device's health flips between "Critical" (link
    #: down) and "OK" every `link_flap_period` seconds, its composition untouched (0: off).
    link_flap_period: float = 0.0


@dataclass
class Faults:
    """Request-level knobs, consumed by the HTTP middleware."""

    #: The next N API requests answer 503.
    unavailable_next: int = 0
    #: The next N API requests answer 200 with a body that is not JSON.
    garbage_next: int = 0
    #: Every API request waits this long before it is handled (timeouts).
    delay: float = 0.0
    #: Probability that an API request answers 500 (seeded, reproducible).
    error_rate: float = 0.0
    #: The next N attaches (of any device) fail, leaving the device failed.
    fail_next_attaches: int = 0
    #: Path (e.g. `/redfish/v1/CompositionService`) -> how many more requests to it answer 503:
    #: a failure in the middle of a client's discovery.
    unavailable_paths: dict[str, int] = field(default_factory=dict)
    #: `$expand` answers 501 although the service root advertises it (a service that changed,
    #: or a proxy in between).
    expand_unsupported: bool = False
    #: The next N Redfish compositions (actions or Links PATCH) answer 204 and change nothing: a
    #: service that acknowledges a write whose effect never shows.
    no_effect_next: int = 0
    devices: dict[str, DeviceFaults] = field(default_factory=dict)


Hook = Callable[["Device", MachineSpec], None]


@dataclass
class Task:
    id: str
    device: str
    operation: str
    state: str = "Running"  # Redfish TaskState: Running, Completed, Exception
    message: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)


class EmulatorState:
    def __init__(
        self,
        config: EmulatorConfig,
        *,
        state_file: Path | None = None,
        seed: int = 0,
    ) -> None:
        self.config = config
        self.machines = {m.id: m for m in config.machines}
        self.devices = {d.id: Device(d) for d in config.devices}
        self._by_machine: tuple[int, dict[str, list[Device]]] = (-1, {})
        self._grouped_devices = 0
        self.faults = Faults()
        self.rng = random.Random(seed)  # noqa: S311 -- reproducible fault injection, not crypto
        self.state_file = state_file
        self.seq = 1
        self.tasks: dict[str, Task] = {}
        self.on_appear: list[Hook] = []
        self.on_disappear: list[Hook] = []
        self._changed = asyncio.Condition()
        self._transitions: dict[str, asyncio.Task[None]] = {}
        self._next_task = 1
        #: Counters, for tests that assert "no second attach was ever sent".
        self.attach_requests = 0
        self.attach_started = 0
        #: (method, path with query) of the latest API requests, oldest first: tests count what a
        #: client sent.
        self.requests: collections.deque[tuple[str, str]] = collections.deque(maxlen=100_000)
        if config.mockup is not None:
            for dev_id, initial in config.mockup.initial().items():
                self.preset(dev_id, initial.state, initial.machine, initial.reason)
        if state_file is not None and state_file.exists():
            self._load(state_file)

    # --- queries ---------------------------------------------------------------------------------

    def device(self, device_id: str) -> Device:
        dev = self.devices.get(device_id)
        if dev is None:
            raise NotFound(f"no pooled device {device_id!r} on this fabric manager")
        return dev

    def machine(self, machine_id: str) -> MachineSpec:
        m = self.machines.get(machine_id)
        if m is None:
            raise NotFound(f"no machine {machine_id!r} on this fabric manager")
        return m

    def device_faults(self, device_id: str) -> DeviceFaults:
        return self.faults.devices.setdefault(device_id, DeviceFaults())

    def attached_to(self, machine_id: str) -> list[Device]:
        """The devices on `machine_id` (any state but free), in inventory order."""
        moves, grouped = self._by_machine
        if moves != Device.moves or len(self.devices) != self._grouped_devices:
            grouped = {}
            for d in self.devices.values():
                if d.machine is not None:
                    grouped.setdefault(d.machine, []).append(d)
            self._by_machine = (Device.moves, grouped)
            self._grouped_devices = len(self.devices)
        return list(grouped.get(machine_id, ()))

    # --- operations ------------------------------------------------------------------------------

    def attach(self, device_id: str, machine_id: str) -> Task | None:
        """Start attaching; idempotent for the same machine. Returns the running task, or None
        when the device is already attached there."""
        self.attach_requests += 1
        dev = self.device(device_id)
        machine = self.machine(machine_id)
        if not machine.can_reach(dev.spec):
            raise EmulatorError(
                f"device {device_id} is in zone(s) {list(dev.spec.zones) or [dev.spec.fabric]}, "
                f"machine {machine_id} in {list(machine.zones) or [machine.fabric]}: no zone in "
                "common, they cannot be composed"
            )
        if dev.state == DeviceState.FAILED:
            raise Conflict(f"device {device_id} has failed ({dev.reason}) and cannot be attached")
        if dev.machine not in (None, machine_id):
            raise Conflict(f"device {device_id} is {dev.state} to machine {dev.machine}")
        if dev.state == DeviceState.ATTACHED:
            return None
        if dev.state == DeviceState.ATTACHING:
            return self._task_for(device_id)
        if dev.state == DeviceState.DETACHING:
            raise Conflict(f"device {device_id} is still detaching from machine {machine_id}")
        self.attach_started += 1
        dev.state, dev.machine, dev.reason = DeviceState.ATTACHING, machine_id, ""
        self._changed_now(dev)
        task = self._new_task(device_id, "attach")
        self._transitions[device_id] = asyncio.create_task(self._finish_attach(dev, task))
        return task

    def detach(self, device_id: str, machine_id: str | None = None) -> Task | None:
        dev = self.device(device_id)
        if machine_id is not None and dev.machine not in (None, machine_id):
            raise Conflict(
                f"device {device_id} is attached to machine {dev.machine}, not {machine_id}"
            )
        if dev.state == DeviceState.FREE:
            return None
        if dev.state == DeviceState.DETACHING:
            return self._task_for(device_id)
        if dev.state == DeviceState.ATTACHING:
            raise Conflict(f"device {device_id} is still attaching; detach after it settles")
        if dev.state == DeviceState.FAILED:
            # Take a failed device off its machine; it stays failed until an operator heals it.
            machine = self.machines.get(dev.machine or "")
            if machine is not None:
                self._run_hooks(self.on_disappear, dev, machine)
                dev.machine, dev.pci_address = None, ""
                self._changed_now(dev)
            return None
        self._cancel_transition(device_id)
        dev.state = DeviceState.DETACHING
        self._changed_now(dev)
        task = self._new_task(device_id, "detach")
        self._transitions[device_id] = asyncio.create_task(self._finish_detach(dev, task))
        return task

    def preset(
        self, device_id: str, state: DeviceState, machine: str | None, reason: str = ""
    ) -> None:
        """Set a device's starting state (a mockup's recorded composition) before any client
        talks to the emulator; the state file, read after, wins."""
        dev = self.device(device_id)
        dev.state, dev.machine, dev.reason = state, machine, reason
        if machine is not None and state in (DeviceState.ATTACHED, DeviceState.FAILED):
            dev.pci_address = self._pci_address_for(machine)

    HEALTHS: ClassVar[tuple[str, ...]] = ("OK", "Warning", "Critical")

    def set_health(self, device_id: str, health: str, reason: str = "") -> None:
        """Set a device's own health (a fault the fabric detected on it, or its repair)."""
        if health not in self.HEALTHS:
            raise EmulatorError(f"health {health!r}: one of {list(self.HEALTHS)}")
        dev = self.device(device_id)
        reason = "" if health == "OK" else reason or f"injected {health} health"
        if (dev.health, dev.health_reason) != (health, reason):
            dev.health, dev.health_reason = health, reason
            self._changed_now(dev)

    def start_link_flap(self, device_id: str) -> None:
        """Run the device's link flap (`DeviceFaults.link_flap_period`) until it is set to 0;
        the device ends healthy."""
        key = f"link-flap:{device_id}"
        if key not in self._transitions:
            self._transitions[key] = asyncio.create_task(self._link_flap(device_id, key))

    async def _link_flap(self, device_id: str, key: str) -> None:
        faults = self.device_faults(device_id)
        try:
            while faults.link_flap_period > 0:
                await asyncio.sleep(faults.link_flap_period)
                down = self.device(device_id).health == "OK"
                self.set_health(device_id, "Critical" if down else "OK", "link down (flapping)")
            self.set_health(device_id, "OK")
        finally:
            if self._transitions.get(key) is asyncio.current_task():
                self._transitions.pop(key, None)

    def heal(self, device_id: str) -> None:
        """An operator repaired a failed device: back to the free pool."""
        dev = self.device(device_id)
        if dev.state == DeviceState.FAILED:
            machine = self.machines.get(dev.machine or "")
            if machine and dev.pci_address:
                self._run_hooks(self.on_disappear, dev, machine)
            dev.state, dev.machine, dev.pci_address, dev.reason = DeviceState.FREE, None, "", ""
            self._changed_now(dev)

    # --- transitions -----------------------------------------------------------------------------

    async def _finish_attach(self, dev: Device, task: Task) -> None:
        faults = self.device_faults(dev.spec.id)
        try:
            await asyncio.sleep(dev.spec.attach_latency)
            if faults.stuck:
                await asyncio.Event().wait()  # never finishes: the fabric hangs
            if faults.fail_next_attaches > 0 or self.faults.fail_next_attaches > 0:
                if faults.fail_next_attaches > 0:
                    faults.fail_next_attaches -= 1
                else:
                    self.faults.fail_next_attaches -= 1
                dev.state, dev.reason = DeviceState.FAILED, "injected attach failure"
                task.state, task.message = "Exception", f"attach of {dev.spec.id} failed"
                self._changed_now(dev)
                return
            machine = self.machines[dev.machine or ""]
            dev.pci_address = self._pci_address_for(machine.id)
            dev.state = DeviceState.ATTACHED
            self._run_hooks(self.on_appear, dev, machine)
            task.state, task.message = "Completed", f"{dev.spec.id} attached to {machine.id}"
            self._changed_now(dev)
            if faults.flap_period > 0:
                self._transitions[dev.spec.id] = asyncio.create_task(self._flap(dev, faults))
        finally:
            task.done.set()
            if self._transitions.get(dev.spec.id) is asyncio.current_task():
                self._transitions.pop(dev.spec.id, None)

    async def _finish_detach(self, dev: Device, task: Task) -> None:
        faults = self.device_faults(dev.spec.id)
        try:
            await asyncio.sleep(dev.spec.detach_latency)
            if faults.fail_next_detaches > 0:
                faults.fail_next_detaches -= 1
                dev.state, dev.reason = DeviceState.FAILED, "injected detach failure"
                task.state, task.message = "Exception", f"detach of {dev.spec.id} failed"
                self._changed_now(dev)
                return
            machine = self.machines[dev.machine or ""]
            self._run_hooks(self.on_disappear, dev, machine)
            dev.state, dev.machine, dev.pci_address = DeviceState.FREE, None, ""
            task.state, task.message = "Completed", f"{dev.spec.id} detached from {machine.id}"
            self._changed_now(dev)
        finally:
            task.done.set()
            if self._transitions.get(dev.spec.id) is asyncio.current_task():
                self._transitions.pop(dev.spec.id, None)

    async def _flap(self, dev: Device, faults: DeviceFaults) -> None:
        while dev.machine is not None and faults.flap_period > 0:
            await asyncio.sleep(faults.flap_period)
            if dev.state == DeviceState.ATTACHED:
                dev.state, dev.reason = DeviceState.FAILED, "flapping link"
            elif dev.state == DeviceState.FAILED:
                dev.state, dev.reason = DeviceState.ATTACHED, ""
            else:
                return
            self._changed_now(dev)

    def _cancel_transition(self, device_id: str) -> None:
        running = self._transitions.pop(device_id, None)
        if running is not None:
            running.cancel()

    def _pci_address_for(self, machine_id: str) -> str:
        used = {d.pci_address for d in self.devices.values() if d.machine == machine_id}
        for bus in range(0x41, 0xFF):
            addr = f"0000:{bus:02x}:00.0"
            if addr not in used:
                return addr
        raise Conflict(f"machine {machine_id} has no free PCI bus left")

    def _run_hooks(self, hooks: list[Hook], dev: Device, machine: MachineSpec) -> None:
        for hook in hooks:
            try:
                hook(dev, machine)
            except Exception:
                logger.exception("emulator hook %r failed for %s", hook, dev.spec.id)

    def _new_task(self, device_id: str, operation: str) -> Task:
        task = Task(id=str(self._next_task), device=device_id, operation=operation)
        self._next_task += 1
        self.tasks[task.id] = task
        return task

    def _task_for(self, device_id: str) -> Task | None:
        running = [t for t in self.tasks.values() if t.device == device_id and t.state == "Running"]
        return running[-1] if running else None

    # --- change notification and persistence -----------------------------------------------------

    def _changed_now(self, dev: Device) -> None:
        dev.revision += 1
        self.seq += 1
        self._save()
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_change(self, since: int, timeout: float) -> int:  # noqa: ASYNC109
        """Wait until `seq` moves past `since` (or `timeout` seconds); returns the current seq."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: self.seq > since)
        return self.seq

    def _save(self) -> None:
        if self.state_file is None:
            return
        doc = {
            "version": STATE_VERSION,
            "seq": self.seq,
            "devices": {
                d.spec.id: {
                    "state": d.state.value,
                    "machine": d.machine,
                    "pci_address": d.pci_address,
                    "reason": d.reason,
                    "health": d.health,
                    "health_reason": d.health_reason,
                    "revision": d.revision,
                }
                for d in self.devices.values()
                if d.state != DeviceState.FREE or d.revision > 1
            },
        }
        write_atomic(self.state_file, orjson.dumps(doc, option=orjson.OPT_INDENT_2))

    def _load(self, path: Path) -> None:
        try:
            doc = orjson.loads(path.read_bytes())
            if doc.get("version") != STATE_VERSION:
                raise ValueError(f"state version {doc.get('version')!r}, expected {STATE_VERSION}")
            self.seq = int(doc["seq"])
            for dev_id, rec in doc["devices"].items():
                dev = self.devices.get(dev_id)
                if dev is None:
                    logger.warning(
                        "state file names device %s, which the config no longer has", dev_id
                    )
                    continue
                dev.state = DeviceState(rec["state"])
                dev.machine = rec["machine"]
                dev.pci_address = rec.get("pci_address", "")
                dev.reason = rec.get("reason", "")
                dev.health = rec.get("health", "OK")
                dev.health_reason = rec.get("health_reason", "")
                dev.revision = int(rec.get("revision", 1))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EmulatorError(
                f"emulator state file {path} is unreadable ({exc}); move it away to start empty"
            ) from exc

    def resume(self) -> None:
        """After a restart: finish the transitions that were in flight when the state was saved.
        Call once the loop runs."""
        for dev in self.devices.values():
            if dev.state == DeviceState.ATTACHING:
                task = self._new_task(dev.spec.id, "attach")
                self._transitions[dev.spec.id] = asyncio.create_task(self._finish_attach(dev, task))
            elif dev.state == DeviceState.DETACHING:
                task = self._new_task(dev.spec.id, "detach")
                self._transitions[dev.spec.id] = asyncio.create_task(self._finish_detach(dev, task))

    async def close(self) -> None:
        for t in list(self._transitions.values()):
            t.cancel()
        await asyncio.gather(*self._transitions.values(), return_exceptions=True)
        self._transitions.clear()

    def snapshot(self) -> dict[str, Any]:
        """Everything, for the admin API and consistency checks."""
        return {
            "seq": self.seq,
            "machines": [asdict(m) for m in self.machines.values()],
            "devices": [
                {
                    "id": d.spec.id,
                    "model": d.spec.model,
                    "fabric": d.spec.fabric,
                    "serial": d.spec.serial,
                    "state": d.state.value,
                    "machine": d.machine,
                    "pci_address": d.pci_address,
                    "reason": d.reason,
                    "health": d.health,
                    "health_reason": d.health_reason,
                }
                for d in self.devices.values()
            ],
        }
