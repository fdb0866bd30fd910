"""The instance manager's link to the coordinator: catalog lookups, node lease, residency.

* :class:`CatalogClient` reads catalog records (``GetComponent``); records are immutable
  once registered, so found records are cached.
* :class:`CoordinatorReporter` holds the node's coordinator lease and reports every
  SSD/HOST change: the shared protocol of
  :class:`diffmesh.coordinator_lease.CoordinatorLease` (register, heartbeat every third of
  the lease, register again with a full snapshot when the coordinator forgets the node,
  changes buffered while unregistered and flushed after) over the node's RPCs
  (:class:`NodeLeaseCalls`). Reporting runs in the background and never fails a client call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from diffmesh.channels import open_channel
from diffmesh.coordinator_lease import CoordinatorLease
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from grpc import aio

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


class NodeLeaseCalls:
    """The coordinator RPCs of one node (a :class:`~diffmesh.coordinator_lease.LeaseCalls`)."""

    def __init__(self, stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub, node: coordinator_pb2.NodeInfo) -> None:
        self.stub = stub
        self.node = node

    async def register(self) -> float:
        """``RegisterNode``; returns the granted lease."""
        resp = await self.stub.RegisterNode(coordinator_pb2.RegisterNodeRequest(node=self.node), timeout=RPC_TIMEOUT_S)
        return float(resp.lease_seconds)

    async def heartbeat(self) -> coordinator_pb2.HeartbeatResponse:
        """``Heartbeat`` of this node."""
        request = coordinator_pb2.HeartbeatRequest(node_id=self.node.node_id)
        resp: coordinator_pb2.HeartbeatResponse = await self.stub.Heartbeat(request, timeout=RPC_TIMEOUT_S)
        return resp

    async def report(self, updates: Sequence[coordinator_pb2.ResidencyUpdate], full_snapshot: bool) -> None:
        """``ReportResidency`` of this node (its SSD and HOST copies)."""
        request = coordinator_pb2.ReportResidencyRequest(
            node_id=self.node.node_id, updates=updates, full_snapshot=full_snapshot
        )
        await self.stub.ReportResidency(request, timeout=RPC_TIMEOUT_S)


class CoordinatorReporter(CoordinatorLease):
    """The node's coordinator lease and its SSD/HOST residency reports (all in background tasks)."""

    def __init__(
        self,
        stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub,
        node: coordinator_pb2.NodeInfo,
        snapshot: Callable[[], list[coordinator_pb2.ResidencyUpdate]],
        retry_seconds: float = 1.0,
    ) -> None:
        super().__init__(NodeLeaseCalls(stub, node), snapshot, holder=f"node {node.node_id}", retry_s=retry_seconds)
        self.node = node


def open_coordinator(address: str) -> tuple[aio.Channel, coordinator_pb2_grpc.CacheCoordinatorServiceStub]:
    """A traced channel and stub to the coordinator."""
    channel = open_channel(address)
    return channel, coordinator_pb2_grpc.CacheCoordinatorServiceStub(channel)
