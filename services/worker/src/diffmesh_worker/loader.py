"""Making a request's pipeline ready on the device.

Components already built on the device are used as they are (tier GPU). The others come
ONLY from ``InstanceManager.Acquire`` (holder = this worker), in two calls made at once,
each with its own lease: one for the base, one for the LoRAs and ControlNets. The base is
built as soon as its HOST handle is ready, while the adapters are still being acquired
(asymmetric build: a base from REMOTE no longer waits for the slowest LoRA, and a slow
LoRA no longer delays the base's build); the pipeline is assembled when both are ready:
ControlNets, then LoRA adapters loaded into the base. Handles are checked (kind, family
against the base), mapped zero-copy and built in the device thread (their meta skeletons
come from the worker's :class:`~diffmesh_worker.skeletons.SkeletonPool`). Each Acquire gets
a ``worker.acquire`` span, each component a ``worker.load.component`` span, a
``ProgressLoading`` event and a ``ComponentLoad`` entry. New entries join the device
cache (their residency is reported); entries the cache's eviction policy picks make room
(their leases released). Leases that no cached component relies on — e.g. after a
failure — are released before :meth:`Loader.prepare` returns or raises.

A FUSED overlay as ``base_id`` runs instead of runtime adapters: its handle names its base
(``base_id``), which is acquired too (a second Acquire when the overlay was not cached)
and built first; the overlay's UNet shares every base tensor and swaps in its own
(:func:`~diffmesh_worker.overlay_reader.build_fused`). Both are cached, the overlay under its own
id, and both appear in the loads (overlay first). Runtime LoRAs may still be added on top.

Loading is not interrupted when the client goes away: the built modules are warm state
for the next request anyway. Denoising is what stops. Background work (the plan's
pre-builds, :mod:`diffmesh_worker.plan_executor`) is different: it gives the device up
before any component build once a request waits (:class:`Yielded`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from diffmesh.catalog import kind_name
from diffmesh.errors import FailedPrecondition, InvalidArgument
from diffmesh.telemetry import tracer
from diffmesh.v1 import common_pb2, instance_manager_pb2, instance_manager_pb2_grpc, worker_pb2
from grpc import aio

from diffmesh_worker import adapters, overlay_reader
from diffmesh_worker.assemble import BuiltBase, BuiltControlNet, DevicePlacement, build_base, build_controlnet
from diffmesh_worker.device_cache import AcquireLease, CacheEntry, DeviceCache, LoraWeights, Removed
from diffmesh_worker.device_eviction import DeviceUsage
from diffmesh_worker.runner import PipelineModules
from diffmesh_worker.shm_mapping import SegmentMapper
from diffmesh_worker.skeletons import SkeletonPool
from diffmesh_worker.validation import Job

ShouldYield = Callable[[], bool]
"""Asked by background work before each component build: True when a request waits for the device."""

log = logging.getLogger(__name__)
_tracer = tracer("diffmesh_worker")


@dataclass(frozen=True)
class PipelineParts:
    """The components a pipeline needs, by id (scales and conditioning images do not matter for loading)."""

    base_id: str
    lora_ids: tuple[str, ...] = ()
    controlnet_ids: tuple[str, ...] = ()

    @classmethod
    def of_job(cls, job: Job) -> PipelineParts:
        """The parts of a validated request."""
        return cls(job.base_id, tuple(lid for lid, _ in job.loras), tuple(c.id for c in job.controlnets))

    @classmethod
    def of_spec(cls, spec: common_pb2.PipelineSpec) -> PipelineParts:
        """The parts of a pipeline spec (a plan's)."""
        return cls(spec.base_id, tuple(ref.id for ref in spec.loras), tuple(ref.id for ref in spec.controlnets))

    def component_ids(self) -> list[str]:
        """Base first, then LoRAs, then ControlNets."""
        return [self.base_id, *self.lora_ids, *self.controlnet_ids]


class Yielded(Exception):
    """Background work gave the device up to a waiting request; what it built stays cached."""


@dataclass
class LoadedPipeline:
    """A request's pipeline ready on the device, and how each component got ready."""

    modules: PipelineModules
    loads: list[common_pb2.ComponentLoad] = field(default_factory=list)


@dataclass
class _Need:
    component_id: str
    kind: int
    field: str  # request field naming it, for errors


def check_need(need: _Need, kind: int, family: str, base_family: str) -> None:
    """INVALID_ARGUMENT naming the field when a component's kind or family does not fit where the request put it."""
    if (
        need.field == "pipeline.base_id"
        and need.kind == common_pb2.COMPONENT_KIND_BASE
        and kind == common_pb2.COMPONENT_KIND_FUSED
    ):
        return  # an overlay may stand where a base does
    if kind != need.kind:
        raise InvalidArgument(need.field, f"{need.component_id!r} is a {kind_name(kind)}, expected a {kind_name(need.kind)}")
    if need.kind not in (common_pb2.COMPONENT_KIND_BASE, common_pb2.COMPONENT_KIND_FUSED) and family != base_family:
        raise InvalidArgument(need.field, f"{need.component_id!r} is family {family!r} but the base is {base_family!r}")


class Loader:
    """Ensures the components of a pipeline are built on the device (see the module docstring)."""

    def __init__(
        self,
        im: instance_manager_pb2_grpc.InstanceManagerServiceStub,
        cache: DeviceCache,
        mapper: SegmentMapper,
        placement: DevicePlacement,
        executor: Executor,
        worker_id: str,
        report: Callable[[bool, list[tuple[str, int]]], None],
        acquire_timeout_s: float,
        skeletons: SkeletonPool | None = None,
        usage: DeviceUsage | None = None,
    ) -> None:
        self.im = im
        self.cache = cache
        self.mapper = mapper
        self.placement = placement
        self.executor = executor
        self.worker_id = worker_id
        self.report = report
        self.acquire_timeout_s = acquire_timeout_s
        self.skeletons = skeletons
        self.usage = usage

    async def release_removed(self, removed: Removed) -> None:
        """Reports evicted components gone and releases leases no cached component needs."""
        self.report(False, removed.components)
        for lease_id in removed.leases:
            await self.release(lease_id)
        if removed.components:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    async def acquire_ahead(self, ids: list[str]) -> str:
        """Brings ``ids`` into HOST without building anything; returns the lease to :meth:`release` once built."""
        with _tracer.start_as_current_span("worker.acquire", attributes={"component_ids": ids}):
            resp = await self.im.Acquire(
                instance_manager_pb2.AcquireRequest(component_ids=ids, holder=self.worker_id), timeout=self.acquire_timeout_s
            )
        return str(resp.lease_id)

    async def release(self, lease_id: str) -> None:
        """Ends an instance-manager lease; failures are logged (the IM also expires holders)."""
        try:
            await self.im.Release(instance_manager_pb2.ReleaseRequest(lease_id=lease_id), timeout=10)
        except aio.AioRpcError as exc:
            log.warning("release failed", extra={"lease_id": lease_id, "code": exc.code().name, "detail": exc.details()})

    @staticmethod
    def _base_needs(parts: PipelineParts, fused_base: str | None) -> list[_Need]:
        if fused_base is None:
            return [_Need(parts.base_id, common_pb2.COMPONENT_KIND_BASE, "pipeline.base_id")]
        return [
            _Need(parts.base_id, common_pb2.COMPONENT_KIND_FUSED, "pipeline.base_id"),
            _Need(fused_base, common_pb2.COMPONENT_KIND_BASE, "pipeline.base_id"),
        ]

    @staticmethod
    def _adapter_needs(parts: PipelineParts) -> list[_Need]:
        needs = [_Need(lid, common_pb2.COMPONENT_KIND_LORA, f"pipeline.loras[{i}].id") for i, lid in enumerate(parts.lora_ids)]
        needs += [
            _Need(cid, common_pb2.COMPONENT_KIND_CONTROLNET, f"pipeline.controlnets[{i}].id")
            for i, cid in enumerate(parts.controlnet_ids)
        ]
        return needs

    def _fused_base(self, cid: str, handles: dict[str, instance_manager_pb2.HostHandle]) -> str | None:
        """The base a FUSED ``cid`` applies to (from its cache entry or handle); None when ``cid`` is no overlay."""
        entry = self.cache.get(cid)
        if entry is not None:
            if isinstance(entry.built, BuiltBase) and entry.built.base_id:
                return entry.built.base_id
            return None
        handle = handles.get(cid)
        if handle is None or handle.kind != common_pb2.COMPONENT_KIND_FUSED:
            return None
        if not handle.base_id:
            raise FailedPrecondition(f"overlay {cid!r} names no base")
        return handle.base_id

    async def _acquire(self, ids: list[str], got: _Acquired) -> None:
        """One Acquire for ``ids``: adds their handles, its lease and each handle's share of its seconds."""
        started = time.perf_counter()
        with _tracer.start_as_current_span("worker.acquire", attributes={"component_ids": ids}):
            resp = await self.im.Acquire(
                instance_manager_pb2.AcquireRequest(component_ids=ids, holder=self.worker_id), timeout=self.acquire_timeout_s
            )
        seconds = time.perf_counter() - started
        lease = AcquireLease(resp.lease_id)
        got.leases.append(lease)
        # The call's time is shared among the components it fetched, by their own load time.
        total = sum(h.load_seconds for h in resp.handles)
        for h in resp.handles:
            got.handles[h.component_id] = h
            got.lease_of[h.component_id] = lease
            got.acquire_s[h.component_id] = seconds * h.load_seconds / total if total > 0 else 0.0

    async def prepare(
        self,
        parts: PipelineParts,
        emit: Callable[[worker_pb2.RunResponse], None],
        should_yield: ShouldYield | None = None,
    ) -> LoadedPipeline:
        """Makes every component of ``parts`` ready on the device; returns the modules and the loads.

        ``should_yield`` marks background work: it is asked before every component build
        (:class:`Yielded` when it says so) and the work does not count as a use of the
        components (their reuse rates are requests').
        """
        got = _Acquired()
        adapter_needs = self._adapter_needs(parts)
        adapter_missing = list(dict.fromkeys(n.component_id for n in adapter_needs if n.component_id not in self.cache))
        # The adapters' Acquire runs while the base is acquired and built.
        adapters = asyncio.ensure_future(self._acquire(adapter_missing, got)) if adapter_missing else None
        try:
            base_needs = await self._acquire_base(parts, got)
            needs = base_needs + adapter_needs
            ids = [n.component_id for n in needs]
            if should_yield is None and self.usage is not None:
                self.usage.record(ids, time.time())
            build = _Build(self, parts, needs, got, emit, should_yield)
            await build.base(base_needs)
            if adapters is not None:
                await adapters
            await build.adapters(adapter_needs)
            self.cache.touch(ids)
            return LoadedPipeline(PipelineModules(build.built_base, build.controlnets), [build.loads[cid] for cid in ids])
        finally:
            if adapters is not None and not adapters.done():
                # Its lease must be known before leases are released: wait for it, even on failure.
                await asyncio.wait([adapters])
            if adapters is not None and adapters.done() and not adapters.cancelled():
                adapters.exception()  # retrieved: raised above when it mattered
            for lease in got.leases:
                if not lease.holding:
                    await self.release(lease.lease_id)

    async def _acquire_base(self, parts: PipelineParts, got: _Acquired) -> list[_Need]:
        """Acquires the base (or overlay, then its base) unless cached; returns the base-side needs."""
        fused_base = self._fused_base(parts.base_id, got.handles)
        missing = [cid for cid in (parts.base_id, fused_base) if cid is not None and cid not in self.cache]
        if missing:
            await self._acquire(missing, got)
        if fused_base is None:
            fused_base = self._fused_base(parts.base_id, got.handles)
            if fused_base is not None and fused_base not in self.cache and fused_base not in got.handles:
                await self._acquire([fused_base], got)  # the overlay was not cached: its base comes now
        return self._base_needs(parts, fused_base)

    def identity(self, cid: str, handles: dict[str, instance_manager_pb2.HostHandle]) -> tuple[int, str]:
        """(kind, family) of ``cid`` from its cache entry, else from its new handle."""
        entry = self.cache.get(cid)
        if entry is not None:
            return entry.kind, entry.family
        handle = handles.get(cid)
        if handle is None:
            raise FailedPrecondition(f"instance manager returned no handle for {cid!r}")
        return handle.kind, handle.family

    async def run_on_device(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs ``fn`` in the device thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


@dataclass
class _Acquired:
    """What a :meth:`Loader.prepare`'s Acquire calls returned so far."""

    handles: dict[str, instance_manager_pb2.HostHandle] = field(default_factory=dict)
    lease_of: dict[str, AcquireLease] = field(default_factory=dict)
    leases: list[AcquireLease] = field(default_factory=list)
    acquire_s: dict[str, float] = field(default_factory=dict)


class _Build:
    """Building one pipeline's components, base side first, then the adapters (see :meth:`Loader.prepare`)."""

    def __init__(
        self,
        loader: Loader,
        parts: PipelineParts,
        needs: list[_Need],
        got: _Acquired,
        emit: Callable[[worker_pb2.RunResponse], None],
        should_yield: ShouldYield | None,
    ) -> None:
        self.loader = loader
        self.cache = loader.cache
        self.parts = parts
        self.protected = {n.component_id for n in needs}
        self.got = got
        self.emit = emit
        self.should_yield = should_yield
        self.loads: dict[str, common_pb2.ComponentLoad] = {}
        self.base_family = ""
        self.controlnets: list[BuiltControlNet] = []
        self._base: BuiltBase | None = None

    @property
    def built_base(self) -> BuiltBase:
        """The base (or overlay) the adapters load into; set by :meth:`base`."""
        assert self._base is not None
        return self._base

    async def _make_room(self, needs: list[_Need]) -> None:
        handles = self.got.handles
        ids = dict.fromkeys(n.component_id for n in needs)
        incoming = [handles[cid] for cid in ids if cid in handles and cid not in self.cache]
        removed = self.cache.evict_for(sum(h.bytes for h in incoming), len(incoming), self.protected)
        await self.loader.release_removed(removed)

    def _add(self, cid: str, kind: int, family: str, nbytes: int, built: Any) -> None:
        self.cache.add(CacheEntry(cid, kind, family, nbytes, built, self.got.lease_of.get(cid)))
        self.loader.report(True, [(cid, nbytes)])

    async def _component(self, need: _Need, fn: Callable[[], Any] | None, fresh: bool) -> Any:
        """Runs ``fn`` (None: already built) for one component, with its event, span and load entry.

        ``fresh``: built from its new HOST handle (else from the device tier).
        """
        handle = self.got.handles.get(need.component_id) if fresh else None
        entry = self.cache.get(need.component_id)
        tier = handle.source_tier if handle is not None else common_pb2.TIER_GPU
        nbytes = handle.bytes if handle is not None else 0
        if handle is None and fn is not None:  # cached LoRA weights, newly loaded into this base
            tier, nbytes = common_pb2.TIER_HOST, entry.bytes if entry else 0
        if fn is not None and self.should_yield is not None and self.should_yield():
            raise Yielded()
        loading = common_pb2.ProgressLoading(component_id=need.component_id, source_tier=tier, bytes=nbytes)
        self.emit(worker_pb2.RunResponse(loading=loading))
        started = time.perf_counter()
        attributes: dict[str, str | int] = {
            "component_id": need.component_id,
            "source_tier": common_pb2.Tier.Name(tier),
            "bytes": nbytes,
        }
        with _tracer.start_as_current_span("worker.load.component", attributes=attributes):
            result = await self.loader.run_on_device(fn) if fn is not None else None
        built_s = time.perf_counter() - started
        if handle is not None and fn is not None and self.loader.usage is not None:
            self.loader.usage.observe_build(nbytes, built_s)
        self.loads[need.component_id] = common_pb2.ComponentLoad(
            component_id=need.component_id,
            kind=need.kind,  # type: ignore[arg-type]
            source_tier=tier,
            bytes=nbytes,
            seconds=built_s + self.got.acquire_s.get(need.component_id, 0.0),
        )
        return result

    async def base(self, base_needs: list[_Need]) -> None:
        """Checks and builds the base (and the overlay over it) as soon as their handles are there."""
        handles, mapper, placement, skeletons = self.got.handles, self.loader.mapper, self.loader.placement, self.loader.skeletons
        fused = base_needs[0].kind == common_pb2.COMPONENT_KIND_FUSED
        base_need = base_needs[-1]
        base_id, first_id = base_need.component_id, self.parts.base_id
        first_kind, self.base_family = self.loader.identity(first_id, handles)
        for need in base_needs:
            kind, family = self.loader.identity(need.component_id, handles)
            if fused and need is base_need and kind != common_pb2.COMPONENT_KIND_BASE:
                raise FailedPrecondition(f"overlay {first_id!r} applies to {base_id!r}, a {kind_name(kind)}")
            if fused and need is base_need and family != self.base_family:
                raise FailedPrecondition(f"overlay {first_id!r} is family {self.base_family!r}, its base {base_id!r} {family!r}")
            check_need(need, kind, family, self.base_family)
        await self._make_room(base_needs)

        # Base first: LoRAs load into it (or into the overlay built over it).
        if base_id not in self.cache:
            build = partial(build_base, mapper, handles[base_id], placement, skeletons)
            built_base: BuiltBase = await self._component(base_need, build, fresh=True)
            self._add(base_id, common_pb2.COMPONENT_KIND_BASE, built_base.family, built_base.bytes, built_base)
        else:
            await self._component(base_need, None, fresh=False)
        base_entry = self.cache.get(base_id)
        assert base_entry is not None and isinstance(base_entry.built, BuiltBase)
        self._base = base_entry.built
        if fused:
            if first_id not in self.cache:
                fuse = partial(overlay_reader.build_fused, mapper, self._base, handles[first_id], placement, skeletons)
                built_fused: BuiltBase = await self._component(base_needs[0], fuse, fresh=True)
                self._add(first_id, first_kind, self.base_family, built_fused.bytes, built_fused)
            else:
                await self._component(base_needs[0], None, fresh=False)
            fused_entry = self.cache.get(first_id)
            assert fused_entry is not None and isinstance(fused_entry.built, BuiltBase)
            self._base = fused_entry.built

    async def adapters(self, adapter_needs: list[_Need]) -> None:
        """Checks the acquired LoRAs and ControlNets against the base, builds ControlNets, loads LoRA adapters."""
        handles, mapper, placement, skeletons = self.got.handles, self.loader.mapper, self.loader.placement, self.loader.skeletons
        for need in adapter_needs:
            kind, family = self.loader.identity(need.component_id, handles)
            check_need(need, kind, family, self.base_family)
        await self._make_room(adapter_needs)
        base = self.built_base

        for need in adapter_needs:
            if need.kind != common_pb2.COMPONENT_KIND_CONTROLNET:
                continue
            cid = need.component_id
            if cid not in self.cache:
                built_cn: BuiltControlNet = await self._component(
                    need, partial(build_controlnet, mapper, handles[cid], placement, skeletons), fresh=True
                )
                self._add(cid, common_pb2.COMPONENT_KIND_CONTROLNET, self.base_family, built_cn.bytes, built_cn)
            else:
                await self._component(need, None, fresh=False)
            cn_entry = self.cache.get(cid)
            assert cn_entry is not None and isinstance(cn_entry.built, BuiltControlNet)
            self.controlnets.append(cn_entry.built)

        for need in adapter_needs:
            if need.kind != common_pb2.COMPONENT_KIND_LORA:
                continue
            cid = need.component_id
            if cid not in self.cache:
                handle = handles[cid]

                def load_new(handle: instance_manager_pb2.HostHandle = handle) -> LoraWeights:
                    weights = LoraWeights(adapters.lora_state_dict(mapper, handle), adapters.lora_metadata(handle))
                    adapters.load_adapter(base, handle.component_id, weights.state, weights.metadata, placement)
                    return weights

                weights: LoraWeights = await self._component(need, load_new, fresh=True)
                self._add(cid, common_pb2.COMPONENT_KIND_LORA, self.base_family, handle.bytes, weights)
            elif cid not in base.adapters:
                lora_entry = self.cache.get(cid)
                assert lora_entry is not None and isinstance(lora_entry.built, LoraWeights)
                cached = lora_entry.built
                load = partial(adapters.load_adapter, base, cid, cached.state, cached.metadata, placement)
                await self._component(need, load, fresh=False)
            else:
                await self._component(need, None, fresh=False)
