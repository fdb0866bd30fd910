"""The router service: the public ``RouterService`` API of diffmesh (torch-free).

Generate / GenerateStream: validate (request, then catalog), record the request for
popularity, rank the live workers (placement v1: locality), forward to the chosen
worker's ``Run`` and stream its events back. ListModels / GetModel proxy the
coordinator's catalog and residency view.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from diffmesh.channels import open_channel
from diffmesh.errors import InvalidArgument, Unavailable
from diffmesh.pipeline_key import canonical_key
from diffmesh.request_validation import has_images
from diffmesh.telemetry import tracer
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, router_pb2, router_pb2_grpc, worker_pb2
from grpc import aio

from diffmesh_router.catalog import CatalogCache
from diffmesh_router.forwarder import Forwarder, WorkerChannels
from diffmesh_router.placement import InFlight, Placement, PlacementPolicy, Placer, WorkerDirectory
from diffmesh_router.recorder import RequestRecorder
from diffmesh_router.settings import RouterSettings
from diffmesh_router.validation import component_ids, validate_against_catalog, validate_request

log = logging.getLogger(__name__)
_tracer = tracer("diffmesh.router")

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
MAX_PAGE_SIZE = 1000
_EVENTS = ("queued", "loading", "step", "result")


class _State:
    """Everything that needs the running event loop (channels, stubs, caches)."""

    def __init__(self, settings: RouterSettings, policy: PlacementPolicy | None) -> None:
        self.coordinator_channel = open_channel(settings.coordinator)
        self.coordinator = coordinator_pb2_grpc.CacheCoordinatorServiceStub(self.coordinator_channel)
        timeout = settings.coordinator_timeout_seconds
        self.catalog = CatalogCache(self.coordinator, settings.catalog_cache_seconds, timeout)
        self.directory = WorkerDirectory(self.coordinator, settings.nodes_refresh_seconds, timeout)
        self.in_flight = InFlight()
        self.placer = Placer(self.directory, self.coordinator, self.in_flight, timeout, *([policy] if policy else []))
        self.channels = WorkerChannels()
        self.forwarder = Forwarder(self.channels, self.in_flight, self.directory.invalidate)
        self.recorder = RequestRecorder(self.coordinator, settings.record_flush_seconds, settings.record_buffer_max, timeout)


class RouterApp:
    """The router as a :class:`diffmesh.server.Service`."""

    name = "router"

    def __init__(self, settings: RouterSettings | None = None, policy: PlacementPolicy | None = None) -> None:
        self.settings = settings or RouterSettings()
        self._policy = policy
        self._state: _State | None = None

    @property
    def state(self) -> _State:
        """Runtime state; exists between :meth:`start` and :meth:`stop`."""
        if self._state is None:
            raise Unavailable("router is not started")
        return self._state

    def add_to_server(self, server: aio.Server) -> list[str]:
        """Adds the RouterService servicer."""
        router_pb2_grpc.add_RouterServiceServicer_to_server(RouterServicer(self), server)
        return [SERVICE_NAME]

    async def start(self, port: int) -> None:
        """Opens the coordinator channel and starts the request-record flush (does not wait for the coordinator)."""
        self._state = _State(self.settings, self._policy)
        self._state.recorder.start()
        log.info("router started", extra={"port": port, "coordinator": self.settings.coordinator})

    async def stop(self) -> None:
        """Flushes request records and closes every channel."""
        state, self._state = self._state, None
        if state is None:
            return
        await state.recorder.stop()
        await state.channels.close()
        await state.coordinator_channel.close()

    # -- generation -------------------------------------------------------------------

    def _deadline(self, context: aio.ServicerContext) -> Callable[[], float]:
        cap = self.settings.max_request_seconds

        def remaining() -> float:
            left = context.time_remaining()
            if left is None or left > cap:
                return cap
            if left <= 0:
                raise TimeoutError("deadline exceeded before the worker call")
            return left

        return remaining

    async def generate_events(
        self,
        request_id: str,
        pipeline: common_pb2.PipelineSpec,
        params: common_pb2.GenerationParams,
        tenant: str,
        context: aio.ServicerContext,
    ) -> AsyncIterator[worker_pb2.RunResponse]:
        """Validates, records, places and forwards one request; yields the worker's events."""
        state = self.state
        arrival = time.time()
        started = time.monotonic()
        with _tracer.start_as_current_span("router.validate"):
            if has_images(pipeline, params):
                await asyncio.to_thread(validate_request, request_id, tenant, pipeline, params)
            else:
                validate_request(request_id, tenant, pipeline, params)
            request_id = request_id or uuid.uuid4().hex
            ids = component_ids(pipeline)
            records = await state.catalog.get_many(ids)
            validate_against_catalog(pipeline, records)
        key = canonical_key(
            pipeline.base_id, [(lr.id, lr.scale) for lr in pipeline.loras], [cn.id for cn in pipeline.controlnets]
        )
        num_images = params.num_images or 1
        state.recorder.add(
            coordinator_pb2.RequestRecord(
                request_id=request_id,
                pipeline_key=key,
                component_ids=ids,
                tenant=tenant,
                arrival_unix=arrival,
                task=params.task or common_pb2.TASK_TXT2IMG,
                num_images=num_images,
            )
        )
        with _tracer.start_as_current_span("router.place") as span:
            placements = await state.placer.rank(records)
            span.set_attribute("worker_id", placements[0].worker.worker_id)
            span.set_attribute("score", placements[0].ranked.score)
        _log_placement(request_id, key, placements)
        run = worker_pb2.RunRequest(request_id=request_id, pipeline=pipeline, params=params, tenant=tenant)
        got_result = False
        async for placement, event in state.forwarder.run(run, placements, self._deadline(context)):
            if event.HasField("result"):
                _complete(event.result, request_id, key, placement, time.monotonic() - started)
                got_result = True
            yield event
        if not got_result:
            raise Unavailable(f"worker ended request {request_id} without a result")


