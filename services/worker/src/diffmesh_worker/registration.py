"""Registration with the coordinator: worker lease, heartbeats and GPU-tier residency reports.

The worker registers at start and heartbeats every third of its lease. When the
coordinator says the lease had lapsed (``reregister``) — or a call failed, so it may have —
the worker registers again and re-reports its whole device tier as a full snapshot.
Residency changes are sent in order by one background task, off the request path; a
failed report is retried after the next successful heartbeat as a full snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from grpc import aio

log = logging.getLogger("diffmesh_worker.registration")

# (component id, bytes, last use) of every device-resident component.
Snapshot = Callable[[], list[tuple[str, int, float]]]


class Registrar:
    """Keeps this worker registered and its GPU-tier residency reported."""

    def __init__(
        self,
        stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub,
        info: coordinator_pb2.WorkerInfo,
        snapshot: Snapshot,
        timeout_s: float,
    ) -> None:
        self.stub = stub
        self.info = info
        self.snapshot = snapshot
        self.timeout_s = timeout_s
        self.lease_seconds = 15.0
        self.registered = asyncio.Event()
        self._updates: asyncio.Queue[list[coordinator_pb2.ResidencyUpdate] | None] = asyncio.Queue()
        self._need_snapshot = True
        self._live = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Starts the heartbeat and report loops."""
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="worker-heartbeat"),
            asyncio.create_task(self._report_loop(), name="worker-residency"),
        ]

    async def stop(self) -> None:
        """Flushes queued reports (briefly), then stops both loops."""
        self._updates.put_nowait(None)
        if len(self._tasks) > 1:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._tasks[1]), timeout=self.timeout_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def report(self, present: bool, components: list[tuple[str, int]]) -> None:
        """Queues residency changes (component id, bytes) of the GPU tier."""
        if not components:
            return
        now = time.time()
        updates = [
            coordinator_pb2.ResidencyUpdate(
                component_id=cid, tier=common_pb2.TIER_GPU, present=present, bytes=size, last_used_unix=now
            )
            for cid, size in components
        ]
        self._updates.put_nowait(updates)

    async def _register(self) -> None:
        resp = await self.stub.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(worker=self.info), timeout=self.timeout_s)
        if resp.lease_seconds > 0:
            self.lease_seconds = resp.lease_seconds
        self._need_snapshot = True
        self.registered.set()
        log.info("registered", extra={"worker_id": self.info.worker_id, "lease_s": self.lease_seconds})

    async def _send_snapshot(self) -> None:
        updates = [
            coordinator_pb2.ResidencyUpdate(
                component_id=cid, tier=common_pb2.TIER_GPU, present=True, bytes=size, last_used_unix=used
            )
            for cid, size, used in self.snapshot()
        ]
        await self.stub.ReportResidency(
            coordinator_pb2.ReportResidencyRequest(
                node_id=self.info.node_id, worker_id=self.info.worker_id, updates=updates, full_snapshot=True
            ),
            timeout=self.timeout_s,
        )
        self._need_snapshot = False

    async def beat(self) -> None:
        """One heartbeat: registers when not (or no longer) registered, then re-reports if needed."""
        if not self._live:
            await self._register()
            self._live = True
        else:
            resp = await self.stub.Heartbeat(
                coordinator_pb2.HeartbeatRequest(node_id=self.info.node_id, worker_id=self.info.worker_id),
                timeout=self.timeout_s,
            )
            if resp.lease_seconds > 0:
                self.lease_seconds = resp.lease_seconds
            if resp.reregister:
                log.info("lease lapsed; registering again", extra={"worker_id": self.info.worker_id})
                await self._register()
        if self._need_snapshot:
            await self._send_snapshot()

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self.beat()
                delay = self.lease_seconds / 3
            except aio.AioRpcError as exc:
                log.warning("coordinator call failed", extra={"code": exc.code().name, "detail": exc.details()})
                self._live = False  # the lease may have lapsed meanwhile: register again
                delay = min(2.0, self.lease_seconds / 3)
            await asyncio.sleep(delay)

    async def _report_loop(self) -> None:
        while True:
            updates = await self._updates.get()
            if updates is None:
                return
            if not self.registered.is_set():
                continue  # the snapshot sent after registering covers it
            try:
                await self.stub.ReportResidency(
                    coordinator_pb2.ReportResidencyRequest(
                        node_id=self.info.node_id, worker_id=self.info.worker_id, updates=updates
                    ),
                    timeout=self.timeout_s,
                )
            except aio.AioRpcError as exc:
                log.warning("residency report failed", extra={"code": exc.code().name, "detail": exc.details()})
                self._need_snapshot = True
