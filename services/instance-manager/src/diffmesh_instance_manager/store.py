"""The component store: REMOTE → SSD → HOST with single-flight loads, capacity and leases.

All state lives on the event loop; file and shared-memory work runs in threads
(``asyncio.to_thread``). A load is a task keyed by (tier, component id) that callers
await through ``asyncio.shield``, so concurrent requests share one fetch and a caller
that goes away does not abort a load others wait for.

Capacity: before a copy is made its bytes are reserved; when a tier would overflow, the
eviction policy picks among copies that are neither leased (HOST) nor being read (SSD).
When that cannot free enough, the request fails with RESOURCE_EXHAUSTED and a retry hint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffmesh.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from diffmesh.telemetry import tracer
from diffmesh.v1 import common_pb2, coordinator_pb2, instance_manager_pb2

from diffmesh_instance_manager.eviction import Candidate, EvictionPolicy, LruPolicy
from diffmesh_instance_manager.host import (
    BufferedLoader,
    FileLoader,
    HostAllocator,
    HostBlock,
    HostEntry,
    materialize,
    plan_component,
    to_handle,
)
from diffmesh_instance_manager.leases import LeaseTable
from diffmesh_instance_manager.remote import Fetcher, FileFetcher, RemoteAccess
from diffmesh_instance_manager.ssd import SsdCache, SsdEntry, entry_name

log = logging.getLogger("diffmesh.im.store")
_tracer = tracer("diffmesh.instance_manager")

SSD = common_pb2.TIER_SSD
HOST = common_pb2.TIER_HOST
REMOTE = common_pb2.TIER_REMOTE
MAX_IDS = 16


def tier_name(tier: int) -> str:
    """``TIER_HOST`` etc."""
    return common_pb2.Tier.Name(tier)  # type: ignore[arg-type]


Record = common_pb2.Component
RecordLookup = Callable[[str], Awaitable[Record]]
ResidencyListener = Callable[[coordinator_pb2.ResidencyUpdate], None]


@dataclass
class TierCounters:
    """Counters of one tier since start."""

    hits: int = 0
    misses: int = 0
    loaded_bytes: int = 0
    load_seconds: float = 0.0
    evicted_bytes: int = 0


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
    ) -> None:
        self.ssd = ssd
        self.ssd_capacity = ssd_capacity
        self.host_capacity = host_capacity
        self.allocator = allocator
        self.remote = remote
        self.lookup = lookup
        self.fetcher: Fetcher = fetcher or FileFetcher()
        self.loader: FileLoader = loader or BufferedLoader()
        self.ssd_policy: EvictionPolicy = ssd_policy or LruPolicy()
        self.host_policy: EvictionPolicy = host_policy or LruPolicy()
        self.config_cap = config_cap
        self.retry_after_s = retry_after_s
        self.ssd_entries: dict[str, SsdEntry] = {}
        self.host_entries: dict[str, HostEntry] = {}
        self.leases = LeaseTable()
        self.counters: dict[int, TierCounters] = {SSD: TierCounters(), HOST: TierCounters()}
        self.listeners: list[ResidencyListener] = []
        self._reserved: dict[int, int] = {SSD: 0, HOST: 0}
        self._ssd_readers: Counter[str] = Counter()
        self._inflight: dict[tuple[int, str], asyncio.Task[int]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._index_seq = 0

    # ---- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Loads the SSD index (the SSD tier survives restarts)."""
        self.ssd_entries = await asyncio.to_thread(self.ssd.open)
        self._index_seq = 1

    async def close(self, wait_s: float = 30.0) -> None:
        """Stops background work and frees every HOST block (unlinking its segment)."""
        for task in list(self._background):
            task.cancel()
        pending = [t for t in self._inflight.values() if not t.done()]
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
        lease = self.leases.open(holder)
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
            self.leases.close(lease.lease_id)
            raise
        return [handles[cid] for cid in ids], lease.lease_id

    def release(self, lease_id: str) -> int:
        """Ends a lease; returns how many components lost their last lease."""
        if not lease_id:
            raise InvalidArgument("lease_id", "required")
        freed = self.leases.close(lease_id)
        now = time.time()
        for cid in freed:
            entry = self.host_entries.get(cid)
            if entry is not None:
                entry.last_used = now
        return len(freed)

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
        source = await asyncio.to_thread(self.remote.resolve, rec.id, rec.uri)
        if not rec.sha256:
            raise FailedPrecondition(
                f"component {rec.id!r}: the catalog record has no sha256; unverified artifacts are not loaded"
            )
        need = rec.bytes if rec.bytes > 0 else 0
        await self._make_room(SSD, need, rec.id)
        tmp = self.ssd.tmp_path(rec.id)
        t0 = time.perf_counter()
        try:
            size = await asyncio.to_thread(self.fetcher.fetch, source, rec.sha256, tmp)
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
            self._reserved[SSD] -= need
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
            await self._make_room(HOST, plan.block_bytes, rec.id)
            t0 = time.perf_counter()
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

    # ---- capacity ------------------------------------------------------------------------

    def _used(self, tier: int) -> int:
        if tier == HOST:
            return sum(e.bytes for e in self.host_entries.values())
        return sum(e.bytes for e in self.ssd_entries.values())

    def _candidates(self, tier: int) -> list[Candidate]:
        if tier == HOST:
            return [
                Candidate(e.component_id, e.bytes, e.last_used, e.kind)
                for e in self.host_entries.values()
                if self.leases.refs(e.component_id) == 0
            ]
        loading = {cid for (t, cid) in self._inflight if t == HOST}
        return [
            Candidate(e.component_id, e.bytes, e.last_used, e.kind)
            for e in self.ssd_entries.values()
            if self._ssd_readers[e.component_id] == 0 and e.component_id not in loading
        ]

    async def _make_room(self, tier: int, need: int, component_id: str) -> None:
        """Reserves ``need`` bytes in ``tier``, evicting unpinned copies when it is bounded and full."""
        capacity = self.ssd_capacity if tier == SSD else self.host_capacity
        name = tier_name(tier)
        if capacity > 0:
            if need > capacity:
                raise FailedPrecondition(
                    f"component {component_id!r} needs {need} bytes, more than the {name} capacity of {capacity}"
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
                        f"{sum(sizes.values())} bytes are evictable (the rest is leased or loading)",
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
            )
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
