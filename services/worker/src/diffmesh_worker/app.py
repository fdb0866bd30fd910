"""The worker service: ``Run`` (queue → load → denoise, streamed) and ``Status``.

One request holds the device at a time; loading and denoising run in a single device
thread so the event loop keeps serving ``Status``, queue positions and health. A request
runs as its own task, separate from the RPC handler: when the client cancels or its
deadline passes, the handler sets the interrupt flag and the task stops at the next
denoising step (loading, if under way, completes and stays cached), and frees the device.

With a coordinator, the worker also pushes its load on every change
(:mod:`~diffmesh_worker.load_reporter`) and, under ``DIFFMESH_POLICY=diffmesh``, follows
the coordinator's plans: its HOT replicas are pinned and pre-built while the device is idle
(:mod:`~diffmesh_worker.plan_executor`), and the next queued request's components are
fetched into HOST while it waits (:mod:`~diffmesh_worker.load_ahead`). The device tier
evicts with the shared utility policy, or LRU under ``DIFFMESH_POLICY=lru``
(:mod:`~diffmesh_worker.device_eviction`).

With ``DIFFMESH_WORKER_STANDBY=true`` the worker starts as a warm standby: everything is
imported and built that needs no instance manager, coordinator or device memory, and the
server listens, but health stays NOT_SERVING, ``Run`` is refused (FAILED_PRECONDITION)
and nothing is registered, reported or followed. ``Activate`` (or SIGUSR1, see
:mod:`~diffmesh_worker.__main__`) then starts exactly what a normal start starts, with the
identity the request gives (:mod:`~diffmesh_worker.activation`), and marks it SERVING: the
process start (seconds of imports) is paid before the worker is needed, not after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch
from diffmesh.channels import open_channel
from diffmesh.errors import DiffmeshError, FailedPrecondition
from diffmesh.plan_follower import PlanFollower
from diffmesh.policy_mode import PolicyMode, policy_mode
from diffmesh.server import HealthMarker
from diffmesh.telemetry import tracer
from diffmesh.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    instance_manager_pb2_grpc,
    plan_pb2,
    worker_pb2,
    worker_pb2_grpc,
)
from grpc import aio

from diffmesh_worker.activation import activated_settings
from diffmesh_worker.assemble import DevicePlacement
from diffmesh_worker.device_cache import DeviceCache
from diffmesh_worker.device_eviction import DeviceUsage, eviction_policy
from diffmesh_worker.devices import default_cache_bytes, memory, resolve_device
from diffmesh_worker.load_ahead import LoadAhead
from diffmesh_worker.load_reporter import LoadReporter
from diffmesh_worker.loader import Loader, PipelineParts
from diffmesh_worker.plan_executor import PlanExecutor
from diffmesh_worker.registration import Registrar
from diffmesh_worker.runner import DeviceSlot, Interrupted, denoise
from diffmesh_worker.settings import WorkerSettings
from diffmesh_worker.shm_mapping import SegmentMapper
from diffmesh_worker.skeletons import SkeletonPool
from diffmesh_worker.validation import Job, validate

log = logging.getLogger(__name__)
_tracer = tracer("diffmesh_worker")
SERVICE_NAME = "diffmesh.v1.WorkerService"
STOP_WAIT_S = 30.0
# How a run ends without a bug: interrupted, refused (the error model) or a failed IM call.
EXPECTED_RUN_ERRORS = (Interrupted, DiffmeshError, grpc.RpcError)


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """gRPC face of :class:`WorkerApp`."""

    def __init__(self, app: WorkerApp) -> None:
        self.app = app

    async def Run(self, request: worker_pb2.RunRequest, context: aio.ServicerContext) -> AsyncIterator[worker_pb2.RunResponse]:
        async for event in self.app.run(request):
            yield event

    async def Status(self, request: worker_pb2.StatusRequest, context: aio.ServicerContext) -> worker_pb2.StatusResponse:
        return self.app.status()

    async def Activate(self, request: worker_pb2.ActivateRequest, context: aio.ServicerContext) -> worker_pb2.ActivateResponse:
        return await self.app.activate(request)


@dataclass
class _Standby:
    """A standby worker's state until it is activated."""

    since: float = 0.0  # monotonic time its server started
    activating: bool = False


