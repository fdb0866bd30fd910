"""Executing the coordinator's plan on this worker: HOT replicas pre-built and pinned.

:meth:`PlanExecutor.apply` is the :class:`diffmesh.plan_follower.PlanFollower`'s
``on_plan``. A plan version not newer than the last one applied is ignored. Every
``HotPipelinePlan`` that lists this worker (``node_id``, ``worker_id``) in its replicas
becomes a *replica* of this worker:

* **Pins**: the replica's components — its base, LoRAs, ControlNets and, when the plan
  names one, its FUSED overlay — are pinned in the device cache (never evicted) while the
  plan lists this worker. A replica a newer plan drops is unpinned: evictable like any
  other entry, not removed.
* **Pre-build**: a replica not yet built on the device is built ahead of its requests. The
  target is the overlay (``fused_id`` as the base, plus the ControlNets) when the plan
  names one and the catalog has it, else the base with runtime LoRAs and ControlNets;
  the catalog is asked again every ``retry_s`` until the overlay appears (the instance
  manager derives it in the background).

Pre-builds have a lower priority than every request. First the components are acquired
into HOST *without* the device (a slow REMOTE or SSD load delays no request), then the
device is taken only if it is idle (:meth:`~diffmesh_worker.runner.DeviceSlot.try_background`)
and the pipeline is built with the same :meth:`~diffmesh_worker.loader.Loader.prepare` as a
request; a request that arrives meanwhile waits at most for the component being built
(the build yields before the next one) and the pre-build is tried again once the device is
idle. A component the catalog does not know is logged and its replica skipped until the
next plan version; any other failure is logged and retried after ``retry_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import grpc
from diffmesh.errors import DiffmeshError
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, plan_pb2, worker_pb2

from diffmesh_worker.assemble import BuiltBase
from diffmesh_worker.device_cache import DeviceCache
from diffmesh_worker.loader import Loader, PipelineParts, Yielded
from diffmesh_worker.runner import DeviceSlot

log = logging.getLogger(__name__)


@dataclass
class Replica:
    """A HOT pipeline the plan keeps built on this worker."""

    pipeline_key: str
    parts: PipelineParts
    fused_id: str = ""
    fused_exists: bool = False
    """The overlay is in the catalog (then it is the pre-build's target)."""
    fused_checked: float = -1e9
    """When the catalog was last asked for the overlay (monotonic seconds)."""
    skipped_version: int = 0
    """Plan version under which a component turned out unknown: not tried again until a newer one."""

    def pins(self) -> list[str]:
        """Every component of the replica, the overlay included."""
        ids = self.parts.component_ids()
        return [*ids, self.fused_id] if self.fused_id else ids

    def target(self) -> PipelineParts:
        """What to build: the overlay (with the ControlNets) when it exists, else base, LoRAs and ControlNets."""
        if self.fused_id and self.fused_exists:
            return PipelineParts(self.fused_id, (), self.parts.controlnet_ids)
        return self.parts


class PlanExecutor:
    """Pins and pre-builds this worker's HOT replicas (see the module docstring)."""

    def __init__(
        self,
        node_id: str,
        worker_id: str,
        cache: DeviceCache,
        slot: DeviceSlot,
        loader: Loader,
        coordinator: coordinator_pb2_grpc.CacheCoordinatorServiceStub,
        *,
        retry_s: float,
        timeout_s: float,
    ) -> None:
        self.node_id = node_id
        self.worker_id = worker_id
        self.cache = cache
        self.slot = slot
        self.loader = loader
        self.coordinator = coordinator
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        self.version = 0
        """Version of the last plan applied (0: none)."""
        self.replicas: dict[str, Replica] = {}
        """This worker's replicas under that plan, by pipeline key, most popular first."""
        self.prebuilt = 0
        """Pre-builds that completed."""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts the pre-build loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="plan-executor")

    async def stop(self) -> None:
        """Ends the pre-build loop (a pre-build under way stops at its next await)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def wake(self) -> None:
        """Something changed (the device went idle, the cache changed): look at the replicas again."""
        self._wake.set()

    async def apply(self, plan: plan_pb2.Plan) -> None:
        """Applies ``plan`` unless it is not newer than the last one; pins at once, pre-builds in the background."""
        if plan.version <= self.version:
            log.debug("stale plan ignored", extra={"version": plan.version, "applied": self.version})
            return
        replicas: dict[str, Replica] = {}
        for hot in plan.hot:
            if not any(r.node_id == self.node_id and r.worker_id == self.worker_id for r in hot.replicas):
                continue
            replica = Replica(hot.pipeline_key, PipelineParts.of_spec(hot.pipeline), hot.fused_id)
            old = self.replicas.get(hot.pipeline_key)
            if old is not None and (old.parts, old.fused_id) == (replica.parts, replica.fused_id):
                replica.fused_exists, replica.fused_checked = old.fused_exists, old.fused_checked
            replicas[hot.pipeline_key] = replica
        dropped = [key for key in self.replicas if key not in replicas]
        self.version, self.replicas = plan.version, replicas
        self.cache.set_pins(cid for replica in replicas.values() for cid in replica.pins())
        log.info(
            "plan applied",
            extra={"version": plan.version, "replicas": list(replicas), "dropped": dropped, "pins": sorted(self.cache.pins)},
        )
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.retry_s)
            self._wake.clear()
            try:
                await self.step()
            except Exception:
                # A bug: logged with its traceback; the loop goes on.
                log.exception("executing the plan failed", extra={"version": self.version})

    async def step(self) -> None:
        """Pre-builds the replicas not built yet, most popular first, while the device stays idle."""
        version = self.version
        for replica in list(self.replicas.values()):
            if self.version != version or not self.slot.idle:
                return  # a newer plan, or a request: the next wake-up looks again
            if replica.skipped_version == version:
                continue
            await self._check_overlay(replica)
            target = replica.target()
            if self.built(target):
                continue
            if not await self._prebuild(replica, target, version):
                return  # yielded, or failed: the next wake-up tries again

    def built(self, parts: PipelineParts) -> bool:
        """True when every component of ``parts`` is on the device, the LoRAs loaded into its base."""
        if any(cid not in self.cache for cid in parts.component_ids()):
            return False
        base = self.cache.get(parts.base_id)
        adapters = base.built.adapters if base is not None and isinstance(base.built, BuiltBase) else {}
        return all(lid in adapters for lid in parts.lora_ids)

    async def _check_overlay(self, replica: Replica) -> None:
        """Asks the catalog for the replica's overlay (at most every ``retry_s``) until it is there."""
        if not replica.fused_id or replica.fused_exists or time.monotonic() - replica.fused_checked < self.retry_s:
            return
        replica.fused_checked = time.monotonic()
        try:
            resp = await self.coordinator.GetComponent(
                coordinator_pb2.GetComponentRequest(id=replica.fused_id), timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("catalog lookup of an overlay failed", extra={"fused_id": replica.fused_id, "code": exc.code().name})
            return
        replica.fused_exists = resp.component.kind == common_pb2.COMPONENT_KIND_FUSED

    async def _prebuild(self, replica: Replica, target: PipelineParts, version: int) -> bool:
        """One pre-build attempt; True when the target is built or the replica skipped (go on with the next one)."""
        missing = [cid for cid in dict.fromkeys(target.component_ids()) if cid not in self.cache]
        lease_id = ""
        try:
            if missing:
                # Into HOST first, without the device; this lease keeps the copies there until the build took them.
                lease_id = await self.loader.acquire_ahead(missing)
            ticket = self.slot.try_background()
            if ticket is None:
                return False
            try:
                started = time.perf_counter()
                await self.loader.prepare(target, _ignore, should_yield=lambda: self.slot.requests_waiting)
            finally:
                self.slot.release_background(ticket)
        except Yielded:
            log.info("pre-build yielded to a request", extra={"pipeline_key": replica.pipeline_key})
            return False
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
            if code == grpc.StatusCode.NOT_FOUND:
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                log.warning(
                    "plan names an unknown component; replica skipped",
                    extra={"pipeline_key": replica.pipeline_key, "version": version, "detail": detail},
                )
                replica.skipped_version = version
                return True
            log.warning("pre-build failed", extra={"pipeline_key": replica.pipeline_key, "code": str(code)})
            return False
        except DiffmeshError as exc:
            log.warning(
                "pre-build refused; replica skipped",
                extra={"pipeline_key": replica.pipeline_key, "version": version, "detail": exc.message},
            )
            replica.skipped_version = version
            return True
        finally:
            if lease_id:
                await self.loader.release(lease_id)
        self.prebuilt += 1
        log.info(
            "replica pre-built",
            extra={
                "pipeline_key": replica.pipeline_key,
                "target": target.base_id,
                "seconds": round(time.perf_counter() - started, 3),
            },
        )
        return True


def _ignore(_event: worker_pb2.RunResponse) -> None:
    """Progress of a pre-build goes nowhere (no client)."""
