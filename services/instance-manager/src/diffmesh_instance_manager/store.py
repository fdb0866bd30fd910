"""The component store: REMOTE → SSD → HOST with single-flight loads, leases and residency reports.

All state lives on the event loop; file and shared-memory work runs in threads
(``asyncio.to_thread``). A load is a task keyed by (tier, component id) that callers
await through ``asyncio.shield``, so concurrent requests share one fetch and a caller
that goes away does not abort a load others wait for.

The tiers are :class:`~diffmesh_instance_manager.ssd_tier.SsdTier` and
:class:`~diffmesh_instance_manager.host_tier.HostTier`: each bounds its bytes and asks
its victim chooser (the shared utility policy, see :mod:`.eviction`) which evictable
copies go; when nothing can be evicted, the request fails with RESOURCE_EXHAUSTED and a
retry hint. A FUSED overlay's tier below SSD is the computation that made it: the
store asks its :class:`OverlayDeriver` (:mod:`.overlay_fuser`) to derive it again.
Building the ``Stats`` answer is :mod:`.stats`.

The policy plane adds three things: an SSD miss first tries a peer node's verified copy
(its :class:`PeerSource`, :mod:`.peer_fetch`) before REMOTE (or before deriving an
overlay again); a HOST copy loaded on a miss for an Acquire passes the plan's COLD
admission rule (:mod:`.admission`) or stays *transient* (freed when its last lease ends);
and prefetched HOST copies are remembered until an Acquire uses them (a prefetch hit) or
they are evicted. :class:`~diffmesh_instance_manager.plane_counters.PlaneCounters` counts it all.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from diffmesh.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from diffmesh.telemetry import tracer
from diffmesh.tiers import Tier
from diffmesh.v1 import common_pb2, coordinator_pb2, instance_manager_pb2

from diffmesh_instance_manager.admission import HostAdmission
from diffmesh_instance_manager.background import BackgroundTasks
from diffmesh_instance_manager.catalog_records import CatalogRecords, Record, RecordLookup
from diffmesh_instance_manager.eviction import LruChooser, Popularity, UtilityPolicy, VictimChooser
from diffmesh_instance_manager.fetch_common import Fetcher
from diffmesh_instance_manager.host import BufferedLoader, FileLoader, HostAllocator, HostEntry, to_handle
from diffmesh_instance_manager.host_tier import HostTier
from diffmesh_instance_manager.leases import Lease, LeaseTable
from diffmesh_instance_manager.plane_counters import PlaneCounters
from diffmesh_instance_manager.pool import HostPool
from diffmesh_instance_manager.remote_access import RemoteAccess
from diffmesh_instance_manager.ssd import SsdCache, SsdEntry
from diffmesh_instance_manager.ssd_tier import SsdTier

log = logging.getLogger(__name__)
_tracer = tracer("diffmesh.instance_manager")

FUSED = common_pb2.COMPONENT_KIND_FUSED
#: Bandwidths assumed for reload costs before this node has measured its own (bytes/s).
DEFAULT_REMOTE_BPS = 0.2e9
DEFAULT_SSD_BPS = 1.0e9
#: Tries to make a copy HOST-resident when concurrent evictions keep taking it away.
HOST_ATTEMPTS = 4
#: What the ``im.fetch`` span's ``source`` says a copy came from (a peer's copy is SSD-resident here, not a Tier).
SOURCE_PEER = "PEER"

ResidencyListener = Callable[[coordinator_pb2.ResidencyUpdate], None]


def proto_tier_name(tier: Tier) -> str:
    """The wire enum's name of ``tier`` (``TIER_HOST``), as spans and RPC errors show it."""
    return f"TIER_{tier.name}"


class OverlayDeriver(Protocol):
    """Derives a registered FUSED overlay again into the SSD tier (its tier below SSD is a computation)."""

    async def rederive(self, rec: Record) -> None:
        """Computes ``rec``'s overlay from its base and LoRAs and publishes it in the SSD tier (digest checked)."""
        ...


