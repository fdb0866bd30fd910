"""The component store: REMOTE → SSD → HOST with single-flight loads, capacity and leases.

All state lives on the event loop; file and shared-memory work runs in threads
(``asyncio.to_thread``). A load is a task keyed by (tier, component id) that callers
await through ``asyncio.shield``, so concurrent requests share one fetch and a caller
that goes away does not abort a load others wait for.

Capacity: before an SSD copy is made its bytes are reserved; when the tier would
overflow, the eviction policy (the shared utility policy, see :mod:`.eviction`) picks
among copies that are neither being read nor pinned by the hot plan. The HOST tier is a
pre-allocated pool of size-class blocks when bounded (:mod:`.pool`): when no block of a
fitting class is free, the lowest-utility copy of such a class that no lease holds and
the hot plan does not pin is evicted and its block reused. When nothing can be evicted,
the request fails with RESOURCE_EXHAUSTED and a retry hint.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffmesh.artifacts import TENSOR_SUFFIX, artifact_bytes, artifact_sha256
from diffmesh.catalog import check_id
from diffmesh.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from diffmesh.pipeline_key import SCALE_DECIMALS, canonical_key
from diffmesh.telemetry import tracer
from diffmesh.v1 import common_pb2, coordinator_pb2, instance_manager_pb2
from grpc import StatusCode, aio

from diffmesh_instance_manager.eviction import Candidate, EvictionPolicy, Popularity, UtilityPolicy
from diffmesh_instance_manager.host import (
    BufferedLoader,
    ComponentPlan,
    FileLoader,
    HostAllocator,
    HostBlock,
    HostEntry,
    materialize,
    plan_component,
    to_handle,
)
from diffmesh_instance_manager.leases import Lease, LeaseTable
from diffmesh_instance_manager.pool import HostPool, PoolBlock, PoolExhausted
from diffmesh_instance_manager.remote import Fetcher, RemoteAccess, RemoteFetcher
from diffmesh_instance_manager.ssd import SsdCache, SsdEntry, entry_name

log = logging.getLogger("diffmesh.im.store")
_tracer = tracer("diffmesh.instance_manager")

SSD = common_pb2.TIER_SSD
HOST = common_pb2.TIER_HOST
REMOTE = common_pb2.TIER_REMOTE
FUSED = common_pb2.COMPONENT_KIND_FUSED
MAX_IDS = 16
MAX_FUSE_LORAS = 8
MAX_LORA_SCALE = 4.0
FUSE_HOLDER = "im:fuse"
#: Label of a FUSED record: its LoRA set, ``[{"id", "scale"}…]`` as canonical JSON.
LORAS_LABEL = "diffmesh.loras"
#: Bandwidths assumed for reload costs before this node has measured its own (bytes/s).
DEFAULT_REMOTE_BPS = 0.2e9
DEFAULT_SSD_BPS = 1.0e9


def tier_name(tier: int) -> str:
    """``TIER_HOST`` etc."""
    return common_pb2.Tier.Name(tier)  # type: ignore[arg-type]


Record = common_pb2.Component
RecordLookup = Callable[[str], Awaitable[Record]]
RecordRegister = Callable[[Record], Awaitable[Record]]
ResidencyListener = Callable[[coordinator_pb2.ResidencyUpdate], None]


@dataclass
class TierCounters:
    """Counters of one tier since start."""

    hits: int = 0
    misses: int = 0
    loaded_bytes: int = 0
    load_seconds: float = 0.0
    evicted_bytes: int = 0

    def bandwidth(self, default: float) -> float:
        """Measured load bandwidth in bytes/s (``default`` before the first load)."""
        return self.loaded_bytes / self.load_seconds if self.load_seconds > 0 and self.loaded_bytes > 0 else default


class ComponentStore:
    """SSD and HOST tiers of one node."""

    def __init__(
        self,
        *,
        ssd: SsdCache,
        ssd_capacity: int,
        host_capacity: int,
        allocator: HostAllocator,
        remote: RemoteAccess,
        lookup: RecordLookup | None,
        fetcher: Fetcher | None = None,
        loader: FileLoader | None = None,
        ssd_policy: EvictionPolicy | None = None,
        host_policy: EvictionPolicy | None = None,
        config_cap: int = 16 * 1024 * 1024,
        retry_after_s: float = 2.0,
        pinned: set[str] | None = None,
        lease_ttl_s: float = 0.0,
        register: RecordRegister | None = None,
    ) -> None:
        self.ssd = ssd
        self.ssd_capacity = ssd_capacity
        self.host_capacity = host_capacity
        self.allocator = allocator
        self.remote = remote
        self.lookup = lookup
        self.fetcher: Fetcher = fetcher or RemoteFetcher()
        self.loader: FileLoader = loader or BufferedLoader()
        self.pool: HostPool | None = allocator if isinstance(allocator, HostPool) else None
        self.pinned: set[str] = set(pinned or ())
        self.popularity = Popularity()
        self.ssd_policy: EvictionPolicy = ssd_policy or UtilityPolicy(self.popularity, self._ssd_reload_s, self.pinned)
        self.host_policy: EvictionPolicy = host_policy or UtilityPolicy(self.popularity, self._host_reload_s, self.pinned)
        self.config_cap = config_cap
        self.retry_after_s = retry_after_s
        self.register = register
        self.ssd_entries: dict[str, SsdEntry] = {}
        self.host_entries: dict[str, HostEntry] = {}
        self.leases = LeaseTable(lease_ttl_s)
        self._fusing: dict[str, asyncio.Task[tuple[Record, bool]]] = {}
        self.counters: dict[int, TierCounters] = {SSD: TierCounters(), HOST: TierCounters()}
        self.listeners: list[ResidencyListener] = []
        self._reserved: dict[int, int] = {SSD: 0, HOST: 0}
        self._ssd_readers: Counter[str] = Counter()
        self._inflight: dict[tuple[int, str], asyncio.Task[int]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._index_seq = 0

    # ---- lifecycle -------------------------------------------------------------------

    def use_pool(self, pool: HostPool, loader: FileLoader) -> None:
        """Makes ``pool`` the HOST tier (before the first load): its size classes bound the tier."""
        if self.host_entries:
            raise RuntimeError("the HOST pool must be installed before anything is loaded")
        self.allocator = pool
        self.pool = pool
        self.loader = loader
        self.host_capacity = pool.capacity_bytes

    def set_pinned(self, component_ids: set[str] | list[str]) -> None:
        """Replaces the hot plan's pinned set: these copies are never evicted from SSD or HOST."""
        self.pinned.clear()
        self.pinned.update(component_ids)

    async def open(self) -> None:
        """Loads the SSD index (the SSD tier survives restarts)."""
        self.ssd_entries = await asyncio.to_thread(self.ssd.open)
        self._index_seq = 1

    async def close(self, wait_s: float = 30.0) -> None:
        """Stops background work and frees every HOST block (unlinking its segment)."""
        for task in list(self._background):
            task.cancel()
        pending = [t for t in (*self._inflight.values(), *self._fusing.values()) if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=wait_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, *self._background, return_exceptions=True)
        entries = list(self.host_entries.values())
        self.host_entries.clear()
        await asyncio.to_thread(self._free_all, entries)

    def _free_all(self, entries: list[HostEntry]) -> None:
        for entry in entries:
            if entry.block is not None:
                self.allocator.free(entry.block)
        self.allocator.close()

    # ---- catalog -----------------------------------------------------------------------

    async def record(self, component_id: str) -> Record:
        """The catalog record; FAILED_PRECONDITION when no coordinator is configured."""
        if self.lookup is None:
            raise FailedPrecondition(
                f"component {component_id!r}: no coordinator configured (DIFFMESH_IM_COORDINATOR), so the catalog cannot be read"
            )
        return await self.lookup(component_id)

    async def records(self, ids: list[str], field: str = "component_ids") -> list[Record]:
        """Records of ``ids`` (validated: 1-16 non-empty ids)."""
        if not ids:
            raise InvalidArgument(field, "at least one component id is required")
        if len(ids) > MAX_IDS:
            raise InvalidArgument(field, f"at most {MAX_IDS} ids, got {len(ids)}")
        for i, cid in enumerate(ids):
            if not cid:
                raise InvalidArgument(f"{field}[{i}]", "empty id")
        unique = list(dict.fromkeys(ids))
        found = await asyncio.gather(*(self.record(cid) for cid in unique))
        by_id = dict(zip(unique, found, strict=True))
        return [by_id[cid] for cid in ids]

    # ---- Acquire / Release -------------------------------------------------------------

    async def acquire(self, ids: list[str], holder: str) -> tuple[list[instance_manager_pb2.HostHandle], str]:
        """Makes ``ids`` HOST-resident and leases them to ``holder``: the BASE starts first, the rest concurrently."""
        if not holder:
            raise InvalidArgument("holder", "required (the worker id holding the lease)")
        recs = await self.records(ids)
        unique = list({r.id: r for r in recs}.values())
        now = time.time()
        for rec in unique:
            self.popularity.record(rec.id, now)
        lease = self.leases.open(holder, now)
        try:
            handles = await self._acquire_leased(unique, lease)
        except BaseException:
            self.leases.close(lease.lease_id)
            raise
        return [handles[cid] for cid in ids], lease.lease_id

    async def _acquire_leased(self, unique: list[Record], lease: Lease) -> dict[str, instance_manager_pb2.HostHandle]:
        """HOST residency of ``unique`` pinned to ``lease``: the BASE starts first, the rest concurrently."""
        handles: dict[str, instance_manager_pb2.HostHandle] = {}

        async def one(rec: Record) -> None:
            with _tracer.start_as_current_span("im.acquire.component") as span:
                span.set_attribute("component_id", rec.id)
                t0 = time.perf_counter()
                source = await self._host_leased(rec, lease)
                entry = self.host_entries[rec.id]
                span.set_attribute("source_tier", tier_name(source))
                span.set_attribute("bytes", entry.plan.tensor_bytes)
                handles[rec.id] = to_handle(entry, source, time.perf_counter() - t0)

        bases = [r for r in unique if r.kind == common_pb2.COMPONENT_KIND_BASE]
        rest = [r for r in unique if r.kind != common_pb2.COMPONENT_KIND_BASE]
        tasks = [asyncio.create_task(one(r)) for r in bases]
        tasks += [asyncio.create_task(one(r)) for r in rest]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return handles

    def release(self, lease_id: str) -> int:
        """Ends a lease; returns how many components lost their last lease."""
        if not lease_id:
            raise InvalidArgument("lease_id", "required")
        freed = self.leases.close(lease_id)
        self._touch(freed, time.time())
        return len(freed)

    def _touch(self, component_ids: list[str], now: float) -> None:
        for cid in component_ids:
            entry = self.host_entries.get(cid)
            if entry is not None:
                entry.last_used = now

    def expire_leases(self, now: float, live_holders: set[str] | None = None) -> list[str]:
        """Renews ``live_holders`` (workers the coordinator reports live), then ends the leases of
        holders silent for longer than the lease TTL; returns the ended lease ids."""
        if live_holders:
            self.leases.renew(live_holders & self.leases.holders(), now)
        ended, freed = self.leases.expire(now)
        if ended:
            self._touch(freed, now)
            log.warning("expired leases of silent holders", extra={"leases": len(ended), "components": ",".join(freed)})
        return ended

    async def _host_leased(self, rec: Record, lease: Any) -> int:
        """Ensures HOST residency and pins the copy to ``lease``; returns the tier it came from."""
        source: int = HOST
        for attempt in range(4):
            entry = self.host_entries.get(rec.id)
            if entry is not None:
                # No await between the check and the pin: eviction cannot slip in.
                entry.last_used = time.time()
                self.leases.pin(lease, rec.id)
                if attempt == 0:
                    self.counters[HOST].hits += 1
                return source
            if attempt == 0:
                self.counters[HOST].misses += 1
            source = await self._single_flight(HOST, rec, self._load_host)
        raise Unavailable(f"component {rec.id!r} was evicted repeatedly while loading; retry")

    # ---- Fuse --------------------------------------------------------------------------

    async def fuse(
        self, base_id: str, loras: list[tuple[str, float]], fused_id: str, holder: str
    ) -> tuple[Record, instance_manager_pb2.HostHandle, str, bool]:
        """Merges ``loras`` into ``base_id`` as a FUSED overlay in the SSD and HOST tiers.

        The LoRA set is taken in canonical pipeline-key form (sorted by id, scales rounded
        to two decimals), so one pipeline key maps to one overlay.

        Returns the registered record, its HOST handle, a lease id (when ``holder`` is
        given) and whether this call computed it. Concurrent calls for one overlay compute
        it once.
        """
        if not base_id:
            raise InvalidArgument("base_id", "required")
        if not 1 <= len(loras) <= MAX_FUSE_LORAS:
            raise InvalidArgument("loras", f"1-{MAX_FUSE_LORAS} LoRAs are required, got {len(loras)}")
        seen: set[str] = set()
        for i, (lid, scale) in enumerate(loras):
            if not lid:
                raise InvalidArgument(f"loras[{i}].id", "empty id")
            if lid in seen:
                raise InvalidArgument(f"loras[{i}].id", f"{lid!r} is listed twice")
            seen.add(lid)
            if not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:
                bound = MAX_LORA_SCALE
                raise InvalidArgument(f"loras[{i}].scale", f"must be finite within [-{bound}, {bound}], got {scale}")
        # The canonical pipeline key's form: sorted by id, scales to two decimals (one overlay per pipeline key).
        loras = sorted((lid, round(scale, SCALE_DECIMALS)) for lid, scale in loras)
        if not fused_id:
            key = canonical_key(base_id, loras)
            fused_id = "fused-" + hashlib.sha256(key.encode()).hexdigest()[:20]
        check_id("fused_id", fused_id)
        if self.register is None:
            raise FailedPrecondition("Fuse registers the overlay with the coordinator, and none is configured")
        task = self._fusing.get(fused_id)
        created = task is None
        if task is None:
            task = asyncio.create_task(self._fuse_once(base_id, loras, fused_id))
            self._fusing[fused_id] = task
            task.add_done_callback(functools.partial(self._fuse_done, fused_id))
        rec, created_now = await asyncio.shield(task)
        lease = self.leases.open(holder or FUSE_HOLDER, time.time())
        try:
            self.popularity.record(rec.id, time.time())
            t0 = time.perf_counter()
            source = await self._host_leased(rec, lease)
            handle = to_handle(self.host_entries[rec.id], source, time.perf_counter() - t0)
        except BaseException:
            self.leases.close(lease.lease_id)
            raise
        if not holder:
            self.leases.close(lease.lease_id)
        return rec, handle, lease.lease_id if holder else "", created and created_now

    def _fuse_done(self, fused_id: str, task: asyncio.Task[tuple[Record, bool]]) -> None:
        self._fusing.pop(fused_id, None)
        if not task.cancelled():
            task.exception()  # retrieved here too: every waiter may have gone away

    async def _fuse_once(self, base_id: str, loras: list[tuple[str, float]], fused_id: str) -> tuple[Record, bool]:
        assert self.register is not None
        lora_label = json.dumps([{"id": lid, "scale": s} for lid, s in loras], sort_keys=True)
        existing = await self._known(fused_id)
        if existing is not None:
            same = (
                existing.kind == common_pb2.COMPONENT_KIND_FUSED
                and existing.base_id == base_id
                and existing.labels.get(LORAS_LABEL) == lora_label
            )
            if not same:
                raise InvalidArgument("fused_id", f"{fused_id!r} already names another catalog component")
            return existing, False
        recs = await self.records([base_id, *(lid for lid, _ in loras)])
        base, lora_recs = recs[0], recs[1:]
        if base.kind != common_pb2.COMPONENT_KIND_BASE:
            raise InvalidArgument("base_id", f"{base_id!r} is not a BASE component")
        for i, rec in enumerate(lora_recs):
            if rec.kind != common_pb2.COMPONENT_KIND_LORA:
                raise InvalidArgument(f"loras[{i}].id", f"{rec.id!r} is not a LORA component")
            if rec.family != base.family:
                raise InvalidArgument(f"loras[{i}].id", f"{rec.id!r} is family {rec.family!r}, the base is {base.family!r}")
        entry = await self._derive(fused_id, base, lora_recs, [s for _, s in loras], expected_sha256="")
        record = common_pb2.Component(
            id=fused_id,
            kind=common_pb2.COMPONENT_KIND_FUSED,
            family=base.family,
            # Where it was derived; any node that lacks the file derives it again from base_id + labels.
            uri=self.ssd.path(entry).as_uri(),
            bytes=entry.bytes,
            sha256=entry.sha256,
            format=common_pb2.ARTIFACT_FORMAT_SAFETENSORS,
            base_id=base_id,
            labels={LORAS_LABEL: lora_label},
        )
        stored = await self.register(record)
        log.info("fused overlay registered", extra={"component_id": fused_id, "base_id": base_id, "bytes": entry.bytes})
        return stored, True

    async def _derive(
        self, fused_id: str, base: Record, lora_recs: list[Record], scales: list[float], expected_sha256: str
    ) -> SsdEntry:
        """Computes the overlay of ``lora_recs`` at ``scales`` on ``base`` and publishes it in the SSD tier.

        The overlay is written to ``SSD_DIR/tmp``, hashed, checked against ``expected_sha256``
        (when re-deriving a registered overlay), given room in the SSD tier (utility
        eviction; RESOURCE_EXHAUSTED when nothing can go) and renamed into place: it is
        bounded like every SSD copy, and nothing half-written is ever published.
        """
        recs = [base, *lora_recs]
        lease = self.leases.open(FUSE_HOLDER, time.time())
        tmp = self.ssd.tmp_path(fused_id)
        try:
            try:
                await self._acquire_leased(recs, lease)
                copies = [self.host_entries[r.id] for r in recs]
                await asyncio.to_thread(self._write_overlay, copies, scales, tmp)
            finally:
                self.leases.close(lease.lease_id)
            digest, size = await asyncio.to_thread(lambda: (artifact_sha256(tmp), artifact_bytes(tmp)))
            if expected_sha256 and digest != expected_sha256.lower():
                raise DataLoss(
                    f"component {fused_id!r}: the overlay derived again from {base.id!r} and its LoRAs hashes to {digest}, "
                    f"the catalog has {expected_sha256} (its inputs or this node's arithmetic differ from where it was "
                    "fused); nothing was published — Fuse the set again under a new fused_id"
                )
            await self._make_room(SSD, size, fused_id)
            try:
                entry = SsdEntry(
                    fused_id, digest, entry_name(fused_id, digest) + TENSOR_SUFFIX, size, False, FUSED, time.time()
                )
                await asyncio.to_thread(self.ssd.publish, tmp, entry)
                old = self.ssd_entries.get(fused_id)
                self.ssd_entries[fused_id] = entry
            finally:
                self._reserved[SSD] -= size
        except BaseException:
            await asyncio.to_thread(self.ssd.discard, tmp)
            raise
        if old is not None and old.name != entry.name:
            await asyncio.to_thread(self.ssd.discard, self.ssd.path(old))
        await self._save_index()
        self._notify(fused_id, SSD, True, size, entry.last_used)
        return entry

    async def _rederive(self, rec: Record) -> None:
        """Derives a registered FUSED overlay again (its SSD copy was evicted, or it was fused on another node)."""
        try:
            loras = [(str(d["id"]), float(d["scale"])) for d in json.loads(rec.labels[LORAS_LABEL])]
        except (KeyError, ValueError, TypeError) as exc:
            raise FailedPrecondition(
                f"component {rec.id!r}: FUSED record without a valid {LORAS_LABEL!r} label ({exc}); it cannot be derived"
            ) from None
        recs = await self.records([rec.base_id, *(lid for lid, _ in loras)])
        await self._derive(rec.id, recs[0], recs[1:], [s for _, s in loras], expected_sha256=rec.sha256)

    def _write_overlay(self, copies: list[HostEntry], scales: list[float], dest: Path) -> None:
        from diffmesh_instance_manager.overlays import HostCopy, write_overlay  # torch: imported on first Fuse

        views = [self.allocator.view(e.block) if e.block is not None else memoryview(b"") for e in copies]
        try:
            host = [HostCopy(e.component_id, e.plan, v) for e, v in zip(copies, views, strict=True)]
            write_overlay(host[0], list(zip(host[1:], scales, strict=True)), dest)
            del host
        finally:
            for v in views:
                try:
                    v.release()
                except BufferError:
                    pass  # a tensor view still exports it; it goes with the garbage

    async def _known(self, component_id: str) -> Record | None:
        """The catalog record of ``component_id``, or None when the catalog does not have it."""
        try:
            return await self.record(component_id)
        except NotFound:
            return None
        except aio.AioRpcError as exc:
            if exc.code() == StatusCode.NOT_FOUND:
                return None
            raise

    # ---- Prefetch ----------------------------------------------------------------------

    async def prefetch(self, ids: list[str], target: int) -> list[str]:
        """Starts background loads of ``ids`` into ``target`` (SSD or HOST); returns the ids accepted."""
        if target == common_pb2.TIER_UNSPECIFIED:
            target = HOST
        if target not in (SSD, HOST):
            raise InvalidArgument("target_tier", f"must be TIER_SSD or TIER_HOST, got {tier_name(target)}")
        recs = await self.records(ids)
        accepted: list[str] = []
        for rec in {r.id: r for r in recs}.values():
            resident = rec.id in (self.host_entries if target == HOST else self.ssd_entries)
            if resident:
                continue
            accepted.append(rec.id)
            load = self._load_host if target == HOST else self._load_ssd
            self._spawn(self._single_flight(target, rec, load), rec.id)
        return accepted

    def _spawn(self, coro: Coroutine[Any, Any, Any], component_id: str) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("prefetch failed", extra={"component_id": component_id, "error": str(t.exception())})

        task.add_done_callback(done)

    # ---- loading -----------------------------------------------------------------------

    async def _single_flight(self, tier: int, rec: Record, load: Callable[[Record], Awaitable[int]]) -> int:
        key = (tier, rec.id)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._run_load(key, load(rec)))
            self._inflight[key] = task
        return await asyncio.shield(task)

    async def _run_load(self, key: tuple[int, str], coro: Awaitable[int]) -> int:
        try:
            return await coro
        finally:
            self._inflight.pop(key, None)

    async def _ensure_ssd(self, rec: Record) -> int:
        """Ensures SSD residency; returns SSD when it was there already, else REMOTE."""
        entry = self.ssd_entries.get(rec.id)
        if entry is not None and entry.sha256 == rec.sha256.lower():
            entry.last_used = time.time()
            return SSD
        return await self._single_flight(SSD, rec, self._load_ssd)

    async def _load_ssd(self, rec: Record) -> int:
        counters = self.counters[SSD]
        entry = self.ssd_entries.get(rec.id)
        if entry is not None and entry.sha256 == rec.sha256.lower():
            counters.hits += 1
            return SSD
        counters.misses += 1
        if rec.kind == FUSED:
            # An overlay's tier below SSD is the computation that made it (from base + LoRAs, both verified).
            await self._rederive(rec)
            return REMOTE
        source = await asyncio.to_thread(self.remote.resolve, rec.id, rec.uri)
        if not rec.sha256:
            raise FailedPrecondition(
                f"component {rec.id!r}: the catalog record has no sha256; unverified artifacts are not loaded"
            )
        need = rec.bytes if rec.bytes > 0 else 0
        await self._make_room(SSD, need, rec.id)
        reserved = need
        tmp = self.ssd.tmp_path(rec.id)
        t0 = time.perf_counter()
        try:
            size = await asyncio.to_thread(self.fetcher.fetch, source, rec.sha256, tmp)
            if size > reserved:
                # The catalog under-stated the size (or did not give it): room for the rest, or nothing is published.
                await self._make_room(SSD, size - reserved, rec.id)
                reserved = size
            new = SsdEntry(
                rec.id, rec.sha256.lower(), entry_name(rec.id, rec.sha256.lower()), size, source.is_dir, rec.kind, time.time()
            )
            old = self.ssd_entries.pop(rec.id, None)
            if old is not None and old.name != new.name:
                await asyncio.to_thread(self.ssd.discard, self.ssd.path(old))
            await asyncio.to_thread(self.ssd.publish, tmp, new)
        except BaseException:
            await asyncio.to_thread(self.ssd.discard, tmp)
            raise
        finally:
            self._reserved[SSD] -= reserved
        self.ssd_entries[rec.id] = new
        counters.loaded_bytes += size
        counters.load_seconds += time.perf_counter() - t0
        await self._save_index()
        self._notify(rec.id, SSD, True, size, new.last_used)
        return REMOTE

    async def _load_host(self, rec: Record) -> int:
        source = await self._ensure_ssd(rec)
        ssd_entry = self.ssd_entries.get(rec.id)
        if ssd_entry is None:
            raise Unavailable(f"component {rec.id!r} left the SSD tier while loading; retry")
        self._ssd_readers[rec.id] += 1
        try:
            path = self.ssd.path(ssd_entry)
            plan = await asyncio.to_thread(plan_component, rec.id, path, ssd_entry.is_dir, self.config_cap)
            t0 = time.perf_counter()
            if self.pool is not None:
                block = await self._materialize_pooled(plan, rec.id)
            else:
                await self._make_room(HOST, plan.block_bytes, rec.id)
                try:
                    block = await asyncio.to_thread(materialize, plan, self.allocator, self.loader)
                finally:
                    self._reserved[HOST] -= plan.block_bytes
            seconds = time.perf_counter() - t0
        finally:
            self._ssd_readers[rec.id] -= 1
            if self._ssd_readers[rec.id] <= 0:
                del self._ssd_readers[rec.id]
        entry = HostEntry(rec.id, rec.kind, rec.family, rec.base_id, block, plan, time.time(), seconds)
        self.host_entries[rec.id] = entry
        counters = self.counters[HOST]
        counters.loaded_bytes += entry.bytes
        counters.load_seconds += seconds
        self._notify(rec.id, HOST, True, entry.bytes, entry.last_used)
        return source

    async def _materialize_pooled(self, plan: ComponentPlan, component_id: str) -> HostBlock | None:
        """Copies ``plan`` into a pool block, evicting the lowest-utility evictable copy of a fitting class when none is free."""
        assert self.pool is not None
        if plan.block_bytes > 0 and not self.pool.fitting_classes(plan.block_bytes):
            largest = max(c.block_size for c in self.pool.stats().classes if c.blocks)
            raise ResourceExhausted(
                f"HOST tier: component {component_id!r} needs {plan.block_bytes} bytes, more than the pool's largest "
                f"block ({largest} bytes); nothing was loaded",
                retry_after_s=self.retry_after_s,
            )
        for _ in range(8):
            try:
                return await asyncio.to_thread(materialize, plan, self.allocator, self.loader)
            except PoolExhausted as exc:
                classes = set(exc.classes)
                candidates = [
                    c
                    for c in self._candidates(HOST)
                    if isinstance(block := self.host_entries[c.component_id].block, PoolBlock) and block.class_index in classes
                ]
                if not candidates:
                    raise ResourceExhausted(
                        f"HOST tier full: component {component_id!r} needs a {plan.block_bytes}-byte block and every "
                        f"block that fits is leased, pinned or loading",
                        retry_after_s=self.retry_after_s,
                    ) from None
                # One block of a fitting class is enough: the lowest-utility candidate goes.
                policy = self.host_policy
                order = policy.order(candidates, time.time()) if isinstance(policy, UtilityPolicy) else []
                victim = order[0] if order else min(candidates, key=lambda c: c.last_used).component_id
                self._evict(HOST, [victim])
        raise ResourceExhausted(
            f"HOST tier busy: component {component_id!r} lost the freed block to concurrent loads 8 times",
            retry_after_s=self.retry_after_s,
        )

    # ---- capacity ------------------------------------------------------------------------

    def _used(self, tier: int) -> int:
        if tier == HOST:
            return sum(e.bytes for e in self.host_entries.values())
        return sum(e.bytes for e in self.ssd_entries.values())

    def _candidates(self, tier: int) -> list[Candidate]:
        """Copies that may go: not pinned by the hot plan, not leased (HOST), not being read (SSD)."""
        if tier == HOST:
            return [
                Candidate(e.component_id, e.bytes, e.last_used, e.kind)
                for e in self.host_entries.values()
                if self.leases.refs(e.component_id) == 0 and e.component_id not in self.pinned
            ]
        loading = {cid for (t, cid) in self._inflight if t == HOST}
        return [
            Candidate(e.component_id, e.bytes, e.last_used, e.kind)
            for e in self.ssd_entries.values()
            if self._ssd_readers[e.component_id] == 0 and e.component_id not in loading and e.component_id not in self.pinned
        ]

    def _host_reload_s(self, component_id: str, nbytes: int) -> float:
        """Seconds to bring a HOST copy back: from SSD when it is there, else from REMOTE through SSD."""
        seconds = nbytes / self.counters[HOST].bandwidth(DEFAULT_SSD_BPS)
        if component_id not in self.ssd_entries:
            seconds += nbytes / self.counters[SSD].bandwidth(DEFAULT_REMOTE_BPS)
        return seconds

    def _ssd_reload_s(self, component_id: str, nbytes: int) -> float:
        """Seconds to bring an SSD copy back from REMOTE."""
        return nbytes / self.counters[SSD].bandwidth(DEFAULT_REMOTE_BPS)

    async def _make_room(self, tier: int, need: int, component_id: str) -> None:
        """Reserves ``need`` bytes in ``tier``, evicting evictable copies when it is bounded and full."""
        capacity = self.ssd_capacity if tier == SSD else self.host_capacity
        name = tier_name(tier)
        if capacity > 0:
            if need > capacity:
                raise ResourceExhausted(
                    f"{name} tier: component {component_id!r} needs {need} bytes, more than the tier's capacity of "
                    f"{capacity}; nothing was published",
                    retry_after_s=self.retry_after_s,
                )
            overflow = self._used(tier) + self._reserved[tier] + need - capacity
            if overflow > 0:
                candidates = self._candidates(tier)
                victims = (
                    self.host_policy.choose(candidates, overflow, time.time())
                    if tier == HOST
                    else self.ssd_policy.choose(candidates, overflow, time.time())
                )
                sizes = {c.component_id: c.bytes for c in candidates}
                victims = [v for v in victims if v in sizes]
                if sum(sizes[v] for v in victims) < overflow:
                    raise ResourceExhausted(
                        f"{name} tier full: component {component_id!r} needs {need} bytes and only "
                        f"{sum(sizes.values())} bytes are evictable (the rest is leased, pinned, being read or loading); "
                        "nothing was published",
                        retry_after_s=self.retry_after_s,
                    )
                self._evict(tier, victims)
        self._reserved[tier] += need

    def _evict(self, tier: int, victims: list[str]) -> None:
        """Drops ``victims`` from the index now; the bytes are freed in a thread."""
        counters = self.counters[tier]
        if tier == HOST:
            host_gone = [self.host_entries.pop(v) for v in victims]
            for e in host_gone:
                counters.evicted_bytes += e.bytes
                self._notify(e.component_id, HOST, False, e.bytes, e.last_used)
            blocks = [e.block for e in host_gone if e.block is not None]
            if self.pool is not None:
                # Only copies no lease holds are evicted, so the blocks can be reused at once.
                _free_blocks(self.allocator, blocks)
            else:
                self._spawn(asyncio.to_thread(_free_blocks, self.allocator, blocks), ",".join(victims))
        else:
            ssd_gone = [self.ssd_entries.pop(v) for v in victims]
            for s in ssd_gone:
                counters.evicted_bytes += s.bytes
                self._notify(s.component_id, SSD, False, s.bytes, s.last_used)
            paths = [self.ssd.path(s) for s in ssd_gone]
            self._spawn(asyncio.to_thread(_discard_paths, self.ssd, paths), ",".join(victims))
            self._spawn(self._save_index(), "ssd-index")
        log.info("evicted", extra={"tier": tier_name(tier), "components": ",".join(victims)})

    async def _save_index(self) -> None:
        self._index_seq += 1
        await asyncio.to_thread(self.ssd.save_index, list(self.ssd_entries.values()), self._index_seq)

    # ---- residency and stats -------------------------------------------------------------

    def _notify(self, component_id: str, tier: int, present: bool, nbytes: int, last_used: float) -> None:
        update = coordinator_pb2.ResidencyUpdate(
            component_id=component_id,
            tier=tier,  # type: ignore[arg-type]
            present=present,
            bytes=nbytes,
            last_used_unix=last_used,
        )
        for listener in self.listeners:
            listener(update)

    def snapshot(self) -> list[coordinator_pb2.ResidencyUpdate]:
        """Every copy this node holds, as residency updates (for a full-snapshot report)."""
        out = [
            coordinator_pb2.ResidencyUpdate(
                component_id=e.component_id, tier=SSD, present=True, bytes=e.bytes, last_used_unix=e.last_used
            )
            for e in self.ssd_entries.values()
        ]
        out += [
            coordinator_pb2.ResidencyUpdate(
                component_id=e.component_id, tier=HOST, present=True, bytes=e.bytes, last_used_unix=e.last_used
            )
            for e in self.host_entries.values()
        ]
        return out

    def stats(self, node_id: str) -> instance_manager_pb2.StatsResponse:
        """Tier counters and per-component state."""
        resp = instance_manager_pb2.StatsResponse(node_id=node_id)
        for tier, capacity, entries in (
            (SSD, self.ssd_capacity, self.ssd_entries),
            (HOST, self.host_capacity, self.host_entries),
        ):
            c = self.counters[tier]
            resp.tiers.add(
                tier=tier,  # type: ignore[arg-type]
                used_bytes=self._used(tier),
                capacity_bytes=capacity,
                components=len(entries),
                hits=c.hits,
                misses=c.misses,
                loaded_bytes=c.loaded_bytes,
                load_seconds=c.load_seconds,
                evicted_bytes=c.evicted_bytes,
                load_gbps=c.loaded_bytes / c.load_seconds / 1e9 if c.load_seconds > 0 else 0.0,
                direct_bytes=int(getattr(self.loader, "direct_bytes", 0)) if tier == HOST else 0,
            )
        if self.pool is not None:
            pool_stats = self.pool.stats()
            for cls in pool_stats.classes:
                resp.pool_classes.add(block_size=cls.block_size, blocks=cls.blocks, used=cls.used, wasted_bytes=cls.wasted_bytes)
            resp.fragmentation = pool_stats.fragmentation
            resp.pool_pinned = pool_stats.pinned
        for cid in sorted(set(self.ssd_entries) | set(self.host_entries)):
            host = self.host_entries.get(cid)
            ssd = self.ssd_entries.get(cid)
            top = host if host is not None else ssd
            assert top is not None
            resp.components.add(
                component_id=cid,
                tier=HOST if host is not None else SSD,
                bytes=top.bytes,
                leases=self.leases.refs(cid),
                last_used_unix=max(e.last_used for e in (host, ssd) if e is not None),
            )
        return resp


def _free_blocks(allocator: HostAllocator, blocks: list[HostBlock]) -> None:
    for block in blocks:
        allocator.free(block)


def _discard_paths(ssd: SsdCache, paths: list[Path]) -> None:
    for path in paths:
        ssd.discard(path)
