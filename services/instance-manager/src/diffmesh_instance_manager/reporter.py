"""The instance manager's link to the coordinator: catalog lookups, node lease, residency.

* :class:`CatalogClient` reads catalog records (``GetComponent``); records are immutable
  once registered, so found records are cached.
* :class:`CoordinatorReporter` registers the node at start, heartbeats every third of
  the lease, re-registers and sends a ``full_snapshot`` when told ``reregister`` (or after
  the coordinator was unreachable), and sends every SSD/HOST change as a
  ``ReportResidency`` update. Reporting runs in the background and never fails a client
  call: a lost update is repaired by the next full snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from diffmesh.channels import open_channel
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from grpc import aio

log = logging.getLogger("diffmesh.im.reporter")

RPC_TIMEOUT_S = 10.0


class CatalogClient:
    """Catalog lookups through the coordinator."""

    def __init__(self, stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub) -> None:
        self._stub = stub
        self._cache: dict[str, common_pb2.Component] = {}

    async def get(self, component_id: str) -> common_pb2.Component:
        """The record of ``component_id``; the coordinator's NOT_FOUND propagates unchanged."""
        cached = self._cache.get(component_id)
        if cached is not None:
            return cached
        resp = await self._stub.GetComponent(coordinator_pb2.GetComponentRequest(id=component_id), timeout=RPC_TIMEOUT_S)
        self._cache[component_id] = resp.component
        return resp.component

    async def register(self, component: common_pb2.Component) -> common_pb2.Component:
        """Registers a (derived) component; the coordinator's errors propagate unchanged."""
        resp = await self._stub.RegisterComponent(
            coordinator_pb2.RegisterComponentRequest(component=component), timeout=RPC_TIMEOUT_S
        )
        self._cache[resp.component.id] = resp.component
        return resp.component

    async def list_all(self, max_pages: int = 100) -> list[common_pb2.Component]:
        """Every catalog record (paged ListComponents)."""
        out: list[common_pb2.Component] = []
        token = ""
        for _ in range(max_pages):
            resp = await self._stub.ListComponents(
                coordinator_pb2.ListComponentsRequest(page_size=1000, page_token=token), timeout=RPC_TIMEOUT_S
            )
            out += resp.components
            token = resp.next_page_token
            if not token:
                break
        return out

    async def component_requests(self) -> dict[str, float]:
        """Recorded requests per component (the coordinator's popularity counts)."""
        resp = await self._stub.GetComponentPopularity(
            coordinator_pb2.GetComponentPopularityRequest(limit=100_000), timeout=RPC_TIMEOUT_S
        )
        return {c.component_id: c.requests for c in resp.components}

    async def live_workers(self, node_id: str) -> set[str]:
        """Ids of this node's workers whose coordinator lease is current."""
        resp = await self._stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=RPC_TIMEOUT_S)
        return {w.worker_id for n in resp.nodes if n.node_id == node_id for w in n.workers}


class CoordinatorReporter:
    """Node registration, heartbeats and residency reports (all in background tasks)."""

    def __init__(
        self,
        stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub,
        node: coordinator_pb2.NodeInfo,
        snapshot: Callable[[], list[coordinator_pb2.ResidencyUpdate]],
        retry_seconds: float = 1.0,
    ) -> None:
        self._stub = stub
        self.node = node
        self._snapshot = snapshot
        self._retry_seconds = retry_seconds
        self.lease_seconds = 15.0
        self.registered = False
        self._pending: list[coordinator_pb2.ResidencyUpdate] = []
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    def start(self) -> None:
        """Starts the heartbeat and the sender tasks."""
        self._tasks = [asyncio.create_task(self._heartbeat_loop()), asyncio.create_task(self._send_loop())]

    async def stop(self) -> None:
        """Stops the background tasks (pending updates are dropped: the lease expires anyway)."""
        self._stopping.set()
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def changed(self, update: coordinator_pb2.ResidencyUpdate) -> None:
        """Queues one residency change."""
        self._pending.append(update)
        self._wake.set()

    async def flush(self, timeout: float = 10.0) -> bool:
        """Waits until registered and every queued change is sent; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.registered and not self._pending and not self._send_lock.locked():
                return True
            await asyncio.sleep(0.02)
        return False

    async def _register(self) -> None:
        resp = await self._stub.RegisterNode(coordinator_pb2.RegisterNodeRequest(node=self.node), timeout=RPC_TIMEOUT_S)
        if resp.lease_seconds > 0:
            self.lease_seconds = resp.lease_seconds
        async with self._send_lock:
            # The snapshot supersedes queued changes; later changes queue behind it.
            self._pending.clear()
            updates = self._snapshot()
            await self._stub.ReportResidency(
                coordinator_pb2.ReportResidencyRequest(node_id=self.node.node_id, updates=updates, full_snapshot=True),
                timeout=RPC_TIMEOUT_S,
            )
        self.registered = True
        log.info("registered with coordinator", extra={"node_id": self.node.node_id, "lease_s": self.lease_seconds})

    async def _heartbeat_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if not self.registered:
                    await self._register()
                else:
                    resp = await self._stub.Heartbeat(
                        coordinator_pb2.HeartbeatRequest(node_id=self.node.node_id), timeout=RPC_TIMEOUT_S
                    )
                    if resp.lease_seconds > 0:
                        self.lease_seconds = resp.lease_seconds
                    if resp.reregister:
                        log.info("coordinator asked to re-register", extra={"node_id": self.node.node_id})
                        self.registered = False
                        continue
                wait = self.lease_seconds / 3
            except aio.AioRpcError as exc:
                log.warning("coordinator call failed", extra={"code": exc.code().name, "detail": exc.details()})
                self.registered = False
                wait = self._retry_seconds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)

    async def _send_loop(self) -> None:
        while not self._stopping.is_set():
            await self._wake.wait()
            self._wake.clear()
            if not self.registered or not self._pending:
                continue
            async with self._send_lock:
                batch, self._pending = self._pending, []
                try:
                    await self._stub.ReportResidency(
                        coordinator_pb2.ReportResidencyRequest(node_id=self.node.node_id, updates=batch), timeout=RPC_TIMEOUT_S
                    )
                except aio.AioRpcError as exc:
                    # Re-registration sends a full snapshot, which repairs whatever was lost.
                    log.warning("residency report failed", extra={"code": exc.code().name, "detail": exc.details()})
                    self.registered = False


def open_coordinator(address: str) -> tuple[aio.Channel, coordinator_pb2_grpc.CacheCoordinatorServiceStub]:
    """A traced channel and stub to the coordinator."""
    channel = open_channel(address)
    return channel, coordinator_pb2_grpc.CacheCoordinatorServiceStub(channel)
