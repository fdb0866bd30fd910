"""gRPC handlers of CacheCoordinatorService: validate the request, call the store.

Every bad input raises :class:`~diffmesh.errors.InvalidArgument` naming the field (the
shared interceptor maps it to INVALID_ARGUMENT); unknown ids raise NotFound naming them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator

from diffmesh.catalog import check_id, kind_name, validate_component
from diffmesh.errors import InvalidArgument, NotFound
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from grpc import aio

from diffmesh_coordinator import view_events
from diffmesh_coordinator.store import CoordinatorStore
from diffmesh_coordinator.view_watch import ViewWatch

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_LOCATE_IDS = 64
MAX_RECORDS = 10_000
MAX_UPDATES = 100_000
MAX_PIPELINE_KEY_CHARS = 4096
MAX_NUM_IMAGES = 8
DEFAULT_POPULARITY_LIMIT = 10_000
MAX_POPULARITY_LIMIT = 100_000

# The instance manager reports its SSD and HOST tiers; a worker reports its GPU tier.
NODE_TIERS = (common_pb2.TIER_SSD, common_pb2.TIER_HOST)
WORKER_TIERS = (common_pb2.TIER_GPU,)


def check_address(field: str, address: str) -> str:
    """``host:port`` with a port in 1-65535."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(field, f"{address!r} must be host:port")
    return address


def check_non_negative(field: str, value: float) -> None:
    """Finite and >= 0."""
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(field, f"must be finite and >= 0, got {value}")


def _required_id(field: str, value: str) -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    return check_id(field, value)