def _complete(result: common_pb2.GenerationResult, request_id: str, key: str, placement: Placement, seconds: float) -> None:
    """Fills what the router knows into the worker's result; total time is the router's end to end."""
    result.request_id = result.request_id or request_id
    result.pipeline_key = result.pipeline_key or key
    result.worker_id = result.worker_id or placement.worker.worker_id
    result.node_id = result.node_id or placement.worker.node_id
    result.timing.total_seconds = seconds


def _log_placement(request_id: str, key: str, placements: list[Placement]) -> None:
    best = placements[0]
    log.info(
        "placed",
        extra={
            "request_id": request_id,
            "pipeline_key": key,
            "worker_id": best.worker.worker_id,
            "node_id": best.worker.node_id,
            "score": best.ranked.score,
            "queue": best.ranked.candidate.queue_length,
            "candidates": len(placements),
        },
    )


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    """gRPC handlers; errors are raised and mapped to statuses by the interceptor."""

    def __init__(self, app: RouterApp) -> None:
        self.app = app

    async def Generate(self, request: router_pb2.GenerateRequest, context: aio.ServicerContext) -> router_pb2.GenerateResponse:
        """Generates images; returns when they are ready."""
        result: common_pb2.GenerationResult | None = None
        events = self.app.generate_events(request.request_id, request.pipeline, request.params, request.tenant, context)
        async for event in events:
            if event.HasField("result"):
                result = event.result
        assert result is not None  # generate_events raises when the worker sent none
        return router_pb2.GenerateResponse(result=result)

    async def GenerateStream(
        self, request: router_pb2.GenerateStreamRequest, context: aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateStreamResponse]:
        """Streams queued, loading and step events, then the result."""
        events = self.app.generate_events(request.request_id, request.pipeline, request.params, request.tenant, context)
        async for event in events:
            which = event.WhichOneof("event")
            if which in _EVENTS:
                yield router_pb2.GenerateStreamResponse(**{which: getattr(event, which)})

    async def ListModels(
        self, request: router_pb2.ListModelsRequest, context: aio.ServicerContext
    ) -> router_pb2.ListModelsResponse:
        """Proxies the coordinator's ListComponents."""
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument("page_size", f"must be within 1..{MAX_PAGE_SIZE} (0 means 100), got {request.page_size}")
        state = self.app.state
        resp = await state.coordinator.ListComponents(
            coordinator_pb2.ListComponentsRequest(
                kind=request.kind, family=request.family, page_size=request.page_size, page_token=request.page_token
            ),
            timeout=self.app.settings.coordinator_timeout_seconds,
        )
        return router_pb2.ListModelsResponse(models=resp.components, next_page_token=resp.next_page_token)

    async def GetModel(self, request: router_pb2.GetModelRequest, context: aio.ServicerContext) -> router_pb2.GetModelResponse:
        """One catalog record and where its copies live."""
        if not request.id:
            raise InvalidArgument("id", "is required")
        state = self.app.state
        model = await state.catalog.get(request.id)
        resp = await state.coordinator.Locate(
            coordinator_pb2.LocateRequest(component_ids=[request.id]), timeout=self.app.settings.coordinator_timeout_seconds
        )
        residencies = [r for loc in resp.locations if loc.component_id == request.id for r in loc.residencies]
        return router_pb2.GetModelResponse(model=model, residencies=residencies)
