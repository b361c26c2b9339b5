"""The DRA kubelet plugin: plugin registration (v1) and the DRA service (v1 and v1beta1, one
implementation) on unix sockets under the kubelet directory, sockets 0600.

NodePrepareResources, per claim: checkpoint says PrepareCompleted → the same answer again;
otherwise record PrepareStarted, read the claim from the API server (our allocation results),
map each (pool, device) to the PCI function the node saw arrive, write the claim's CDI spec,
record PrepareCompleted, and answer the CDI ids. Every claim is in the response; a claim that
fails carries its error there (a gRPC error is only for a malformed request); an empty request is
fine. NodeUnprepareResources removes the spec and the record, also for claims long deleted.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import grpc

from agent import errors
from agent._proto.dra.v1 import api_pb2 as v1
from agent._proto.dra.v1 import api_pb2_grpc as v1_grpc
from agent._proto.dra.v1beta1 import api_pb2 as v1beta1
from agent._proto.dra.v1beta1 import api_pb2_grpc as v1beta1_grpc
from agent._proto.pluginregistration.v1 import api_pb2 as reg
from agent._proto.pluginregistration.v1 import api_pb2_grpc as reg_grpc
from agent.kube.client import Kube, path_of
from agent.kube.resources import spec
from agent.model.pool import device_name
from agent.node import cdi
from agent.node.checkpoint import COMPLETED, STARTED, Checkpoint, PreparedClaim
from agent.node.reporting import NodeReporter

logger = logging.getLogger(__name__)

SUPPORTED = ["v1.DRAPlugin", "v1beta1.DRAPlugin"]


class Preparer:
    """What both DRA service versions call; owns the checkpoint and the CDI files."""

    def __init__(
        self, kube: Kube, *, driver: str, reporter: NodeReporter, plugin_dir: Path, cdi_dir: Path
    ) -> None:
        self.kube = kube
        self.driver = driver
        self.reporter = reporter
        self.cdi_dir = cdi_dir
        self.checkpoint = Checkpoint(plugin_dir / "checkpoint.json")
        self._lock = asyncio.Lock()  # one prepare/unprepare at a time in this process

    def clean_stale(self) -> None:
        """Entries of an earlier boot: their devices and CDI files are gone or meaningless."""
        with self.checkpoint.locked():
            claims = self.checkpoint.load()
            for old in self.checkpoint.stale:
                cdi.remove(self.cdi_dir, self.driver, old.uid)
                logger.info(
                    "dropped claim %s/%s prepared before the last reboot", old.namespace, old.name
                )
            if self.checkpoint.stale:
                self.checkpoint.save(claims)

    async def prepare(self, namespace: str, uid: str, name: str) -> list[dict[str, Any]]:
        async with self._lock:
            with self.checkpoint.locked():
                claims = self.checkpoint.load()
                done = claims.get(uid)
                if done is not None and done.state == COMPLETED:
                    return done.devices
                claims[uid] = PreparedClaim(uid, namespace, name, STARTED)
                self.checkpoint.save(claims)
            devices, spec_doc = await self._devices(namespace, uid, name)
            path = await asyncio.to_thread(cdi.write, self.cdi_dir, self.driver, uid, spec_doc)
            with self.checkpoint.locked():
                claims = self.checkpoint.load()
                claims[uid] = PreparedClaim(uid, namespace, name, COMPLETED, devices, str(path))
                self.checkpoint.save(claims)
            return devices

    async def unprepare(self, uid: str) -> None:
        async with self._lock:
            await asyncio.to_thread(cdi.remove, self.cdi_dir, self.driver, uid)
            with self.checkpoint.locked():
                claims = self.checkpoint.load()
                if claims.pop(uid, None) is not None:
                    self.checkpoint.save(claims)

    async def _devices(
        self, namespace: str, uid: str, name: str
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        claim = await self.kube.get(
            path_of(
                group="resource.k8s.io",
                version="v1",
                plural="resourceclaims",
                namespace=namespace,
                name=name,
            )
        )
        if claim["metadata"].get("uid") != uid:
            raise errors.PrepareError(
                f"claim {namespace}/{name} was replaced "
                f"(uid {claim['metadata'].get('uid')}, asked {uid})"
            )
        allocation = (claim.get("status") or {}).get("allocation")
        if not allocation:
            raise errors.PrepareError(f"claim {namespace}/{name} is not allocated")
        results = [r for r in allocation["devices"]["results"] if r["driver"] == self.driver]
        out, cdi_devices = [], []
        for r in results:
            bdf, serial, minor = await self._local(r["pool"], r["device"])
            fn = self.reporter.functions.get(bdf)
            if fn is None:
                raise errors.PrepareError(
                    f"device {r['pool']}/{r['device']} ({bdf}) is not on this node's PCI bus"
                )
            nodes = cdi.device_nodes(fn, minor=minor)
            env = {"COHDI_GPU_BDF": bdf}
            if serial:
                env["NVIDIA_VISIBLE_DEVICES"] = serial
            cdi_devices.append((r["device"], nodes, env))
            out.append({"request_names": [r["request"]], "pool": r["pool"], "device": r["device"]})
        spec_doc = cdi.build(self.driver, uid, cdi_devices)
        for entry, cdi_id in zip(out, cdi.qualified_ids(spec_doc), strict=True):
            entry["cdi_ids"] = [cdi_id]
        return out, spec_doc

    async def _local(self, pool: str, device: str) -> tuple[str, str, int | None]:
        """(PCI address, GPU UUID, minor) of a pool device, from the ComposableResource the node
        reported on."""
        for obj in self.reporter.resources.store.values():
            st = obj.get("status") or {}
            fabric_id = st.get("cdi_device_id") or spec(obj).get("fabric_device") or ""
            if fabric_id and device_name(fabric_id) == device:
                bdf = st.get("pci_address") or ""
                return bdf, st.get("device_id") or "", await self._minor(bdf)
        raise errors.PrepareError(f"no attached device {pool}/{device} on this node")

    async def _minor(self, bdf: str) -> int | None:
        if not self.reporter.nvml.available or not bdf:
            return None
        n = self.reporter.nvml.nvml

        def get() -> int | None:
            try:
                return n.minor(n.handle_by_bus_id(bdf))
            except errors.NvmlError:
                n.reinit()
                try:
                    return n.minor(n.handle_by_bus_id(bdf))
                except errors.NvmlError:
                    return None

        result = await self.reporter.nvml.call(get)
        return result if isinstance(result, int) else None


def _servicer(pb: Any, base: Any, preparer: Preparer) -> Any:
    class Servicer(base):  # type: ignore[misc]
        async def NodePrepareResources(self, request: Any, context: Any) -> Any:
            response = pb.NodePrepareResourcesResponse()
            for claim in request.claims:
                entry = response.claims[claim.uid]
                try:
                    for d in await preparer.prepare(claim.namespace, claim.uid, claim.name):
                        entry.devices.append(
                            pb.Device(
                                request_names=d["request_names"],
                                pool_name=d["pool"],
                                device_name=d["device"],
                                cdi_device_ids=d["cdi_ids"],
                            )
                        )
                except (errors.AgentError, ValueError, OSError) as exc:
                    logger.warning("prepare %s/%s failed: %s", claim.namespace, claim.name, exc)
                    entry.error = str(exc)
            return response

        async def NodeUnprepareResources(self, request: Any, context: Any) -> Any:
            response = pb.NodeUnprepareResourcesResponse()
            for claim in request.claims:
                entry = response.claims[claim.uid]
                try:
                    await preparer.unprepare(claim.uid)
                except (errors.AgentError, OSError) as exc:
                    entry.error = str(exc)
            return response

    return Servicer()


class Registration(reg_grpc.RegistrationServicer):  # type: ignore[misc]
    def __init__(self, driver: str, endpoint: str) -> None:
        self.driver = driver
        self.endpoint = endpoint
        self.registered = asyncio.Event()

    async def GetInfo(self, request: Any, context: Any) -> Any:
        return reg.PluginInfo(
            type="DRAPlugin", name=self.driver, endpoint=self.endpoint, supported_versions=SUPPORTED
        )

    async def NotifyRegistrationStatus(self, request: Any, context: Any) -> Any:
        if request.plugin_registered:
            logger.info("kubelet registered the %s plugin", self.driver)
            self.registered.set()
        else:
            logger.error("kubelet refused the %s plugin: %s", self.driver, request.error)
        return reg.RegistrationStatusResponse()


class KubeletPlugin:
    def __init__(
        self, kube: Kube, *, driver: str, kubelet_dir: Path, cdi_dir: Path, reporter: NodeReporter
    ) -> None:
        self.plugin_dir = kubelet_dir / "plugins" / driver
        self.dra_socket = self.plugin_dir / "dra.sock"
        self.reg_socket = kubelet_dir / "plugins_registry" / f"{driver}-reg.sock"
        self.preparer = Preparer(
            kube, driver=driver, reporter=reporter, plugin_dir=self.plugin_dir, cdi_dir=cdi_dir
        )
        self.registration = Registration(driver, str(self.dra_socket))
        self._servers: list[grpc.aio.Server] = []

    async def start(self) -> None:
        await asyncio.to_thread(self._prepare_dirs)
        dra = grpc.aio.server()
        v1_grpc.add_DRAPluginServicer_to_server(
            _servicer(v1, v1_grpc.DRAPluginServicer, self.preparer), dra
        )
        v1beta1_grpc.add_DRAPluginServicer_to_server(
            _servicer(v1beta1, v1beta1_grpc.DRAPluginServicer, self.preparer), dra
        )
        await self._serve(dra, self.dra_socket)  # the DRA service first, then announce it
        registration = grpc.aio.server()
        reg_grpc.add_RegistrationServicer_to_server(self.registration, registration)
        await self._serve(registration, self.reg_socket)

    def _prepare_dirs(self) -> None:
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        self.reg_socket.parent.mkdir(parents=True, exist_ok=True)
        self.preparer.cdi_dir.mkdir(parents=True, exist_ok=True)
        for socket in (self.dra_socket, self.reg_socket):
            socket.unlink(missing_ok=True)  # a stale socket of an earlier run
        self.preparer.clean_stale()

    async def _serve(self, server: grpc.aio.Server, socket: Path) -> None:
        if len(str(socket).encode()) > 107:  # sun_path is 108 bytes with its NUL
            raise errors.ConfigError(
                "--node-kubelet-dir",
                str(socket),
                "gives a socket path over 107 bytes; use a shorter directory",
            )
        old = os.umask(0o177)  # the socket is created 0600
        try:
            server.add_insecure_port(f"unix://{socket}")
            await server.start()
        finally:
            os.umask(old)
        os.chmod(socket, 0o600)
        self._servers.append(server)

    async def stop(self) -> None:
        for server in reversed(self._servers):
            await server.stop(grace=1.0)
        self._servers.clear()
        for socket in (self.reg_socket, self.dra_socket):
            socket.unlink(missing_ok=True)
