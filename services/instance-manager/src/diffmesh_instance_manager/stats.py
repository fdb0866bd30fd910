"""The ``Stats`` answer: tier counters, HOST pool occupancy, policy-plane counters and per-component state of one store."""

from __future__ import annotations

from diffmesh.tiers import Tier
from diffmesh.v1 import instance_manager_pb2

from diffmesh_instance_manager.store import ComponentStore


def stats_response(store: ComponentStore, node_id: str) -> instance_manager_pb2.StatsResponse:
    """Tier counters, policy-plane counters and per-component state."""
    resp = instance_manager_pb2.StatsResponse(node_id=node_id)
    for tier in (store.ssd, store.host):
        c = tier.counters
        resp.tiers.add(
            tier=int(tier.tier),  # type: ignore[arg-type]
            used_bytes=tier.used(),
            capacity_bytes=tier.capacity,
            components=len(tier.entries),
            hits=c.hits,
            misses=c.misses,
            loaded_bytes=c.loaded_bytes,
            load_seconds=c.load_seconds,
            evicted_bytes=c.evicted_bytes,
            load_gbps=c.loaded_bytes / c.load_seconds / 1e9 if c.load_seconds > 0 else 0.0,
            direct_bytes=store.host.loader.direct_bytes if tier.tier == Tier.HOST else 0,
        )
    if store.host.pool is not None:
        pool_stats = store.host.pool.stats()
        for cls in pool_stats.classes:
            resp.pool_classes.add(block_size=cls.block_size, blocks=cls.blocks, used=cls.used, wasted_bytes=cls.wasted_bytes)
        resp.fragmentation = pool_stats.fragmentation
        resp.pool_pinned = pool_stats.pinned
    plane = store.plane
    resp.plan_version = plane.plan_version
    resp.pinned_components = len(store.pinned)
    resp.prefetches_started = plane.prefetches_started
    resp.prefetch_hits = plane.prefetch_hits
    resp.fusions_done = plane.fusions_done
    resp.admissions_refused = store.admission.refused
    resp.peer_fetches = plane.peer_fetches
    resp.peer_bytes = plane.peer_bytes
    resp.remote_bytes = plane.remote_bytes
    ssd_entries, host_entries = store.ssd.entries, store.host.entries
    for cid in sorted(set(ssd_entries) | set(host_entries)):
        host = host_entries.get(cid)
        ssd = ssd_entries.get(cid)
        top = host if host is not None else ssd
        assert top is not None
        resp.components.add(
            component_id=cid,
            tier=int(Tier.HOST if host is not None else Tier.SSD),  # type: ignore[arg-type]
            bytes=top.bytes,
            leases=store.leases.refs(cid),
            last_used_unix=max(e.last_used for e in (host, ssd) if e is not None),
        )
    return resp
