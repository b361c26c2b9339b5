"""A DMTF Redfish mockup as the emulator's initial state.

A mockup (DMTF's `Redfish-Publications` mockups, or a capture by DMTF's Redfish-Mockup-Creator) is
a directory tree with one `index.json` per URI: `<dir>/index.json` is `/redfish/v1/`,
`<dir>/Systems/index.json` is `/redfish/v1/Systems`, and so on (a tree that starts with
`redfish/v1/` is read the same way); `$metadata/index.xml` is the CSDL document. `load()` reads
every document once; the emulator then serves them as they are (less the `@Redfish.Copyright`
annotation, which is for mockups only), except the resources composition changes, which it
renders from its live state:

- every ComputerSystem of the `Systems` collection is a machine (`MachineSpec`, id = the last
  segment of its URI); its zones are those of its own blocks (the blocks in its
  `Links.ResourceBlocks` whose `ResourceBlockType` includes `Compute` or `ComputerSystem`: DSP2050
  registers an expandable system as such a block), read from the block's `Links.Zones` and from
  every zone whose `Links.ResourceBlocks` lists the block;
- every other ResourceBlock of the `CompositionService.ResourceBlocks` collection composed to at
  most one system is a composable device (`DeviceSpec`, id = the last segment of its URI, model
  and vendor from its first `Processors[]` member, else the block's `Name`), starting in the state
  the mockup records (`CompositionStatus.CompositionState`, `Links.ComputerSystems`);
- a system's own blocks and a block composed to several systems (a shared drive) are served as
  recorded and cannot be composed here.

Ids come from URIs, not from the documents' `Id`: DMTF's own mockups have documents whose `Id`
differs from their URI (`ResourceBlocks/RackServer-1` has `"Id": "RackServer1"`), and the URI is
what a client addresses.

Errors are `EmulatorConfigError`s naming the file and what is wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from agent.fabric.emulator.config import DeviceSpec, EmulatorConfigError, MachineSpec
from agent.model.fabric import DeviceState

ROOT = "/redfish/v1"
#: Blocks that are (part of) a system itself rather than something composed into one.
SYSTEM_BLOCK_TYPES = frozenset({"Compute", "ComputerSystem"})
_STATES = {
    "Unused": DeviceState.FREE,
    "Composing": DeviceState.ATTACHING,
    "Composed": DeviceState.ATTACHED,
    "ComposedAndAvailable": DeviceState.ATTACHED,
    "Failed": DeviceState.FAILED,
    "Unavailable": DeviceState.FAILED,
}


def normalise(uri: str) -> str:
    """`/redfish/v1/` -> `/redfish/v1`, `/redfish/v1/Systems/` -> `/redfish/v1/Systems`; the
    query is dropped."""
    path = uri.split("?", 1)[0]
    return path.rstrip("/") or "/"


def segment(uri: str) -> str:
    """The last segment of a URI: the id the emulator (and the client) use."""
    return normalise(uri).rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class Initial:
    """The state a composable block starts in."""

    state: DeviceState
    machine: str | None
    reason: str = ""


class Mockup:
    """The documents of one mockup, by URI (normalised, `/redfish/v1/...`)."""

    def __init__(self, directory: Path, docs: dict[str, dict[str, Any]], metadata: str) -> None:
        self.directory = directory
        self.docs = docs
        #: The CSDL `$metadata` document of the mockup ("" when it has none).
        self.metadata = metadata

    # --- loading ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: Path) -> Mockup:
        base = (
            directory / "redfish" / "v1" if (directory / "redfish" / "v1").is_dir() else directory
        )
        if not (base / "index.json").is_file():
            raise EmulatorConfigError(
                f"mockup {directory}: no index.json (the service root) in it or in "
                f"{directory}/redfish/v1; a DMTF mockup is a tree of <uri>/index.json documents"
            )
        docs: dict[str, dict[str, Any]] = {}
        for path in sorted(base.rglob("index.json")):
            rel = path.parent.relative_to(base).as_posix()
            uri = ROOT if rel == "." else f"{ROOT}/{rel}"
            try:
                doc = orjson.loads(path.read_bytes())
            except (OSError, orjson.JSONDecodeError) as exc:
                raise EmulatorConfigError(f"mockup document {path}: {exc}") from exc
            if not isinstance(doc, dict):
                raise EmulatorConfigError(f"mockup document {path}: not a JSON object")
            # "only intended for use in mockups" (DSP0266): a service does not serve it
            doc.pop("@Redfish.Copyright", None)
            docs[uri] = doc
        meta = base / "$metadata" / "index.xml"
        return cls(directory, docs, meta.read_text() if meta.is_file() else "")

    # --- queries ---------------------------------------------------------------------------------

    def get(self, uri: str) -> dict[str, Any] | None:
        return self.docs.get(normalise(uri))

    def members(self, uri: str | None) -> list[str]:
        """The member URIs of a collection that the mockup also holds documents for."""
        doc = self.get(uri) if uri else None
        out = []
        for m in (doc or {}).get("Members") or []:
            if (
                isinstance(m, dict)
                and isinstance(m.get("@odata.id"), str)
                and self.get(m["@odata.id"])
            ):
                out.append(normalise(m["@odata.id"]))
        return out

    def link(self, doc: dict[str, Any] | None, name: str) -> str | None:
        value = (doc or {}).get(name)
        uri = value.get("@odata.id") if isinstance(value, dict) else None
        return normalise(uri) if isinstance(uri, str) else None

    @property
    def systems_uri(self) -> str | None:
        return self.link(self.get(ROOT), "Systems")

    @property
    def blocks_uri(self) -> str | None:
        comp = self.get(self.link(self.get(ROOT), "CompositionService") or "")
        return self.link(comp, "ResourceBlocks")

    @property
    def zones_uri(self) -> str | None:
        comp = self.get(self.link(self.get(ROOT), "CompositionService") or "")
        return self.link(comp, "ResourceZones")

    def blocks(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for uri in self.members(self.blocks_uri):
            yield uri, self.docs[uri]

    def zones_of_block(self, uri: str) -> tuple[str, ...]:
        """Zone ids of a block: its own `Links.Zones`, and every zone listing it."""
        doc = self.get(uri) or {}
        found = [segment(z) for z in _links(doc, "Zones")]
        for zone_uri in self.members(self.zones_uri):
            if uri in (normalise(b) for b in _links(self.docs[zone_uri], "ResourceBlocks")):
                found.append(segment(zone_uri))
        return tuple(dict.fromkeys(found))

    def own_blocks(self, system_uri: str) -> list[str]:
        """A system's own blocks: those in its `Links.ResourceBlocks` that are compute or the
        system itself, plus blocks of those types that name it in `Links.ComputerSystems`."""
        system = self.get(system_uri) or {}
        found = [normalise(b) for b in _links(system, "ResourceBlocks")]
        for uri, doc in self.blocks():
            if system_uri in (normalise(s) for s in _links(doc, "ComputerSystems")):
                found.append(uri)
        return [
            b
            for b in dict.fromkeys(found)
            if SYSTEM_BLOCK_TYPES & set((self.get(b) or {}).get("ResourceBlockType") or [])
        ]

    def composable(self, uri: str) -> bool:
        """Whether the emulator composes this block live (see the module docstring)."""
        doc = self.get(uri) or {}
        types = set(doc.get("ResourceBlockType") or [])
        return not (types & SYSTEM_BLOCK_TYPES) and len(_links(doc, "ComputerSystems")) <= 1

    # --- as emulator configuration ---------------------------------------------------------------

    def machines(self) -> tuple[MachineSpec, ...]:
        out = []
        for uri in self.members(self.systems_uri):
            doc = self.docs[uri]
            zones = tuple(
                dict.fromkeys(z for b in self.own_blocks(uri) for z in self.zones_of_block(b))
            )
            out.append(
                MachineSpec(
                    id=segment(uri),
                    name=str(doc.get("HostName") or doc.get("Id") or segment(uri)),
                    fabric=zones[0] if zones else "",
                    zones=zones,
                )
            )
        return tuple(out)

    def devices(self, *, attach_latency: float, detach_latency: float) -> tuple[DeviceSpec, ...]:
        out = []
        for uri, doc in self.blocks():
            if not self.composable(uri):
                continue
            zones = self.zones_of_block(uri)
            proc = self._first_processor(doc)
            out.append(
                DeviceSpec(
                    id=segment(uri),
                    fabric=zones[0] if zones else "",
                    model=str(proc.get("Model") or doc.get("Name") or segment(uri)),
                    vendor=str(proc.get("Manufacturer") or ""),
                    memory=_memory_bytes(proc),
                    serial=str(proc.get("SerialNumber") or proc.get("UUID") or ""),
                    pci_vendor="0x10de",
                    pci_device="0x20b0",
                    attach_latency=attach_latency,
                    detach_latency=detach_latency,
                    zones=zones,
                    block_types=tuple(str(t) for t in doc.get("ResourceBlockType") or []),
                )
            )
        return tuple(out)

    def initial(self) -> dict[str, Initial]:
        """device id -> the state the mockup records for it (composable blocks only)."""
        machines = {segment(u) for u in self.members(self.systems_uri)}
        out = {}
        for uri, doc in self.blocks():
            if not self.composable(uri):
                continue
            raw = (doc.get("CompositionStatus") or {}).get("CompositionState", "Unused")
            state = _STATES.get(str(raw), DeviceState.FAILED)
            systems = [segment(s) for s in _links(doc, "ComputerSystems")]
            machine = systems[0] if systems and systems[0] in machines else None
            if state in (DeviceState.ATTACHED, DeviceState.ATTACHING) and machine is None:
                state = DeviceState.FREE  # composed to a system the mockup does not have
            if state == DeviceState.FREE:
                machine = None
            reason = f"{raw} in the mockup" if state == DeviceState.FAILED else ""
            out[segment(uri)] = Initial(state, machine, reason)
        return out

    def _first_processor(self, block: dict[str, Any]) -> dict[str, Any]:
        for ref in block.get("Processors") or []:
            if isinstance(ref, dict) and isinstance(ref.get("@odata.id"), str):
                return self.get(ref["@odata.id"]) or {}
        return {}


def _links(doc: dict[str, Any], name: str) -> list[str]:
    """The URIs of `Links.<name>` (an array of references), skipping malformed elements."""
    refs = (doc.get("Links") or {}).get(name) or []
    if not isinstance(refs, list):
        return []
    return [
        r["@odata.id"] for r in refs if isinstance(r, dict) and isinstance(r.get("@odata.id"), str)
    ]


def _memory_bytes(proc: dict[str, Any]) -> int:
    """Device memory of a Processor: its non-integrated `ProcessorMemory` (MiB), else
    `MemorySummary.TotalMemorySizeMiB`."""
    mib = sum(
        int(m.get("CapacityMiB") or 0)
        for m in proc.get("ProcessorMemory") or []
        if isinstance(m, dict) and not m.get("IntegratedMemory") and m.get("MemoryType") != "Cache"
    )
    if not mib:
        mib = int((proc.get("MemorySummary") or {}).get("TotalMemorySizeMiB") or 0)
    return mib * 2**20
