"""The router service: the public ``RouterService`` API of diffmesh (torch-free).

Generate / GenerateStream: validate (request, then catalog), record the request for
popularity, place it from the router's replica of the coordinator's view (completion-time
routing with the plan's bands and fused overlays, or least-loaded under
``DIFFMESH_POLICY=lru``), forward to the chosen worker's ``Run`` (spilling to the next
worker when a queue is full) and stream its events back. ListModels / GetModel proxy the
coordinator's catalog and residency view; GetRouterStats reports the router's counters.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping

from diffmesh.channels import open_channel
from diffmesh.errors import InvalidArgument, Unavailable
from diffmesh.pipeline_key import canonical_key
from diffmesh.policy.locality import rank_workers
from diffmesh.policy.popularity import Band
from diffmesh.policy.routing import GB, Bandwidths, activation_bytes
from diffmesh.policy_mode import PolicyMode, policy_mode
from diffmesh.request_validation import has_images
from diffmesh.telemetry import tracer
from diffmesh.trace.sizes import FAMILIES
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, router_pb2, router_pb2_grpc, worker_pb2
from diffmesh.view import ViewReplica
from grpc import aio

from diffmesh_router.capacity import CapacitySignal
from diffmesh_router.catalog import CatalogCache
from diffmesh_router.forwarder import Forwarder, WorkerChannels
from diffmesh_router.learned import LearnedEstimates, megapixel_steps
from diffmesh_router.placement import InFlight, PlacementPolicy, Placer, WorkerDirectory
from diffmesh_router.recorder import RequestRecorder
from diffmesh_router.settings import RouterSettings
from diffmesh_router.stats import RouterStats
from diffmesh_router.validation import component_ids, validate_against_catalog, validate_request
from diffmesh_router.view_placer import Ranking, RequestShape, Target, ViewPlacer
from diffmesh_router.worker_table import WorkerTable

log = logging.getLogger(__name__)
_tracer = tracer("diffmesh.router")

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
MAX_PAGE_SIZE = 1000
_EVENTS = ("queued", "loading", "step", "result")


class _State:
    """Everything that needs the running event loop (channels, stubs, caches, the view replica)."""

    def __init__(self, settings: RouterSettings, policy: PlacementPolicy | None, mode: PolicyMode) -> None:
        self.stats = RouterStats()
        self.coordinator_channel = open_channel(settings.coordinator)
        self.coordinator = coordinator_pb2_grpc.CacheCoordinatorServiceStub(self.coordinator_channel)
        timeout = settings.coordinator_timeout_seconds
        self.catalog = CatalogCache(self.coordinator, settings.catalog_cache_seconds, timeout)
        self.directory = WorkerDirectory(self.coordinator, settings.nodes_refresh_seconds, timeout, self.stats)
        self.in_flight = InFlight()
        self.capacity = CapacitySignal()
        hops = (settings.host_gbps, settings.ssd_gbps, settings.peer_gbps, settings.remote_gbps)
        self.learned = LearnedEstimates(
            Bandwidths.from_hops(*(g * GB for g in hops)),
            settings.compute_seconds_per_megapixel_step,
            settings.learn_load_rates,
        )
        self.replica = ViewReplica(
            self.coordinator,
            backoff_initial_s=settings.view_reconnect_seconds,
            backoff_max_s=settings.view_reconnect_max_seconds,
        )
        self.view = self.replica.view
        self.table = WorkerTable(self.view, self.learned, self.capacity)
        self.in_flight.add_listener(self.table.in_flight_changed)
        self.view_placer = ViewPlacer(self.table, mode, settings.asymmetric_loading)
        self.placer = Placer(self.directory, self.coordinator, self.in_flight, timeout, self.stats, policy or rank_workers)
        self.channels = WorkerChannels()
        self.forwarder = Forwarder(
            self.channels, self.in_flight, self.directory.invalidate, self.capacity, self.stats, settings.full_wait_seconds
        )
        self.recorder = RequestRecorder(self.coordinator, settings.record_flush_seconds, settings.record_buffer_max, timeout)


class RouterApp:
    """The router as a :class:`diffmesh.server.Service`."""

    name = "router"

    def __init__(
        self, settings: RouterSettings | None = None, policy: PlacementPolicy | None = None, mode: PolicyMode | None = None
    ) -> None:
        self.settings = settings or RouterSettings()
        self._policy = policy
        self.mode = mode or policy_mode()
        """``diffmesh`` or ``lru``; from ``DIFFMESH_POLICY`` unless given."""
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
        self._state = _State(self.settings, self._policy, self.mode)
        self._state.recorder.start()
        self._state.replica.start()
        log.info("router started", extra={"port": port, "coordinator": self.settings.coordinator, "policy": self.mode.value})

    async def stop(self) -> None:
        """Flushes request records and closes every channel."""
        state, self._state = self._state, None
        if state is None:
            return
        await state.replica.stop()
        await state.recorder.stop()
        await state.channels.close()
        await state.coordinator_channel.close()

    def stats_response(self) -> router_pb2.GetRouterStatsResponse:
        """``GetRouterStats``'s answer: counters since start, the view replica's state."""
        state = self.state
        stats, replica = state.stats, state.replica
        stale = replica.staleness_s()
        return router_pb2.GetRouterStatsResponse(
            policy=self.mode.value,
            requests=stats.requests,
            view_decisions=stats.view_decisions,
            fallback_decisions=stats.fallback_decisions,
            locate_calls=stats.locate_calls,
            list_nodes_calls=stats.list_nodes_calls,
            view_updates=state.view.events_applied,
            view_snapshots=state.view.snapshots_applied,
            view_connected=replica.connected,
            view_staleness_seconds=-1.0 if stale is None else stale,
            view_detail=replica.detail(),
            plan_version=state.view.plan.version,
            spills=stats.spills,
            full_waits=stats.full_waits,
            resource_exhausted=stats.resource_exhausted,
            fused_rewrites=stats.fused_rewrites,
            hot_requests=stats.bands[Band.HOT],
            warm_requests=stats.bands[Band.WARM],
            cold_requests=stats.bands[Band.COLD],
            unavailable_retries=stats.unavailable_retries,
            workers=[
                router_pb2.RoutedWorker(node_id=node_id, worker_id=worker_id, requests=n)
                for (node_id, worker_id), n in sorted(stats.routed.items())
            ],
        )

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
        state.stats.requests += 1
        shape, run_pipeline = await self._shape(pipeline, params, records, key)
        with _tracer.start_as_current_span("router.place") as span:
            candidates, first = await self._candidates(shape, records, request_id)
            span.set_attribute("worker_id", first.worker_id)
        run = worker_pb2.RunRequest(request_id=request_id, pipeline=run_pipeline, params=params, tenant=tenant)
        got_result = False
        async for target, event in state.forwarder.run(run, candidates, self._deadline(context)):
            if event.HasField("result"):
                state.learned.learn(target.key, event.result, shape.units)
                state.table.learned_changed(target.key)
                state.table.finished(target.key)
                _complete(event.result, request_id, key, target, time.monotonic() - started)
                got_result = True
            yield event
        if not got_result:
            raise Unavailable(f"worker ended request {request_id} without a result")

    async def _shape(
        self,
        pipeline: common_pb2.PipelineSpec,
        params: common_pb2.GenerationParams,
        records: Mapping[str, common_pb2.Component],
        key: str,
    ) -> tuple[RequestShape, common_pb2.PipelineSpec]:
        """What placement needs to know, and the pipeline to send: the plan's FUSED overlay when it has one."""
        state = self.state
        base = records[pipeline.base_id]
        run_pipeline = pipeline
        ids = component_ids(pipeline)
        sizes = {cid: rec.bytes for cid, rec in records.items()}
        fused_id = state.view.plan.fused_id(key) if self.mode is PolicyMode.DIFFMESH and pipeline.loras else ""
        if fused_id:
            fused = await state.catalog.find(fused_id)
            overlay_base = (fused.base_id or pipeline.base_id) if fused is not None else ""
            if fused is not None and fused.kind == common_pb2.COMPONENT_KIND_FUSED and overlay_base in records:
                # The worker runs the overlay as the base (its base shares VAE and text encoder); ControlNets stay.
                run_pipeline = common_pb2.PipelineSpec(base_id=fused.id, controlnets=pipeline.controlnets)
                ids = list(dict.fromkeys([fused.id, overlay_base, *(cn.id for cn in pipeline.controlnets)]))
                sizes[fused.id] = fused.bytes
                state.stats.fused_rewrites += 1
        family = FAMILIES.get(base.family) or FAMILIES["sd15"]
        activations = activation_bytes(
            params.num_images or 1, params.width, params.height, int(family.activation_gb_per_image * GB), family.native_side
        )
        units = megapixel_steps(params.steps, params.num_images or 1, params.width, params.height)
        shape = RequestShape(key, tuple(ids), tuple(sizes[cid] for cid in ids), activations, units)
        return shape, run_pipeline

    async def _candidates(
        self, shape: RequestShape, records: Mapping[str, common_pb2.Component], request_id: str
    ) -> tuple[Callable[[], Iterable[Target]], Target]:
        """The ranking the forwarder walks (asked again after a wait for room) and its first worker.

        From the view once it has a snapshot with a live worker; before that (cold start)
        from ListNodes and Locate.
        """
        state = self.state
        if state.replica.synced and state.view_placer.has_workers():
            ranking = state.view_placer.rank(shape)
            state.stats.view_decisions += 1
            if ranking.band is not None:  # lru has no bands
                state.stats.bands[ranking.band] += 1
            _log_ranking(request_id, shape, ranking)
            fresh: list[Ranking] = [ranking]

            def ranked() -> Iterable[Target]:
                return (fresh.pop() if fresh else state.view_placer.rank(shape)).targets()

            return ranked, ranking.first()
        state.stats.fallback_decisions += 1
        targets = await state.placer.rank(records)
        log.info(
            "placed without a view (cold start)",
            extra={"request_id": request_id, "pipeline_key": shape.pipeline_key, "worker_id": targets[0].worker_id},
        )
        return (lambda: targets), targets[0]


