"""Cold-start placement, and the router's in-flight counts.

Placement normally comes from the replica of the view (:mod:`.view_placer`). Until the
first view snapshot arrived — or while the view lists no live worker — the router asks
the coordinator instead: live workers from ``ListNodes`` (reused for
``nodes_refresh_seconds``), where the pipeline's components are from ``Locate``, and
ranks with :func:`diffmesh.policy.locality.rank_workers` and its own in-flight counts.
Both calls are counted (``list_nodes_calls``, ``locate_calls`` of ``GetRouterStats``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

from diffmesh.errors import Unavailable
from diffmesh.policy.locality import Copy, RankedWorker, WorkerCandidate, rank_workers
from diffmesh.tiers import Tier
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from diffmesh.view import WorkerKey
from grpc import aio

from diffmesh_router.stats import RouterStats
from diffmesh_router.view_placer import NO_WORKER, Target

log = logging.getLogger(__name__)

PlacementPolicy = Callable[[Mapping[str, int], Iterable[WorkerCandidate], Iterable[Copy]], list[RankedWorker]]
"""Ranks candidate workers best first, given component bytes and the residencies."""


class WorkerDirectory:
    """Live workers from the coordinator's ``ListNodes``, reused for ``refresh_seconds``."""

    def __init__(
        self,
        stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub,
        refresh_seconds: float,
        timeout_seconds: float,
        stats: RouterStats | None = None,
    ) -> None:
        self._stub = stub
        self._refresh = refresh_seconds
        self._timeout = timeout_seconds
        self._stats = stats or RouterStats()
        self._workers: list[coordinator_pb2.WorkerInfo] = []
        self._fetched_at = -float("inf")
        self._lock = asyncio.Lock()

    def invalidate(self) -> None:
        """Forces the next :meth:`workers` call to ask the coordinator again."""
        self._fetched_at = -float("inf")

    async def workers(self) -> list[coordinator_pb2.WorkerInfo]:
        """Live workers; refreshed when stale, or when none is known."""
        if time.monotonic() - self._fetched_at < self._refresh and self._workers:
            return self._workers
        async with self._lock:
            if time.monotonic() - self._fetched_at < self._refresh and self._workers:
                return self._workers
            self._stats.list_nodes_calls += 1
            try:
                resp = await self._stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=self._timeout)
            except aio.AioRpcError as err:
                if self._workers:
                    log.warning("ListNodes failed; using the last worker list", extra={"code": err.code().name})
                    return self._workers
                raise Unavailable(f"cannot list workers: coordinator unreachable ({err.code().name})") from None
            workers: list[coordinator_pb2.WorkerInfo] = []
            for node in resp.nodes:
                for worker in node.workers:
                    info = coordinator_pb2.WorkerInfo()
                    info.CopyFrom(worker)
                    if not info.node_id:
                        info.node_id = node.node_id
                    workers.append(info)
            self._workers = workers
            self._fetched_at = time.monotonic()
            return workers


class InFlight:
    """Requests this router has sent to each worker and not yet seen finish."""

    def __init__(self) -> None:
        self._counts: dict[WorkerKey, int] = {}
        self._listeners: list[Callable[[WorkerKey, int], None]] = []

    def count(self, key: WorkerKey) -> int:
        """In-flight requests on ``key``."""
        return self._counts.get(key, 0)

    def counts(self) -> dict[WorkerKey, int]:
        """Workers with requests in flight and how many."""
        return dict(self._counts)

    def add_listener(self, listener: Callable[[WorkerKey, int], None]) -> None:
        """Calls ``listener(key, +1 | -1)`` whenever a count changes."""
        self._listeners.append(listener)

    @contextmanager
    def track(self, key: WorkerKey) -> Iterator[None]:
        """Counts one request on ``key`` for the duration of the block."""
        self._counts[key] = self._counts.get(key, 0) + 1
        self._tell(key, 1)
        try:
            yield
        finally:
            left = self._counts[key] - 1
            if left:
                self._counts[key] = left
            else:
                del self._counts[key]
            self._tell(key, -1)

    def _tell(self, key: WorkerKey, delta: int) -> None:
        for listener in self._listeners:
            listener(key, delta)


def copies_from_locations(locations: Iterable[coordinator_pb2.ComponentLocation]) -> list[Copy]:
    """Residencies from ``Locate`` as policy copies."""
    copies = []
    for loc in locations:
        for res in loc.residencies:
            # The gRPC edge: an enum value this build does not know counts as no tier.
            tier = Tier(res.tier) if res.tier in Tier._value2member_map_ else Tier.UNSPECIFIED
            copies.append(Copy(loc.component_id, res.node_id, tier, res.worker_id))
    return copies


class Placer:
    """Ranks the live workers for a pipeline with a :data:`PlacementPolicy` (cold start only)."""

    def __init__(
        self,
        directory: WorkerDirectory,
        stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub,
        in_flight: InFlight,
        timeout_seconds: float,
        stats: RouterStats,
        policy: PlacementPolicy = rank_workers,
    ) -> None:
        self.directory = directory
        self.in_flight = in_flight
        self._stub = stub
        self._timeout = timeout_seconds
        self._stats = stats
        self.policy = policy

    async def locate(self, ids: list[str]) -> list[coordinator_pb2.ComponentLocation]:
        """Locate's answer for ``ids``; empty (placement by queue only) when the coordinator fails."""
        self._stats.locate_calls += 1
        try:
            resp = await self._stub.Locate(coordinator_pb2.LocateRequest(component_ids=ids), timeout=self._timeout)
        except aio.AioRpcError as err:
            log.warning("Locate failed; placing without residency", extra={"code": err.code().name})
            return []
        return list(resp.locations)

    async def rank(self, records: Mapping[str, common_pb2.Component]) -> list[Target]:
        """Live workers best first for the pipeline made of ``records``; Unavailable when none is live."""
        workers = await self.directory.workers()
        if not workers:
            raise Unavailable(NO_WORKER)
        by_key = {(w.node_id, w.worker_id): w for w in workers}
        candidates = [WorkerCandidate(w.worker_id, w.node_id, self.in_flight.count(key)) for key, w in by_key.items()]
        locations = await self.locate(list(records))
        ranked = self.policy({cid: rec.bytes for cid, rec in records.items()}, candidates, copies_from_locations(locations))
        return [
            Target(r.candidate.node_id, r.candidate.worker_id, by_key[(r.candidate.node_id, r.candidate.worker_id)].address)
            for r in ranked
        ]
