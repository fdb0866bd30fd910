"""Counters of the policy plane on one node (plans applied, prefetches, fusions, peer copies), for ``Stats``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PlaneCounters:
    """What this node did for the coordinator's plan, and where its SSD copies came from, since start."""

    plan_version: int = 0
    """Version of the plan applied last (0: none)."""
    prefetches_started: int = 0
    """Background HOST loads started (Prefetch RPC and plans; already-resident ids not counted)."""
    prefetch_hits: int = 0
    """Prefetched HOST copies an Acquire used before they were evicted."""
    fusions_done: int = 0
    """FUSED overlays a plan made HOST-resident here."""
    peer_fetches: int = 0
    """SSD copies fetched from a peer instance manager."""
    peer_bytes: int = 0
    """Bytes of those copies."""
    remote_bytes: int = 0
    """Bytes fetched from REMOTE into the SSD tier."""