class PeerSource(Protocol):
    """Other nodes' verified SSD copies (the PEER tier): where they are and how to read one."""

    async def holders(self, component_id: str) -> list[tuple[str, str]]:
        """``(node_id, address)`` of the other live nodes whose SSD holds ``component_id``, best first."""
        ...

    async def read(self, address: str, rec: Record, dest: Path) -> tuple[int, bool]:
        """Writes ``rec``'s artifact from the node at ``address`` to ``dest``, checked against ``rec.sha256``;
        returns (bytes, is_dir)."""
        ...


class ComponentStore:
    """The SSD and HOST tiers of one node, the loads between them and the leases on HOST copies."""

    def __init__(
        self,
        *,
        ssd: SsdCache,
        ssd_capacity: int,
        host_capacity: int,
        allocator: HostAllocator,
        remote: RemoteAccess,
        fetcher: Fetcher,
        lookup: RecordLookup | None,
        loader: FileLoader | None = None,
        ssd_chooser: VictimChooser | None = None,
        host_chooser: VictimChooser | None = None,
        config_cap: int = 16 * 1024 * 1024,
        retry_after_s: float = 2.0,
        pinned: set[str] | None = None,
        lease_ttl_s: float = 0.0,
        lru: bool = False,
    ) -> None:
        self.catalog = CatalogRecords(lookup)
        self.pinned: set[str] = set(pinned or ())
        self.popularity = Popularity()
        self.leases = LeaseTable(lease_ttl_s)
        self.listeners: list[ResidencyListener] = []
        self.background = BackgroundTasks()
        self.deriver: OverlayDeriver | None = None
        #: Other nodes' SSD copies, tried before REMOTE; None: no peer copies (no coordinator, PEER_FETCH off, lru).
        self.peers: PeerSource | None = None
        self.admission = HostAdmission(self.popularity)
        self.plane = PlaneCounters()
        #: HOST copies a prefetch brought in that no Acquire has used yet.
        self.prefetched: set[str] = set()
        self._inflight: dict[tuple[Tier, str], asyncio.Task[Tier]] = {}
        if lru:  # DIFFMESH_POLICY=lru: the baseline evicts least recently used at every tier
            ssd_chooser = ssd_chooser or LruChooser(self.pinned)
            host_chooser = host_chooser or LruChooser(self.pinned)
        self.ssd = SsdTier(
            ssd,
            ssd_capacity,
            chooser=ssd_chooser or UtilityPolicy(self.popularity, self._ssd_reload_s, self.pinned),
            notify=self._notify,
            retry_after_s=retry_after_s,
            background=self.background,
            pinned=self.pinned,
            host_loading=self._host_loading,
            remote=remote,
            fetcher=fetcher,
        )
        self.host = HostTier(
            allocator,
            loader or BufferedLoader(),
            host_capacity,
            chooser=host_chooser or UtilityPolicy(self.popularity, self._host_reload_s, self.pinned),
            notify=self._notify,
            retry_after_s=retry_after_s,
            background=self.background,
            leases=self.leases,
            pinned=self.pinned,
            config_cap=config_cap,
        )

    @property
    def ssd_entries(self) -> dict[str, SsdEntry]:
        """SSD copies by component id."""
        return self.ssd.entries

    @property
    def host_entries(self) -> dict[str, HostEntry]:
        """HOST copies by component id."""
        return self.host.entries

    # ---- lifecycle -------------------------------------------------------------------

    def use_pool(self, pool: HostPool, loader: FileLoader) -> None:
        """Makes ``pool`` the HOST tier (before the first load): its size classes bound the tier."""
        self.host.use_pool(pool, loader)

    def set_pinned(self, component_ids: set[str] | list[str]) -> None:
        """Replaces the hot plan's pinned set: these copies are never evicted from SSD or HOST."""
        self.pinned.clear()
        self.pinned.update(component_ids)

    async def open(self) -> None:
        """Loads the SSD index (the SSD tier survives restarts)."""
        await self.ssd.open()

    async def close(self, wait_s: float = 30.0) -> None:
        """Stops background work and frees every HOST block (unlinking its segment)."""
        cancelled = self.background.cancel_all()
        pending = [t for t in self._inflight.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=wait_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, *cancelled, return_exceptions=True)
        await self.host.close()

    # ---- Acquire / Release -------------------------------------------------------------

    async def acquire(self, ids: list[str], holder: str) -> tuple[list[instance_manager_pb2.HostHandle], str]:
        """Makes ``ids`` HOST-resident and leases them to ``holder``: the BASE starts first, the rest concurrently."""
        if not holder:
            raise InvalidArgument("holder", "required (the worker id holding the lease)")
        recs = await self.catalog.get_many(ids)
        unique = list({r.id: r for r in recs}.values())
        now = time.time()
        for rec in unique:
            self.popularity.record(rec.id, now)
            self.admission.record_use(rec.id)
        lease = self.leases.open(holder, now)
        try:
            handles = await self.acquire_leased(unique, lease, admission=True)
        except BaseException:
            self.release(lease.lease_id)
            raise
        return [handles[cid] for cid in ids], lease.lease_id

    async def acquire_leased(
        self, unique: list[Record], lease: Lease, *, admission: bool = False
    ) -> dict[str, instance_manager_pb2.HostHandle]:
        """HOST residency of ``unique`` pinned to ``lease``: the BASE starts first, the rest concurrently.

        ``admission``: copies loaded on a miss pass the COLD admission rule (an Acquire's), else they are cached.
        """
        handles: dict[str, instance_manager_pb2.HostHandle] = {}

        async def one(rec: Record) -> None:
            with _tracer.start_as_current_span("im.acquire.component") as span:
                span.set_attribute("component_id", rec.id)
                t0 = time.perf_counter()
                source = await self.host_leased(rec, lease, admission=admission)
                entry = self.host.entries[rec.id]
                span.set_attribute("source_tier", proto_tier_name(source))
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

    async def host_leased(self, rec: Record, lease: Lease, *, admission: bool = False) -> Tier:
        """Ensures HOST residency and pins the copy to ``lease``; returns the tier it came from.

        ``admission``: this is an Acquire's use: a copy loaded on a miss passes the COLD admission
        rule (else it is transient), and a prefetched copy's first use counts as a prefetch hit.
        """
        source = Tier.HOST
        counters = self.host.counters
        load = functools.partial(self._load_host, admission=admission)
        for attempt in range(HOST_ATTEMPTS):
            entry = self.host.entries.get(rec.id)
            if entry is not None:
                # No await between the check and the pin: eviction cannot slip in.
                entry.last_used = time.time()
                self.leases.pin(lease, rec.id)
                if attempt == 0:
                    counters.hits += 1
                if admission and rec.id in self.prefetched:
                    self.prefetched.discard(rec.id)
                    self.plane.prefetch_hits += 1
                if entry.transient and (not admission or (attempt == 0 and self.admission.may_keep(rec.id))):
                    # A later use of a transient copy: a cached one (Fuse), or an Acquire that reached
                    # cold_min_uses (keeping a copy that is already there displaces nothing): it stays.
                    entry.transient = False
                return source
            if attempt == 0:
                counters.misses += 1
            source = await self._single_flight(Tier.HOST, rec, load)
        raise Unavailable(f"component {rec.id!r} was evicted repeatedly while loading; retry")

    def release(self, lease_id: str) -> int:
        """Ends a lease; returns how many components lost their last lease (their transient copies are freed)."""
        if not lease_id:
            raise InvalidArgument("lease_id", "required")
        freed = self.leases.close(lease_id)
        self._lease_ended(freed, time.time())
        return len(freed)

    def expire_leases(self, now: float, live_holders: set[str] | None = None) -> list[str]:
        """Renews ``live_holders`` (workers the coordinator reports live), then ends the leases of
        holders silent for longer than the lease TTL; returns the ended lease ids."""
        if live_holders:
            self.leases.renew(live_holders & self.leases.holders(), now)
        ended, freed = self.leases.expire(now)
        if ended:
            self._lease_ended(freed, now)
            log.warning("expired leases of silent holders", extra={"leases": len(ended), "components": ",".join(freed)})
        return ended

    def _lease_ended(self, component_ids: list[str], now: float) -> None:
        """``component_ids`` lost their last lease: their copies were used until ``now``; transient ones go."""
        transient: list[str] = []
        for cid in component_ids:
            entry = self.host.entries.get(cid)
            if entry is not None:
                entry.last_used = now
                if entry.transient:
                    transient.append(cid)
        if transient:
            self.host.discard(transient)
            log.info("freed transient HOST copies (COLD, not admitted)", extra={"components": ",".join(transient)})

    # ---- Prefetch ----------------------------------------------------------------------

    async def prefetch(self, ids: list[str], target: Tier) -> list[str]:
        """Starts background loads of ``ids`` into ``target`` (SSD or HOST); returns the ids accepted."""
        if target == Tier.UNSPECIFIED:
            target = Tier.HOST
        if target not in (Tier.SSD, Tier.HOST):
            raise InvalidArgument("target_tier", f"must be TIER_SSD or TIER_HOST, got {proto_tier_name(target)}")
        recs = await self.catalog.get_many(ids)
        tier = self.host if target == Tier.HOST else self.ssd
        accepted: list[str] = []
        for rec in {r.id: r for r in recs}.values():
            if rec.id in tier.entries:
                continue
            accepted.append(rec.id)
            self.background.spawn(self._prefetch_one(target, rec), "prefetch", rec.id)
        self.plane.prefetches_started += len(accepted)
        return accepted

    def loading(self, target: Tier, component_id: str) -> bool:
        """True while a load of ``component_id`` into ``target`` is in flight."""
        return (target, component_id) in self._inflight

    async def _prefetch_one(self, target: Tier, rec: Record) -> None:
        load = self._load_host if target == Tier.HOST else self._load_ssd
        await self._single_flight(target, rec, load)
        entry = self.host.entries.get(rec.id) if target == Tier.HOST else None
        if entry is not None:
            entry.transient = False  # a prefetched copy is cached even when an Acquire's COLD load was shared
            if self.leases.refs(rec.id) == 0:
                self.prefetched.add(rec.id)

    # ---- loading -----------------------------------------------------------------------

    async def _single_flight(self, tier: Tier, rec: Record, load: Callable[[Record], Awaitable[Tier]]) -> Tier:
        key = (tier, rec.id)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._run_load(key, load(rec)))
            self._inflight[key] = task
        return await asyncio.shield(task)

    async def _run_load(self, key: tuple[Tier, str], coro: Awaitable[Tier]) -> Tier:
        try:
            return await coro
        finally:
            self._inflight.pop(key, None)

    def _host_loading(self) -> set[str]:
        """Ids with a HOST load in flight (their SSD copies are about to be read)."""
        return {cid for (t, cid) in self._inflight if t == Tier.HOST}

    async def _ensure_ssd(self, rec: Record) -> Tier:
        """Ensures SSD residency; returns SSD when it was there already, else REMOTE."""
        entry = self.ssd.fresh(rec)
        if entry is not None:
            entry.last_used = time.time()
            return Tier.SSD
        return await self._single_flight(Tier.SSD, rec, self._load_ssd)

    async def _load_ssd(self, rec: Record) -> Tier:
        """Brings ``rec`` into SSD: from a peer's copy (returns SSD: the copy's residency here), else from
        REMOTE or, for a FUSED overlay, by deriving it again (returns REMOTE)."""
        counters = self.ssd.counters
        if self.ssd.fresh(rec) is not None:
            counters.hits += 1
            return Tier.SSD
        counters.misses += 1
        if await self._fetch_from_peer(rec):
            return Tier.SSD
        with _tracer.start_as_current_span("im.fetch") as span:
            span.set_attribute("component_id", rec.id)
            if rec.kind == FUSED:
                # An overlay's tier below SSD is the computation that made it (from base + LoRAs, both verified).
                span.set_attribute("source", "DERIVED")
                if self.deriver is None:
                    raise FailedPrecondition(f"component {rec.id!r} is a FUSED overlay and this store derives none")
                await self.deriver.rederive(rec)
                return Tier.REMOTE
            span.set_attribute("source", Tier.REMOTE.label)
            size = await self.ssd.fetch_remote(rec)
            span.set_attribute("bytes", size)
        self.plane.remote_bytes += size
        return Tier.REMOTE

    async def _fetch_from_peer(self, rec: Record) -> bool:
        """Publishes a peer's verified copy of ``rec`` in SSD; False when no peer holds one or every peer failed."""
        peers = self.peers
        if peers is None or not rec.sha256:
            return False
        try:
            holders = await peers.holders(rec.id)
        except Exception as exc:  # noqa: BLE001 - no view of the peers (coordinator down): REMOTE still works
            log.warning("peer lookup failed; fetching from REMOTE", extra={"component_id": rec.id, "error": str(exc)})
            return False
        for node_id, address in holders:
            with _tracer.start_as_current_span("im.fetch") as span:
                span.set_attribute("component_id", rec.id)
                span.set_attribute("source", SOURCE_PEER)
                span.set_attribute("peer_node_id", node_id)
                try:
                    size = await self.ssd.fetch_verified(rec, functools.partial(peers.read, address, rec))
                except ResourceExhausted:
                    raise  # no room in SSD: REMOTE would not fit either
                except Exception as exc:  # noqa: BLE001 - whatever went wrong with this peer, REMOTE still works
                    log.warning(
                        "peer fetch failed; trying the next peer or REMOTE",
                        extra={"component_id": rec.id, "peer_node_id": node_id, "peer": address, "error": str(exc)},
                    )
                    span.set_attribute("error", str(exc))
                    continue
                span.set_attribute("bytes", size)
            self.plane.peer_fetches += 1
            self.plane.peer_bytes += size
            log.info("fetched from a peer", extra={"component_id": rec.id, "peer_node_id": node_id, "bytes": size})
            return True
        return False

    async def _load_host(self, rec: Record, *, admission: bool = False) -> Tier:
        source = await self._ensure_ssd(rec)
        ssd_entry = self.ssd.entries.get(rec.id)
        if ssd_entry is None:
            raise Unavailable(f"component {rec.id!r} left the SSD tier while loading; retry")
        transient = admission and not self.admission.keeps(rec.id, ssd_entry.bytes, self.host.room_for, time.time())
        with self.ssd.reading(rec.id):
            await self.host.load(rec, self.ssd.path(ssd_entry), ssd_entry.is_dir, transient=transient)
        return source

    # ---- reload costs (for the victim choosers) -----------------------------------------

    def _host_reload_s(self, component_id: str, nbytes: int) -> float:
        """Seconds to bring a HOST copy back: from SSD when it is there, else from REMOTE through SSD."""
        seconds = nbytes / self.host.counters.bandwidth(DEFAULT_SSD_BPS)
        if component_id not in self.ssd.entries:
            seconds += nbytes / self.ssd.counters.bandwidth(DEFAULT_REMOTE_BPS)
        return seconds

    def _ssd_reload_s(self, component_id: str, nbytes: int) -> float:
        """Seconds to bring an SSD copy back from REMOTE."""
        return nbytes / self.ssd.counters.bandwidth(DEFAULT_REMOTE_BPS)

    # ---- residency -------------------------------------------------------------------------

    def _notify(self, component_id: str, tier: Tier, present: bool, nbytes: int, last_used: float) -> None:
        if tier == Tier.HOST and not present:
            self.prefetched.discard(component_id)  # evicted before any Acquire used it: no prefetch hit
        update = _residency_update(component_id, tier, present, nbytes, last_used)
        for listener in self.listeners:
            listener(update)

    def snapshot(self) -> list[coordinator_pb2.ResidencyUpdate]:
        """Every copy this node holds, as residency updates (for a full-snapshot report)."""
        out = [_residency_update(e.component_id, Tier.SSD, True, e.bytes, e.last_used) for e in self.ssd.entries.values()]
        out += [_residency_update(e.component_id, Tier.HOST, True, e.bytes, e.last_used) for e in self.host.entries.values()]
        return out


def _residency_update(
    component_id: str, tier: Tier, present: bool, nbytes: int, last_used: float
) -> coordinator_pb2.ResidencyUpdate:
    return coordinator_pb2.ResidencyUpdate(
        component_id=component_id,
        tier=int(tier),  # type: ignore[arg-type]
        present=present,
        bytes=nbytes,
        last_used_unix=last_used,
    )
