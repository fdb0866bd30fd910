"""The router's counters, served by ``GetRouterStats`` (the replay and operators read them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffmesh.policy.popularity import Band
from diffmesh.view import WorkerKey


@dataclass
class RouterStats:
    """Counts since the router started; see ``GetRouterStatsResponse`` in router.proto for each meaning."""

    requests: int = 0
    view_decisions: int = 0
    fallback_decisions: int = 0
    locate_calls: int = 0
    list_nodes_calls: int = 0
    spills: int = 0
    full_waits: int = 0
    resource_exhausted: int = 0
    fused_rewrites: int = 0
    unavailable_retries: int = 0
    bands: dict[Band, int] = field(default_factory=lambda: dict.fromkeys(Band, 0))
    routed: dict[WorkerKey, int] = field(default_factory=dict)
    """Requests each worker accepted (it streamed its first event)."""

    def accepted(self, key: WorkerKey) -> None:
        """Counts a request ``key`` accepted."""
        self.routed[key] = self.routed.get(key, 0) + 1