class CoordinatorServicer(coordinator_pb2_grpc.CacheCoordinatorServiceServicer):
    """CacheCoordinatorService on a :class:`CoordinatorStore`."""

    def __init__(self, store: CoordinatorStore, watch: ViewWatch | None = None) -> None:
        self.store = store
        self.watch = watch or ViewWatch(store)

    async def RegisterComponent(
        self, request: coordinator_pb2.RegisterComponentRequest, context: aio.ServicerContext
    ) -> coordinator_pb2.RegisterComponentResponse:
        if not request.HasField("component"):
            raise InvalidArgument("component", "is required")
        component = validate_component(request.component, "component")
        stored, created = await self.store.register_component(component)
        if created:
            log.info("component registered", extra={"component_id": stored.id, "kind": kind_name(stored.kind)})
        return coordinator_pb2.RegisterComponentResponse(component=stored, created=created)

    async def GetComponent(
        self, request: coordinator_pb2.GetComponentRequest, context: aio.ServicerContext
    ) -> coordinator_pb2.GetComponentResponse:
        _required_id("id", request.id)
        return coordinator_pb2.GetComponentResponse(component=await self.store.get_component(request.id))

    async def ListComponents(
        self, request: coordinator_pb2.ListComponentsRequest, context: aio.ServicerContext
    ) -> coordinator_pb2.ListComponentsResponse:
        if request.kind not in common_pb2.ComponentKind.values():
            raise InvalidArgument("kind", f"unknown value {request.kind}")
        if request.family:
            check_id("family", request.family)
        page_size = request.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument(
                "page_size", f"must be within 1-{MAX_PAGE_SIZE} (0 = {DEFAULT_PAGE_SIZE}), got {request.page_size}"
            )
        page, token = await self.store.list_components(request.kind, request.family, page_size, request.page_token)
        return coordinator_pb2.ListComponentsResponse(components=page, next_page_token=token)

    async def RegisterNode(
        self, request: coordinator_pb2.RegisterNodeRequest, context: aio.ServicerContext
    ) -> coordinator_pb2.RegisterNodeResponse:
        node = request.node
        _required_id("node.node_id", node.node_id)
        check_address("node.instance_manager_address", node.instance_manager_address)
        check_non_negative("node.host_capacity_bytes", node.host_capacity_bytes)
        check_non_negative("node.ssd_capacity_bytes", node.ssd_capacity_bytes)
        fresh = await self.store.register_node(node)
        log.info("node registered", extra={"node_id": node.node_id, "fresh": fresh})
        return coordinator_pb2.RegisterNodeResponse(lease_seconds=self.store.lease_seconds)

    async def RegisterWorker(
        self, request: coordinator_pb2.RegisterWorkerRequest, context: aio.ServicerContext
    ) -> coordinator_pb2.RegisterWorkerResponse:
        worker = request.worker
        _required_id("worker.worker_id", worker.worker_id)
        _required_id("worker.node_id", worker.node_id)
        check_address("worker.address", worker.address)
        check_non_negative("worker.device_memory_bytes", worker.device_memory_bytes)
        fresh = await self.store.register_worker(worker)
        log.info("worker registered", extra={"node_id": worker.node_id, "worker_id": worker.worker_id, "fresh": fresh})
        return coordinator_pb2.RegisterWorkerResponse(lease_seconds=self.store.lease_seconds)

    async def Heartbeat(
        self, request: coordinator_pb2.HeartbeatRequest, context: aio.ServicerContext
    ) -> coordinator_pb2.HeartbeatResponse:
        _required_id("node_id", request.node_id)
        if request.worker_id:
            check_id("worker_id", request.worker_id)
        renewed = await self.store.heartbeat(request.node_id, request.worker_id)
        if not renewed:
            log.info("lease expired", extra={"node_id": request.node_id, "worker_id": request.worker_id})
        return coordinator_pb2.HeartbeatResponse(reregister=not renewed, lease_seconds=self.store.lease_seconds)

    async def ListNodes(
        self, request: coordinator_pb2.ListNodesRequest, context: aio.ServicerContext
    ) -> coordinator_pb2.ListNodesResponse:
        return coordinator_pb2.ListNodesResponse(nodes=await self.store.list_nodes())

    async def ReportResidency(
        self, request: coordinator_pb2.ReportResidencyRequest, context: aio.ServicerContext
    ) -> coordinator_pb2.ReportResidencyResponse:
        _required_id("node_id", request.node_id)
        if request.worker_id:
            check_id("worker_id", request.worker_id)
        if len(request.updates) > MAX_UPDATES:
            raise InvalidArgument("updates", f"at most {MAX_UPDATES} per call, got {len(request.updates)}")
        allowed = WORKER_TIERS if request.worker_id else NODE_TIERS
        reporter = "a worker" if request.worker_id else "an instance manager (empty worker_id)"
        for i, u in enumerate(request.updates):
            _required_id(f"updates[{i}].component_id", u.component_id)
            if u.tier not in allowed:
                names = [common_pb2.Tier.Name(t) for t in allowed]
                raise InvalidArgument(f"updates[{i}].tier", f"{reporter} reports tiers {names}, got {u.tier}")
            check_non_negative(f"updates[{i}].bytes", u.bytes)
            check_non_negative(f"updates[{i}].last_used_unix", u.last_used_unix)
        applied = await self.store.report_residency(request.node_id, request.worker_id, request.updates, request.full_snapshot)
        return coordinator_pb2.ReportResidencyResponse(applied=applied)

    async def Locate(
        self, request: coordinator_pb2.LocateRequest, context: aio.ServicerContext
    ) -> coordinator_pb2.LocateResponse:
        ids = list(request.component_ids)
        if not ids:
            raise InvalidArgument("component_ids", "at least one id is required")
        if len(ids) > MAX_LOCATE_IDS:
            raise InvalidArgument("component_ids", f"at most {MAX_LOCATE_IDS} ids, got {len(ids)}")
        for i, cid in enumerate(ids):
            _required_id(f"component_ids[{i}]", cid)
        missing = await self.store.missing_components(ids)
        if missing:
            raise NotFound("component", missing[0])
        return coordinator_pb2.LocateResponse(locations=await self.store.locate(ids))

    async def RecordRequests(
        self, request: coordinator_pb2.RecordRequestsRequest, context: aio.ServicerContext
    ) -> coordinator_pb2.RecordRequestsResponse:
        if len(request.records) > MAX_RECORDS:
            raise InvalidArgument("records", f"at most {MAX_RECORDS} per call, got {len(request.records)}")
        for i, r in enumerate(request.records):
            key = r.pipeline_key
            if not key:
                raise InvalidArgument(f"records[{i}].pipeline_key", "is required")
            if len(key) > MAX_PIPELINE_KEY_CHARS or any(ord(ch) < 32 for ch in key):
                raise InvalidArgument(f"records[{i}].pipeline_key", f"must be <= {MAX_PIPELINE_KEY_CHARS} printable characters")
            for j, cid in enumerate(r.component_ids):
                _required_id(f"records[{i}].component_ids[{j}]", cid)
            check_non_negative(f"records[{i}].arrival_unix", r.arrival_unix)
            if not 0 <= r.num_images <= MAX_NUM_IMAGES:
                raise InvalidArgument(
                    f"records[{i}].num_images", f"must be within 1-{MAX_NUM_IMAGES} (0 = 1), got {r.num_images}"
                )
            if r.task not in common_pb2.Task.values():
                raise InvalidArgument(f"records[{i}].task", f"unknown value {r.task}")
        return coordinator_pb2.RecordRequestsResponse(recorded=await self.store.record_requests(request.records))

    async def GetComponentPopularity(
        self, request: coordinator_pb2.GetComponentPopularityRequest, context: aio.ServicerContext
    ) -> coordinator_pb2.GetComponentPopularityResponse:
        limit = request.limit or DEFAULT_POPULARITY_LIMIT
        if not 1 <= limit <= MAX_POPULARITY_LIMIT:
            bounds = f"1-{MAX_POPULARITY_LIMIT} (0 = {DEFAULT_POPULARITY_LIMIT})"
            raise InvalidArgument("limit", f"must be within {bounds}, got {limit}")
        counts = await self.store.component_popularity(limit)
        return coordinator_pb2.GetComponentPopularityResponse(
            components=[coordinator_pb2.ComponentPopularity(component_id=cid, requests=n) for cid, n in counts]
        )

    async def GetPlan(
        self, request: coordinator_pb2.GetPlanRequest, context: aio.ServicerContext
    ) -> coordinator_pb2.GetPlanResponse:
        if request.known_version < 0:
            raise InvalidArgument("known_version", f"must be >= 0, got {request.known_version}")
        plan = await self.store.get_plan()
        if request.known_version and plan.version == request.known_version:
            plan = type(plan)(version=plan.version)
        return coordinator_pb2.GetPlanResponse(plan=plan)

    async def WatchView(
        self, request: coordinator_pb2.WatchViewRequest, context: aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.WatchViewResponse]:
        if request.after_event_id:
            try:
                view_events.parse_id(request.after_event_id)
            except ValueError as exc:
                raise InvalidArgument("after_event_id", str(exc)) from None
        async for event in self.watch.events(request.after_event_id, request.plans_only):
            yield coordinator_pb2.WatchViewResponse(event=event)

    async def ReportLoad(
        self, request: coordinator_pb2.ReportLoadRequest, context: aio.ServicerContext
    ) -> coordinator_pb2.ReportLoadResponse:
        if not request.HasField("load"):
            raise InvalidArgument("load", "is required")
        load = request.load
        _required_id("load.worker.node_id", load.worker.node_id)
        _required_id("load.worker.worker_id", load.worker.worker_id)
        for name in ("queue_length", "running", "device_memory_free_bytes", "device_memory_total_bytes", "max_queue"):
            check_non_negative(f"load.{name}", getattr(load, name))
        check_non_negative("load.measured_unix", load.measured_unix)
        await self.store.report_load(load)
        return coordinator_pb2.ReportLoadResponse(recorded=True)