class WorkerApp:
    """One worker: a device, its queue, its device-tier cache, and its links to the IM and coordinator."""

    name = "worker"

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        if settings.torch_threads:
            # Process-wide: on a shared CPU, fewer threads avoid oversubscription stalls.
            torch.set_num_threads(settings.torch_threads)
        self.device = resolve_device(settings.device)
        self.placement = DevicePlacement.for_device(self.device)
        self.mapper = SegmentMapper()
        self.mode = policy_mode()
        self.usage = DeviceUsage(settings.popularity_half_life_seconds)
        policy = eviction_policy(
            self.mode, self.usage, lambda cid: self.cache.get(cid), lambda: self.cache.pins, settings.eviction_horizon_seconds
        )
        self.cache = DeviceCache(settings.cache_bytes or default_cache_bytes(self.device), settings.cache_max_components, policy)
        self.slot = DeviceSlot(settings.max_queue, on_change=self._load_changed)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"device-{settings.worker_id}")
        # Spare meta skeletons are rebuilt only while nothing holds or waits for the device.
        self.skeletons = SkeletonPool(settings.skeleton_keys, is_idle=lambda: self.slot.idle)
        self.registrar: Registrar | None = None
        self.load_reporter: LoadReporter | None = None
        self.plan_executor: PlanExecutor | None = None
        self.plan_follower: PlanFollower | None = None
        self._loader: Loader | None = None
        self._channels: list[aio.Channel] = []
        self._tasks: set[asyncio.Task[object]] = set()
        self._ahead_done: set[asyncio.Task[None]] = set()
        """Load-ahead leases being released (:mod:`~diffmesh_worker.load_ahead`)."""
        self._port = 0
        self._mark_health: HealthMarker | None = None
        # None: active (started normally, or activated); set: on standby.
        self._standby: _Standby | None = _Standby() if settings.standby else None
        self._started = asyncio.Event()
        self._signal_activation: asyncio.Task[None] | None = None

    # --- Service protocol -------------------------------------------------------------

    def add_to_server(self, server: aio.Server) -> list[str]:
        """Adds the WorkerService."""
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(self), server)
        return [SERVICE_NAME]

    def bind_health(self, mark: HealthMarker) -> bool:
        """Keeps the server's health marker (for activation); a standby starts NOT_SERVING."""
        self._mark_health = mark
        return self._standby is None

    async def start(self, port: int) -> None:
        """Opens the channels, and registers with the coordinator (in the background, retrying).

        On standby: nothing of that; :meth:`activate` does it later.
        """
        self._port = port
        if self._standby is not None:
            self._standby.since = time.monotonic()
            log.info("worker on standby", extra={"worker_id": self.settings.worker_id, "device": self.device, "port": port})
        else:
            await self._go_live()
        self._started.set()

    async def _go_live(self) -> None:
        """What a normal start starts: the IM link, and with a coordinator the registration, load reports and plans."""
        s, port = self.settings, self._port
        if not s.instance_manager:
            raise FailedPrecondition("DIFFMESH_WORKER_INSTANCE_MANAGER is required")
        im_channel = open_channel(s.instance_manager)
        self._channels.append(im_channel)
        self._loader = Loader(
            instance_manager_pb2_grpc.InstanceManagerServiceStub(im_channel),
            self.cache,
            self.mapper,
            self.placement,
            self.executor,
            s.worker_id,
            self._report,
            s.acquire_timeout_seconds,
            self.skeletons,
            self.usage,
        )
        if s.coordinator:
            channel = open_channel(s.coordinator)
            self._channels.append(channel)
            total, _ = memory(self.device)
            info = coordinator_pb2.WorkerInfo(
                worker_id=s.worker_id,
                address=f"{s.advertise_host}:{port}",
                device=self.device,
                device_memory_bytes=total,
                node_id=s.node_id,
            )
            coordinator = coordinator_pb2_grpc.CacheCoordinatorServiceStub(channel)
            self.registrar = Registrar(
                coordinator, info, self._snapshot, s.report_timeout_seconds, on_register=self._load_changed
            )
            self.load_reporter = LoadReporter(
                coordinator,
                self.registrar,
                self.measure_load,
                timeout_s=s.report_timeout_seconds,
                min_interval_s=s.load_report_interval_seconds,
            )
            self.registrar.start()
            self.load_reporter.start()
            if self.mode is PolicyMode.DIFFMESH:
                self.plan_executor = PlanExecutor(
                    s.node_id,
                    s.worker_id,
                    self.cache,
                    self.slot,
                    self._loader,
                    coordinator,
                    retry_s=s.plan_retry_seconds,
                    timeout_s=s.report_timeout_seconds,
                )
                self.plan_executor.start()
                self.plan_follower = PlanFollower(s.coordinator, self.plan_executor.apply, reconnect_s=s.plan_reconnect_seconds)
                self.plan_follower.start()
        log.info(
            "worker started", extra={"worker_id": s.worker_id, "device": self.device, "port": port, "policy": self.mode.value}
        )

    async def activate(self, request: worker_pb2.ActivateRequest) -> worker_pb2.ActivateResponse:
        """Turns this standby into a serving worker with the identity ``request`` gives (unset fields: the settings).

        FAILED_PRECONDITION when already active (or being activated); INVALID_ARGUMENT naming a
        bad field, the worker staying on standby. Health is SERVING when this returns;
        registration with the coordinator goes on in the background, as at a normal start.
        """
        standby = self._standby
        if standby is None:
            raise FailedPrecondition(f"worker {self.settings.worker_id} is active already: only a standby is activated")
        if standby.activating:
            raise FailedPrecondition(f"worker {self.settings.worker_id} is being activated already")
        settings = activated_settings(self.settings, request)
        standby.activating = True
        previous, self.settings = self.settings, settings
        try:
            await self._go_live()
        except BaseException:
            # Nothing half-started stays behind: close what _go_live opened, and stay on standby.
            self.settings = previous
            await self._unlink()
            standby.activating = False
            raise
        self._standby = None
        waited = time.monotonic() - standby.since
        if self._mark_health is not None:
            await self._mark_health(True)
        log.info("standby activated", extra={"worker_id": settings.worker_id, "node_id": settings.node_id, "standby_s": waited})
        return worker_pb2.ActivateResponse(worker_id=settings.worker_id, node_id=settings.node_id, standby_seconds=waited)

    def activate_on_signal(self) -> None:
        """SIGUSR1: activates with the settings as they are (once the server started); a repeat is logged."""
        if self._signal_activation is not None and not self._signal_activation.done():
            log.warning("SIGUSR1 ignored: an activation is under way")
            return

        async def activate_when_started() -> None:
            await self._started.wait()
            try:
                await self.activate(worker_pb2.ActivateRequest())
            except DiffmeshError as err:
                log.warning("SIGUSR1: not activated", extra={"error": str(err)})
            except Exception:
                log.exception("SIGUSR1: activation failed")

        self._signal_activation = asyncio.create_task(activate_when_started(), name="activate-on-signal")

    async def _unlink(self) -> None:
        """Stops the coordinator links (plans, load reports, registration) and closes the channels."""
        if self.plan_follower is not None:
            await self.plan_follower.stop()
        if self.plan_executor is not None:
            await self.plan_executor.stop()
        if self.load_reporter is not None:
            await self.load_reporter.stop()
        if self.registrar is not None:
            await self.registrar.stop()
        for channel in self._channels:
            await channel.close()
        self._channels.clear()
        self.plan_follower = None
        self.plan_executor = None
        self.load_reporter = None
        self.registrar = None
        self._loader = None

    async def stop(self) -> None:
        """Interrupts nothing (the server drained already); frees the device tier and its leases.

        Runs still finishing get up to 30 s. Their outcome is not stop's business (each run's
        client, or :meth:`run`'s done callback, reads it), so nothing is suppressed here.
        """
        if self._signal_activation is not None and not self._signal_activation.done():
            self._signal_activation.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._signal_activation
        if self.plan_follower is not None:
            await self.plan_follower.stop()
        if self.plan_executor is not None:
            await self.plan_executor.stop()
        if self._tasks:
            _, busy = await asyncio.wait(list(self._tasks), timeout=STOP_WAIT_S)
            if busy:
                log.warning("runs still busy at stop", extra={"runs": len(busy)})
        if self._ahead_done:
            # Releases of load-ahead leases: an Acquire still under way is given up (its lease expires at the IM).
            _, pending = await asyncio.wait(list(self._ahead_done), timeout=STOP_WAIT_S / 10)
            for t in pending:
                t.cancel()
        if self._loader is not None:
            await self._loader.release_removed(self.cache.clear())
        if self.load_reporter is not None:
            await self.load_reporter.stop()
        if self.registrar is not None:
            await self.registrar.stop()
        for channel in self._channels:
            await channel.close()
        self._channels.clear()
        self.executor.shutdown(wait=True)
        self.skeletons.close()
        self.mapper.forget_all()

    def _loads_ahead(self) -> bool:
        """Whether queued requests load ahead (:mod:`~diffmesh_worker.load_ahead`)."""
        return self.settings.load_ahead and self.mode is PolicyMode.DIFFMESH and self._loader is not None

    # --- residency ----------------------------------------------------------------------

    def _report(self, present: bool, components: list[tuple[str, int]]) -> None:
        if self.registrar is not None:
            self.registrar.report(present, components)
        if components:
            self._load_changed()  # device memory changed

    def _load_changed(self) -> None:
        """The queue, the running request or the device tier changed."""
        if self.load_reporter is not None:
            self.load_reporter.changed()
        if self.plan_executor is not None:
            self.plan_executor.wake()

    def measure_load(self) -> plan_pb2.WorkerLoad:
        """This worker's load now, as ``ReportLoad`` sends it."""
        total, free = memory(self.device)
        return plan_pb2.WorkerLoad(
            worker=plan_pb2.WorkerRef(node_id=self.settings.node_id, worker_id=self.settings.worker_id),
            queue_length=self.slot.queue_length,
            running=self.slot.running,
            device_memory_free_bytes=free,
            device_memory_total_bytes=total,
            max_queue=self.settings.max_queue,
            measured_unix=time.time(),
        )

    def _snapshot(self) -> list[tuple[str, int, float]]:
        return [(e.component_id, e.bytes, e.last_used_unix) for e in self.cache.entries()]

    # --- RPCs ---------------------------------------------------------------------------

    def status(self) -> worker_pb2.StatusResponse:
        """Device memory, queue, the device-resident components (pinned ones marked) and the plan version."""
        total, free = memory(self.device)
        pins = self.cache.pins
        return worker_pb2.StatusResponse(
            worker_id=self.settings.worker_id,
            node_id=self.settings.node_id,
            device=self.device,
            device_memory_total_bytes=total,
            device_memory_free_bytes=free,
            queue_length=self.slot.queue_length,
            running=self.slot.running,
            resident=[
                worker_pb2.ResidentComponent(
                    component_id=e.component_id, bytes=e.bytes, last_used_unix=e.last_used_unix, pinned=e.component_id in pins
                )
                for e in self.cache.entries()
            ],
            plan_version=self.plan_executor.version if self.plan_executor is not None else 0,
            host_to_device_bytes_per_second=self.usage.bandwidth_bps,
            standby=self._standby is not None,
        )

    async def run(self, request: worker_pb2.RunRequest) -> AsyncIterator[worker_pb2.RunResponse]:
        """Validates, queues, loads and denoises one request, yielding its progress and result."""
        if self._standby is not None:
            raise FailedPrecondition("standby: not activated (WorkerService.Activate or SIGUSR1 first)")
        started = time.perf_counter()
        job = validate(request)
        ticket = self.slot.enter()
        task: asyncio.Task[common_pb2.GenerationResult] | None = None
        cancelled = threading.Event()
        events: asyncio.Queue[worker_pb2.RunResponse] = asyncio.Queue()
        getter: asyncio.Future[worker_pb2.RunResponse] | None = None
        ahead: LoadAhead | None = None
        try:
            with _tracer.start_as_current_span("worker.queue") as span:
                async for position in self.slot.positions(ticket):
                    span.set_attribute("position", position)
                    if position == 1 and ahead is None and self._loads_ahead():
                        assert self._loader is not None
                        ahead = LoadAhead.start(self._loader, self.cache, PipelineParts.of_job(job), job.request_id)
                    yield worker_pb2.RunResponse(
                        queued=common_pb2.ProgressQueued(position=position, worker_id=self.settings.worker_id)
                    )
            queue_s = time.perf_counter() - started
            task = asyncio.create_task(self._execute(job, events, cancelled, started, queue_s), name=f"run-{job.request_id}")
            self._tasks.add(task)  # type: ignore[arg-type]

            def finished(done: asyncio.Task[common_pb2.GenerationResult]) -> None:
                self._tasks.discard(done)  # type: ignore[arg-type]
                self.slot.release(ticket)
                if done.cancelled():
                    return
                exc = done.exception()  # retrieved here too: a cancelled client never reads it
                if exc is not None and cancelled.is_set() and not isinstance(exc, EXPECTED_RUN_ERRORS):
                    # A bug, with no client left to report it to: log it (a client present gets INTERNAL).
                    log.error("request failed after its client left", exc_info=exc, extra={"request_id": job.request_id})

            task.add_done_callback(finished)
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                while not events.empty():
                    yield events.get_nowait()
                yield worker_pb2.RunResponse(result=task.result())
                return
        finally:
            if ahead is not None:
                releasing = asyncio.create_task(ahead.finish(), name=f"load-ahead-done-{job.request_id}")
                self._ahead_done.add(releasing)
                releasing.add_done_callback(self._ahead_done.discard)
            if getter is not None and not getter.done():
                getter.cancel()
            if task is None:
                self.slot.leave(ticket)
            elif not task.done():
                cancelled.set()  # the task stops at its next check and then frees the device

    async def _execute(
        self,
        job: Job,
        events: asyncio.Queue[worker_pb2.RunResponse],
        cancelled: threading.Event,
        started: float,
        queue_s: float,
    ) -> common_pb2.GenerationResult:
        assert self._loader is not None
        loop = asyncio.get_running_loop()
        try:
            load_started = time.perf_counter()
            with _tracer.start_as_current_span("worker.load") as span:
                span.set_attribute("pipeline_key", job.pipeline_key)
                loaded = await self._loader.prepare(PipelineParts.of_job(job), events.put_nowait)
            load_s = time.perf_counter() - load_started

            def on_step(step: int, total: int) -> None:
                event = worker_pb2.RunResponse(step=common_pb2.ProgressStep(step=step, total=total))
                loop.call_soon_threadsafe(events.put_nowait, event)

            denoise_started = time.perf_counter()
            with _tracer.start_as_current_span("worker.denoise") as span:
                span.set_attribute("steps", job.steps)
                span.set_attribute("num_images", job.num_images)
                images = await loop.run_in_executor(self.executor, denoise, loaded.modules, job, cancelled, on_step)
            denoise_s = time.perf_counter() - denoise_started
        except Interrupted:
            log.info("request cancelled", extra={"request_id": job.request_id})
            raise
        total_s = time.perf_counter() - started
        return common_pb2.GenerationResult(
            request_id=job.request_id,
            images=images,
            worker_id=self.settings.worker_id,
            node_id=self.settings.node_id,
            loads=loaded.loads,
            timing=common_pb2.Timing(
                queue_seconds=queue_s, load_seconds=load_s, denoise_seconds=denoise_s, total_seconds=total_s
            ),
            pipeline_key=job.pipeline_key,
        )
