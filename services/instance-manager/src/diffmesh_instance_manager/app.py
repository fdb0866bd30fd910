"""The instance manager's gRPC service and its lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from diffmesh.errors import InvalidArgument
from diffmesh.plan_follower import PlanFollower
from diffmesh.policy_mode import PolicyMode, policy_mode
from diffmesh.tiers import Tier
from diffmesh.v1 import common_pb2, coordinator_pb2, instance_manager_pb2, instance_manager_pb2_grpc
from grpc import aio

from diffmesh_instance_manager.artifact_stream import artifact_chunks
from diffmesh_instance_manager.direct_io import DirectLoader
from diffmesh_instance_manager.fetchers import remote_fetcher
from diffmesh_instance_manager.host import SegmentAllocator, remove_stale_segments
from diffmesh_instance_manager.node_lock import NodeLock
from diffmesh_instance_manager.overlay_fuser import OverlayFuser
from diffmesh_instance_manager.peer_fetch import PeerCopies
from diffmesh_instance_manager.plan_executor import PlanExecutor
from diffmesh_instance_manager.pool import HostPool, remove_stale_pools
from diffmesh_instance_manager.remote_access import RemoteAccess
from diffmesh_instance_manager.reporter import CatalogClient, CoordinatorReporter, open_coordinator
from diffmesh_instance_manager.settings import InstanceManagerSettings
from diffmesh_instance_manager.size_classes import BLOCK_GRANULARITY, SizeClass, request_share_weights, size_classes
from diffmesh_instance_manager.ssd import SsdCache
from diffmesh_instance_manager.stats import stats_response
from diffmesh_instance_manager.store import ComponentStore

log = logging.getLogger(__name__)

SERVICE_NAME = "diffmesh.v1.InstanceManagerService"


class InstanceManagerServicer(instance_manager_pb2_grpc.InstanceManagerServiceServicer):
    """RPC handlers; errors are raised as diffmesh exceptions and mapped by the interceptor."""

    def __init__(self, app: InstanceManagerApp) -> None:
        self.app = app

    async def Acquire(
        self, request: instance_manager_pb2.AcquireRequest, context: aio.ServicerContext
    ) -> instance_manager_pb2.AcquireResponse:
        handles, lease_id = await self.app.store.acquire(list(request.component_ids), request.holder)
        ttl = self.app.store.leases.ttl_s
        return instance_manager_pb2.AcquireResponse(handles=handles, lease_id=lease_id, lease_ttl_seconds=ttl)

    async def Release(
        self, request: instance_manager_pb2.ReleaseRequest, context: aio.ServicerContext
    ) -> instance_manager_pb2.ReleaseResponse:
        return instance_manager_pb2.ReleaseResponse(released=self.app.store.release(request.lease_id))

    async def Prefetch(
        self, request: instance_manager_pb2.PrefetchRequest, context: aio.ServicerContext
    ) -> instance_manager_pb2.PrefetchResponse:
        accepted = await self.app.store.prefetch(list(request.component_ids), _target_tier(request.target_tier))
        return instance_manager_pb2.PrefetchResponse(accepted_ids=accepted)

    async def Stats(
        self, request: instance_manager_pb2.StatsRequest, context: aio.ServicerContext
    ) -> instance_manager_pb2.StatsResponse:
        return stats_response(self.app.store, self.app.settings.node_id)

    async def Fuse(
        self, request: instance_manager_pb2.FuseRequest, context: aio.ServicerContext
    ) -> instance_manager_pb2.FuseResponse:
        # LoraRef.scale is a float32 on the wire: 0.8 arrives as 0.800000011920929; 6 decimals give back the value sent.
        loras = [(ref.id, round(float(ref.scale), 6)) for ref in request.loras]
        rec, handle, lease_id, created = await self.app.fuser.fuse(request.base_id, loras, request.fused_id, request.holder)
        return instance_manager_pb2.FuseResponse(component=rec, handle=handle, lease_id=lease_id, created=created)

    async def ReadArtifact(
        self, request: instance_manager_pb2.ReadArtifactRequest, context: aio.ServicerContext
    ) -> AsyncIterator[instance_manager_pb2.ReadArtifactResponse]:
        if not request.component_id:
            raise InvalidArgument("component_id", "required")
        async for chunk in artifact_chunks(self.app.store.ssd, request.component_id):
            yield chunk


def _target_tier(value: int) -> Tier:
    """The wire ``target_tier`` as a :class:`Tier` (INVALID_ARGUMENT for a value the enum does not have)."""
    try:
        return Tier(value)
    except ValueError:
        raise InvalidArgument("target_tier", f"must be TIER_SSD or TIER_HOST, got {value}") from None


class InstanceManagerApp:
    """One node's instance manager: SSD cache, shared-memory HOST tier, coordinator reporting, the plan.

    The policy mode (``DIFFMESH_POLICY``) is read once, here: under ``lru`` the tiers evict
    least recently used, no plan is followed and no peer copies are fetched.
    """

    name = "instance-manager"

    def __init__(self, settings: InstanceManagerSettings) -> None:
        self.settings = settings
        self.mode = policy_mode()
        self.allocator = SegmentAllocator(settings.node_id)
        self.pool: HostPool | None = None
        self._channel: aio.Channel | None = None
        self.catalog: CatalogClient | None = None
        self.reporter: CoordinatorReporter | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._node_lock: NodeLock | None = None
        self.follower: PlanFollower | None = None
        self.peer_copies: PeerCopies | None = None
        self.store: ComponentStore = self._build_store()
        self.fuser = OverlayFuser(self.store, register=self._register if settings.coordinator else None)
        self.store.deriver = self.fuser
        self.executor = PlanExecutor(
            self.store, self.fuser, settings.node_id, settings.pinned_components, lru=self.mode is PolicyMode.LRU
        )

    def _build_store(self) -> ComponentStore:
        s = self.settings
        return ComponentStore(
            ssd=SsdCache(s.ssd_path()),
            ssd_capacity=s.ssd_capacity_bytes,
            host_capacity=s.host_capacity_bytes,
            allocator=self.allocator,
            remote=RemoteAccess(s.allowed_roots),
            fetcher=remote_fetcher(s3=s.s3_options(), in_flight=s.remote_ranges_in_flight),
            lookup=self._lookup if s.coordinator else None,
            config_cap=s.config_max_bytes,
            retry_after_s=s.retry_after_seconds,
            pinned=set(s.pinned_components),
            lease_ttl_s=s.lease_ttl_seconds,
            lru=self.mode is PolicyMode.LRU,
        )

    async def _lookup(self, component_id: str) -> common_pb2.Component:
        assert self.catalog is not None
        return await self.catalog.get(component_id)

    async def _register(self, component: common_pb2.Component) -> common_pb2.Component:
        assert self.catalog is not None
        return await self.catalog.register(component)

    async def _pool_classes(self) -> list[SizeClass]:
        """Size classes from the catalog's component sizes, weighted by each component's share of recorded requests."""
        s = self.settings
        sizes: list[int] = []
        requests: list[float] = []
        if self.catalog is not None:
            try:
                components = [c for c in await self.catalog.list_all() if c.bytes > 0]
                sizes = [c.bytes for c in components]
            except aio.AioRpcError as exc:
                log.warning("catalog unavailable for HOST size classes", extra={"code": exc.code().name})
            if sizes:
                try:
                    counts = await self.catalog.component_requests()
                    requests = [counts.get(c.id, 0.0) for c in components]
                except aio.AioRpcError as exc:
                    log.warning("request counts unavailable: equal size-class weights", extra={"code": exc.code().name})
        if not sizes:
            # No catalog: one class of a quarter of the pool (at least one 2 MiB block).
            quarter = s.host_capacity_bytes // 4 // BLOCK_GRANULARITY * BLOCK_GRANULARITY
            return [SizeClass(max(BLOCK_GRANULARITY, quarter), 1.0, 0, 0.0)]
        weights = request_share_weights(requests) if requests else None
        log.info(
            "HOST size classes from the catalog",
            extra={"components": len(sizes), "requests": int(sum(requests)), "weights": "request share" if weights else "equal"},
        )
        return size_classes(sizes, weights, k=s.pool_classes)

    async def _start_pool(self) -> None:
        s = self.settings
        stale = await asyncio.to_thread(remove_stale_pools, s.node_id)
        if stale:
            log.warning("removed stale HOST pools", extra={"count": len(stale), "node_id": s.node_id})
        classes = await self._pool_classes()
        # cudaHostRegister only where a CUDA driver exists (importing torch costs seconds otherwise).
        pin = None if Path("/dev/nvidiactl").exists() else False
        self.pool = await asyncio.to_thread(
            lambda: HostPool(s.node_id, s.host_capacity_bytes, classes, prefault=s.pool_prefault, pin=pin)
        )
        self.store.use_pool(self.pool, DirectLoader(direct=None if s.direct_io else False))
        stats = self.pool.stats()
        log.info(
            "HOST pool ready",
            extra={
                "segment": stats.segment,
                "bytes": stats.capacity_bytes,
                "classes": ",".join(f"{c.blocks}x{c.block_size}" for c in stats.classes),
                "pinned": stats.pinned,
            },
        )

    async def _sweep_leases(self) -> None:
        """Ends the leases of holders that are gone (see ``leases``)."""
        s = self.settings
        interval = min(10.0, max(0.05, s.lease_ttl_seconds / 3))
        while True:
            await asyncio.sleep(interval)
            live: set[str] | None = set()
            if self.catalog is not None:
                try:
                    live = await self.catalog.live_workers(s.node_id)
                except aio.AioRpcError as exc:
                    # The coordinator cannot tell who is alive: expire nobody rather than a live worker.
                    log.warning("lease sweep skipped: coordinator unavailable", extra={"code": exc.code().name})
                    live = None
            if live is not None:
                self.store.expire_leases(time.time(), live)

    def add_to_server(self, server: aio.Server) -> list[str]:
        """Adds the InstanceManagerService."""
        instance_manager_pb2_grpc.add_InstanceManagerServiceServicer_to_server(InstanceManagerServicer(self), server)
        return [SERVICE_NAME]

    async def start(self, port: int) -> None:
        """Cleans up after a crash, opens the SSD tier and starts reporting to the coordinator."""
        # Only after taking the node lock is every dm_<node_id>_* segment surely a crash leftover.
        self._node_lock = NodeLock(self.settings.node_id)
        try:
            await self._start_locked(port)
        except BaseException:
            self._node_lock.release()
            self._node_lock = None
            raise

    async def _start_locked(self, port: int) -> None:
        s = self.settings
        stale = await asyncio.to_thread(remove_stale_segments, s.node_id)
        if stale:
            log.warning("removed stale shared-memory segments", extra={"count": len(stale), "node_id": s.node_id})
        await self.store.open()
        if not s.allowed_roots:
            log.warning("DIFFMESH_IM_ALLOWED_ROOTS is empty: every artifact URI will be refused")
        stub = None
        if s.coordinator:
            self._channel, stub = open_coordinator(s.coordinator)
            self.catalog = CatalogClient(stub)
        if s.host_capacity_bytes > 0:
            await self._start_pool()
        if s.lease_ttl_seconds > 0:
            self._sweeper = asyncio.create_task(self._sweep_leases())
        if stub is None:
            log.warning("no coordinator configured: Acquire, Prefetch and Fuse answer FAILED_PRECONDITION")
            return
        node = coordinator_pb2.NodeInfo(
            node_id=s.node_id,
            instance_manager_address=f"{s.advertise_host}:{port}",
            host_capacity_bytes=s.host_capacity_bytes,
            ssd_capacity_bytes=s.ssd_capacity_bytes,
        )
        self.reporter = CoordinatorReporter(stub, node, self.store.snapshot)
        self.store.listeners.append(self.reporter.changed)
        self.reporter.start()
        if self.mode is PolicyMode.LRU:
            log.info("DIFFMESH_POLICY=lru: LRU eviction, no plan, no peer copies")
            return
        if s.peer_fetch:
            self.peer_copies = PeerCopies(stub, s.node_id)
            self.store.peers = self.peer_copies
        self.follower = PlanFollower(s.coordinator, self.executor.on_plan, reconnect_s=s.plan_reconnect_seconds)
        self.follower.start()

    async def stop(self) -> None:
        """Stops following the plan and reporting, and unlinks every shared-memory segment (and the HOST pool)
        this process created."""
        if self.follower is not None:
            await self.follower.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self.reporter is not None:
            await self.reporter.stop()
        # Frees every block, then closes the allocator: the pool last, after every load (and view) has finished.
        await self.fuser.close()
        await self.store.close()
        if self.peer_copies is not None:
            await self.peer_copies.close()
        if self._channel is not None:
            await self._channel.close()
        if self._node_lock is not None:
            self._node_lock.release()
            self._node_lock = None
