"""The worker's coordinator lease: ``RegisterWorker``, heartbeats and GPU-tier residency.

The protocol (register, heartbeat every third of the lease, register again when the
coordinator forgets us, full snapshot after every registration, changes buffered while
unregistered and flushed after) is :class:`diffmesh.coordinator_lease.CoordinatorLease`;
this module supplies the worker's RPCs and its residency in GPU-tier updates, and lets the
worker's load reports (:mod:`diffmesh_worker.load_reporter`) follow the same lease: they
learn of every registration and can declare the lease lapsed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from diffmesh.coordinator_lease import CoordinatorLease
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

DeviceSnapshot = Callable[[], list[tuple[str, int, float]]]
"""(component id, bytes, last use) of every device-resident component."""


class WorkerLeaseCalls:
    """The coordinator RPCs of one worker (a :class:`~diffmesh.coordinator_lease.LeaseCalls`)."""

    def __init__(
        self,
        stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub,
        info: coordinator_pb2.WorkerInfo,
        timeout_s: float,
        on_register: Callable[[], None] | None = None,
    ) -> None:
        self.stub = stub
        self.info = info
        self.timeout_s = timeout_s
        self.on_register = on_register

    async def register(self) -> float:
        """``RegisterWorker``; returns the granted lease (and tells ``on_register``)."""
        request = coordinator_pb2.RegisterWorkerRequest(worker=self.info)
        resp = await self.stub.RegisterWorker(request, timeout=self.timeout_s)
        if self.on_register is not None:
            self.on_register()
        return float(resp.lease_seconds)

    async def heartbeat(self) -> coordinator_pb2.HeartbeatResponse:
        """``Heartbeat`` of this worker."""
        request = coordinator_pb2.HeartbeatRequest(node_id=self.info.node_id, worker_id=self.info.worker_id)
        resp: coordinator_pb2.HeartbeatResponse = await self.stub.Heartbeat(request, timeout=self.timeout_s)
        return resp

    async def report(self, updates: Sequence[coordinator_pb2.ResidencyUpdate], full_snapshot: bool) -> None:
        """``ReportResidency`` of this worker."""
        request = coordinator_pb2.ReportResidencyRequest(
            node_id=self.info.node_id, worker_id=self.info.worker_id, updates=updates, full_snapshot=full_snapshot
        )
        await self.stub.ReportResidency(request, timeout=self.timeout_s)


def gpu_update(component_id: str, size: int, present: bool, last_used_unix: float) -> coordinator_pb2.ResidencyUpdate:
    """A GPU-tier residency update (the only tier a worker reports)."""
    return coordinator_pb2.ResidencyUpdate(
        component_id=component_id, tier=common_pb2.TIER_GPU, present=present, bytes=size, last_used_unix=last_used_unix
    )


class Registrar(CoordinatorLease):
    """Keeps this worker registered and its GPU-tier residency reported."""

    def __init__(
        self,
        stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub,
        info: coordinator_pb2.WorkerInfo,
        snapshot: DeviceSnapshot,
        timeout_s: float,
        on_register: Callable[[], None] | None = None,
    ) -> None:
        """``on_register`` is called after every successful ``RegisterWorker`` (before the snapshot is sent)."""
        super().__init__(
            WorkerLeaseCalls(stub, info, timeout_s, on_register),
            lambda: [gpu_update(cid, size, True, used) for cid, size, used in snapshot()],
            holder=f"worker {info.node_id}/{info.worker_id}",
            stop_flush_s=timeout_s,
        )
        self.info = info

    def report(self, present: bool, components: list[tuple[str, int]]) -> None:
        """Buffers residency changes (component id, bytes) of the GPU tier; sent in the background."""
        now = time.time()
        self.changed_all(gpu_update(cid, size, present, now) for cid, size in components)

    def lease_lapsed(self) -> None:
        """Another call was answered NOT_FOUND: the coordinator forgot this worker, so register again now."""
        self.registered.clear()
        self._wake_heartbeat.set()