def _complete(result: common_pb2.GenerationResult, request_id: str, key: str, target: Target, seconds: float) -> None:
    """Fills what the router knows into the worker's result; total time is the router's end to end.

    The pipeline key is always the requested one, also when the worker ran the plan's fused overlay.
    """
    result.request_id = result.request_id or request_id
    result.pipeline_key = key
    result.worker_id = result.worker_id or target.worker_id
    result.node_id = result.node_id or target.node_id
    result.timing.total_seconds = seconds


def _log_ranking(request_id: str, shape: RequestShape, ranking: Ranking) -> None:
    best = ranking.first()
    log.info(
        "placed",
        extra={
            "request_id": request_id,
            "pipeline_key": shape.pipeline_key,
            "worker_id": best.worker_id,
            "node_id": best.node_id,
            "band": ranking.band.value if ranking.band else "",
            "ect_s": ranking.ect_s(),
            "candidates": len(ranking),
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
        state.stats.locate_calls += 1
        resp = await state.coordinator.Locate(
            coordinator_pb2.LocateRequest(component_ids=[request.id]), timeout=self.app.settings.coordinator_timeout_seconds
        )
        residencies = [r for loc in resp.locations if loc.component_id == request.id for r in loc.residencies]
        return router_pb2.GetModelResponse(model=model, residencies=residencies)

    async def GetRouterStats(
        self, request: router_pb2.GetRouterStatsRequest, context: aio.ServicerContext
    ) -> router_pb2.GetRouterStatsResponse:
        """The router's counters and the state of its replica of the view."""
        return self.app.stats_response()
