"""Making a request's pipeline ready on the device.

Components already built on the device are used as they are (tier GPU). The others come
ONLY from ``InstanceManager.Acquire`` (one call for all of them, holder = this worker):
their HOST-tier handles are checked (kind, family against the base), mapped zero-copy
and built in the device thread, base first, then ControlNets, then LoRA adapters (their
meta skeletons come from the worker's :class:`~diffmesh_worker.skeletons.SkeletonPool`). Each
component gets a ``worker.load.component`` span, a ``ProgressLoading`` event and a
``ComponentLoad`` entry. New entries join the device cache (their residency is reported),
and least recently used ones are evicted to make room (their leases released).

A FUSED overlay as ``base_id`` runs instead of runtime adapters: its handle names its base
(``base_id``), which is acquired too (a second Acquire when the overlay was not cached)
and built first; the overlay's UNet shares every base tensor and swaps in its own
(:func:`~diffmesh_worker.overlay_reader.build_fused`). Both are cached, the overlay under its own
id, and both appear in the loads (overlay first). Runtime LoRAs may still be added on top.

Loading is not interrupted when the client goes away: one Acquire lease covers all the
components it fetched, so a half-built set could not be released cleanly, and the built
modules are warm state for the next request anyway. Denoising is what stops.
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
from diffmesh_worker.runner import PipelineModules
from diffmesh_worker.shm_mapping import SegmentMapper
from diffmesh_worker.skeletons import SkeletonPool
from diffmesh_worker.validation import Job

log = logging.getLogger(__name__)
_tracer = tracer("diffmesh_worker")


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


class Loader:
    """Ensures the components of a job are built on the device (see the module docstring)."""

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

    async def release_removed(self, removed: Removed) -> None:
        """Reports evicted components gone and releases leases no cached component needs."""
        self.report(False, removed.components)
        for lease_id in removed.leases:
            await self.release(lease_id)
        if removed.components:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    async def release(self, lease_id: str) -> None:
        """Ends an instance-manager lease; failures are logged (the IM also expires holders)."""
        try:
            await self.im.Release(instance_manager_pb2.ReleaseRequest(lease_id=lease_id), timeout=10)
        except aio.AioRpcError as exc:
            log.warning("release failed", extra={"lease_id": lease_id, "code": exc.code().name, "detail": exc.details()})

    def _needs(self, job: Job, fused_base: str | None = None) -> list[_Need]:
        needs = [_Need(job.base_id, common_pb2.COMPONENT_KIND_BASE, "pipeline.base_id")]
        if fused_base is not None:
            needs = [
                _Need(job.base_id, common_pb2.COMPONENT_KIND_FUSED, "pipeline.base_id"),
                _Need(fused_base, common_pb2.COMPONENT_KIND_BASE, "pipeline.base_id"),
            ]
        needs += [_Need(lid, common_pb2.COMPONENT_KIND_LORA, f"pipeline.loras[{i}].id") for i, (lid, _) in enumerate(job.loras)]
        needs += [
            _Need(c.id, common_pb2.COMPONENT_KIND_CONTROLNET, f"pipeline.controlnets[{i}].id")
            for i, c in enumerate(job.controlnets)
        ]
        return needs

    @staticmethod
    def _check(need: _Need, kind: int, family: str, base_family: str) -> None:
        if (
            need.field == "pipeline.base_id"
            and need.kind == common_pb2.COMPONENT_KIND_BASE
            and kind == common_pb2.COMPONENT_KIND_FUSED
        ):
            return  # an overlay may stand where a base does
        if kind != need.kind:
            raise InvalidArgument(
                need.field, f"{need.component_id!r} is a {kind_name(kind)}, expected a {kind_name(need.kind)}"
            )
        if need.kind not in (common_pb2.COMPONENT_KIND_BASE, common_pb2.COMPONENT_KIND_FUSED) and family != base_family:
            raise InvalidArgument(need.field, f"{need.component_id!r} is family {family!r} but the base is {base_family!r}")

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

    async def _acquire(
        self, ids: list[str], handles: dict[str, instance_manager_pb2.HostHandle], leases: dict[str, AcquireLease]
    ) -> float:
        """One Acquire for ``ids``: adds their handles and leases; returns its seconds."""
        started = time.perf_counter()
        resp = await self.im.Acquire(
            instance_manager_pb2.AcquireRequest(component_ids=ids, holder=self.worker_id), timeout=self.acquire_timeout_s
        )
        lease = AcquireLease(resp.lease_id)
        for h in resp.handles:
            handles[h.component_id] = h
            leases[h.component_id] = lease
        return time.perf_counter() - started

    async def prepare(self, job: Job, emit: Callable[[worker_pb2.RunResponse], None]) -> LoadedPipeline:
        """Makes every component of ``job`` ready on the device; returns the modules and the loads."""
        handles: dict[str, instance_manager_pb2.HostHandle] = {}
        leases: dict[str, AcquireLease] = {}
        acquire_s = 0.0
        try:
            fused_base = self._fused_base(job.base_id, handles)
            needs = self._needs(job, fused_base)
            missing = [n.component_id for n in needs if n.component_id not in self.cache]
            if missing:
                acquire_s += await self._acquire(missing, handles, leases)
            if fused_base is None:
                fused_base = self._fused_base(job.base_id, handles)
                if fused_base is not None:  # the overlay was not cached: its base comes now
                    needs = self._needs(job, fused_base)
                    if fused_base not in self.cache and fused_base not in handles:
                        acquire_s += await self._acquire([fused_base], handles, leases)
            pinned = {n.component_id for n in needs}
            return await self._build_all(job, needs, pinned, handles, leases, acquire_s, emit)
        finally:
            for lease_id in dict.fromkeys(lease.lease_id for lease in leases.values() if not lease.holding):
                await self.release(lease_id)

    def _identity(self, cid: str, handles: dict[str, instance_manager_pb2.HostHandle]) -> tuple[int, str]:
        entry = self.cache.get(cid)
        if entry is not None:
            return entry.kind, entry.family
        handle = handles.get(cid)
        if handle is None:
            raise FailedPrecondition(f"instance manager returned no handle for {cid!r}")
        return handle.kind, handle.family

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _build_all(
        self,
        job: Job,
        needs: list[_Need],
        pinned: set[str],
        handles: dict[str, instance_manager_pb2.HostHandle],
        leases: dict[str, AcquireLease],
        acquire_s: float,
        emit: Callable[[worker_pb2.RunResponse], None],
    ) -> LoadedPipeline:
        fused = needs[0].kind == common_pb2.COMPONENT_KIND_FUSED
        base_need = needs[1] if fused else needs[0]
        base_id = base_need.component_id
        base_kind, base_family = self._identity(job.base_id, handles)
        for need in needs:
            kind, family = self._identity(need.component_id, handles)
            if fused and need is base_need and kind != common_pb2.COMPONENT_KIND_BASE:
                raise FailedPrecondition(f"overlay {job.base_id!r} applies to {base_id!r}, a {kind_name(kind)}")
            if fused and need is base_need and family != base_family:
                raise FailedPrecondition(f"overlay {job.base_id!r} is family {base_family!r}, its base {base_id!r} {family!r}")
            self._check(need, kind, family, base_family)

        incoming = [handles[cid] for cid in handles if cid not in self.cache]
        await self.release_removed(self.cache.evict_for(sum(h.bytes for h in incoming), len(incoming), pinned))

        loads: dict[str, common_pb2.ComponentLoad] = {}
        # Acquire's time is shared among the components it fetched, by their own load time.
        host_share = {cid: h.load_seconds for cid, h in handles.items()}
        scale = acquire_s / sum(host_share.values()) if sum(host_share.values()) > 0 else 0.0

        async def component(need: _Need, fn: Callable[[], Any] | None) -> Any:
            handle = handles.get(need.component_id)
            entry = self.cache.get(need.component_id)
            tier = handle.source_tier if handle is not None else common_pb2.TIER_GPU
            nbytes = handle.bytes if handle is not None else 0
            if handle is None and fn is not None:  # cached LoRA weights, newly loaded into this base
                tier, nbytes = common_pb2.TIER_HOST, entry.bytes if entry else 0
            emit(
                worker_pb2.RunResponse(
                    loading=common_pb2.ProgressLoading(component_id=need.component_id, source_tier=tier, bytes=nbytes)
                )
            )
            started = time.perf_counter()
            with _tracer.start_as_current_span("worker.load.component") as span:
                span.set_attribute("component_id", need.component_id)
                span.set_attribute("source_tier", common_pb2.Tier.Name(tier))
                span.set_attribute("bytes", nbytes)
                result = await self._run(fn) if fn is not None else None
            seconds = time.perf_counter() - started + host_share.get(need.component_id, 0.0) * scale
            loads[need.component_id] = common_pb2.ComponentLoad(
                component_id=need.component_id,
                kind=need.kind,  # type: ignore[arg-type]
                source_tier=tier,
                bytes=nbytes,
                seconds=seconds,
            )
            return result

        def add(cid: str, kind: int, family: str, nbytes: int, built: Any) -> None:
            self.cache.add(CacheEntry(cid, kind, family, nbytes, built, leases.get(cid)))
            self.report(True, [(cid, nbytes)])

        # Base first: LoRAs load into it (or into the overlay built over it).
        if base_id in handles:
            build = partial(build_base, self.mapper, handles[base_id], self.placement, self.skeletons)
            built_base: BuiltBase = await component(base_need, build)
            add(base_id, common_pb2.COMPONENT_KIND_BASE, built_base.family, built_base.bytes, built_base)
        else:
            await component(base_need, None)
        base_entry = self.cache.get(base_id)
        assert base_entry is not None and isinstance(base_entry.built, BuiltBase)
        base = base_entry.built
        if fused:
            if job.base_id in handles:
                fused_handle = handles[job.base_id]
                fuse = partial(overlay_reader.build_fused, self.mapper, base, fused_handle, self.placement, self.skeletons)
                built_fused: BuiltBase = await component(needs[0], fuse)
                add(job.base_id, base_kind, base_family, built_fused.bytes, built_fused)
            else:
                await component(needs[0], None)
            fused_entry = self.cache.get(job.base_id)
            assert fused_entry is not None and isinstance(fused_entry.built, BuiltBase)
            base = fused_entry.built

        controlnets: list[BuiltControlNet] = []
        for need in needs:
            if need.kind != common_pb2.COMPONENT_KIND_CONTROLNET:
                continue
            cid = need.component_id
            if cid in handles:
                built_cn: BuiltControlNet = await component(
                    need, partial(build_controlnet, self.mapper, handles[cid], self.placement, self.skeletons)
                )
                add(cid, common_pb2.COMPONENT_KIND_CONTROLNET, base_family, built_cn.bytes, built_cn)
            else:
                await component(need, None)
            cn_entry = self.cache.get(cid)
            assert cn_entry is not None and isinstance(cn_entry.built, BuiltControlNet)
            controlnets.append(cn_entry.built)

        for need in needs:
            if need.kind != common_pb2.COMPONENT_KIND_LORA:
                continue
            cid = need.component_id
            if cid in handles:
                handle = handles[cid]

                def load_new(handle: instance_manager_pb2.HostHandle = handle) -> LoraWeights:
                    weights = LoraWeights(adapters.lora_state_dict(self.mapper, handle), adapters.lora_metadata(handle))
                    adapters.load_adapter(base, handle.component_id, weights.state, weights.metadata, self.placement)
                    return weights

                weights: LoraWeights = await component(need, load_new)
                add(cid, common_pb2.COMPONENT_KIND_LORA, base_family, handle.bytes, weights)
            elif cid not in base.adapters:
                lora_entry = self.cache.get(cid)
                assert lora_entry is not None and isinstance(lora_entry.built, LoraWeights)
                cached = lora_entry.built
                await component(need, partial(adapters.load_adapter, base, cid, cached.state, cached.metadata, self.placement))
            else:
                await component(need, None)

        self.cache.touch([n.component_id for n in needs])
        return LoadedPipeline(PipelineModules(base, controlnets), [loads[n.component_id] for n in needs])
