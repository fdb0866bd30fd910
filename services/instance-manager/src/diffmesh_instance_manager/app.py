"""The instance manager's gRPC service and its lifecycle."""

from __future__ import annotations

import asyncio
import logging

from diffmesh.v1 import coordinator_pb2, instance_manager_pb2, instance_manager_pb2_grpc
from grpc import aio

from diffmesh_instance_manager.host import SegmentAllocator, remove_stale_segments
from diffmesh_instance_manager.remote import RemoteAccess
from diffmesh_instance_manager.reporter import CatalogClient, CoordinatorReporter, open_coordinator
from diffmesh_instance_manager.settings import InstanceManagerSettings
from diffmesh_instance_manager.ssd import SsdCache
from diffmesh_instance_manager.store import ComponentStore

log = logging.getLogger("diffmesh.im")

SERVICE_NAME = "diffmesh.v1.InstanceManagerService"


class InstanceManagerServicer(instance_manager_pb2_grpc.InstanceManagerServiceServicer):
    """RPC handlers; errors are raised as diffmesh exceptions and mapped by the interceptor."""

    def __init__(self, app: InstanceManagerApp) -> None:
        self.app = app

    async def Acquire(
        self, request: instance_manager_pb2.AcquireRequest, context: aio.ServicerContext
    ) -> instance_manager_pb2.AcquireResponse:
        handles, lease_id = await self.app.store.acquire(list(request.component_ids), request.holder)
        return instance_manager_pb2.AcquireResponse(handles=handles, lease_id=lease_id)

    async def Release(
        self, request: instance_manager_pb2.ReleaseRequest, context: aio.ServicerContext
    ) -> instance_manager_pb2.ReleaseResponse:
        return instance_manager_pb2.ReleaseResponse(released=self.app.store.release(request.lease_id))

    async def Prefetch(
        self, request: instance_manager_pb2.PrefetchRequest, context: aio.ServicerContext
    ) -> instance_manager_pb2.PrefetchResponse:
        accepted = await self.app.store.prefetch(list(request.component_ids), request.target_tier)
        return instance_manager_pb2.PrefetchResponse(accepted_ids=accepted)

    async def Stats(
        self, request: instance_manager_pb2.StatsRequest, context: aio.ServicerContext
    ) -> instance_manager_pb2.StatsResponse:
        return self.app.store.stats(self.app.settings.node_id)


class InstanceManagerApp:
    """One node's instance manager: SSD cache, shared-memory HOST tier, coordinator reporting."""

    name = "instance-manager"

    def __init__(self, settings: InstanceManagerSettings) -> None:
        self.settings = settings
        self.allocator = SegmentAllocator(settings.node_id)
        self._channel: aio.Channel | None = None
        self.catalog: CatalogClient | None = None
        self.reporter: CoordinatorReporter | None = None
        self.store: ComponentStore = self._build_store()

    def _build_store(self) -> ComponentStore:
        s = self.settings
        return ComponentStore(
            ssd=SsdCache(s.ssd_path()),
            ssd_capacity=s.ssd_capacity_bytes,
            host_capacity=s.host_capacity_bytes,
            allocator=self.allocator,
            remote=RemoteAccess(s.allowed_roots),
            lookup=self._lookup if s.coordinator else None,
            config_cap=s.config_max_bytes,
            retry_after_s=s.retry_after_seconds,
        )

    async def _lookup(self, component_id: str) -> coordinator_pb2.common__pb2.Component:  # type: ignore[name-defined]
        assert self.catalog is not None
        return await self.catalog.get(component_id)

    def add_to_server(self, server: aio.Server) -> list[str]:
        """Adds the InstanceManagerService."""
        instance_manager_pb2_grpc.add_InstanceManagerServiceServicer_to_server(InstanceManagerServicer(self), server)
        return [SERVICE_NAME]

    async def start(self, port: int) -> None:
        """Cleans up after a crash, opens the SSD tier and starts reporting to the coordinator."""
        s = self.settings
        stale = await asyncio.to_thread(remove_stale_segments, s.node_id)
        if stale:
            log.warning("removed stale shared-memory segments", extra={"count": len(stale), "node_id": s.node_id})
        await self.store.open()
        if not s.allowed_roots:
            log.warning("DIFFMESH_IM_ALLOWED_ROOTS is empty: every artifact URI will be refused")
        if not s.coordinator:
            log.warning("no coordinator configured: Acquire and Prefetch answer FAILED_PRECONDITION")
            return
        self._channel, stub = open_coordinator(s.coordinator)
        self.catalog = CatalogClient(stub)
        node = coordinator_pb2.NodeInfo(
            node_id=s.node_id,
            instance_manager_address=f"{s.advertise_host}:{port}",
            host_capacity_bytes=s.host_capacity_bytes,
            ssd_capacity_bytes=s.ssd_capacity_bytes,
        )
        self.reporter = CoordinatorReporter(stub, node, self.store.snapshot)
        self.store.listeners.append(self.reporter.changed)
        self.reporter.start()

    async def stop(self) -> None:
        """Stops reporting and unlinks every shared-memory segment this process created."""
        if self.reporter is not None:
            await self.reporter.stop()
        await self.store.close()
        if self._channel is not None:
            await self._channel.close()
