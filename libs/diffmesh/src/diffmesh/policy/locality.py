"""Locality ranking: place a request on the worker that already holds most of its pipeline.

This is the router's placement v1 (issue 2). A worker is scored by the catalog bytes of
the pipeline it can reach in each tier, weighted by how cheap that tier is to use:

* GPU  — a copy built on *that* worker's device (weight 4),
* HOST — a copy in the shared-memory pool of the worker's *node* (weight 2),
* SSD  — a copy in the cache directory of the worker's *node* (weight 1),
* anything else (REMOTE, another node, another worker's GPU) counts nothing.

Each component counts once, at the best tier the worker can reach. Higher score wins;
ties go to the shorter queue, then to the smaller ``(worker_id, node_id)`` so the result
is deterministic. Pure code: no I/O, no clocks, no torch, no protobuf.

The later expected-completion-time scorer (issue 4) replaces this function behind the
same call shape in the router.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from diffmesh.tiers import Tier

TIER_WEIGHTS: Mapping[Tier, int] = {Tier.GPU: 4, Tier.HOST: 2, Tier.SSD: 1}
"""Weight of one byte reachable in each tier; tiers not listed weigh nothing."""


@dataclass(frozen=True)
class WorkerCandidate:
    """A worker the request could run on."""

    worker_id: str
    node_id: str
    queue_length: int = 0
    """Requests the router has in flight on this worker (waiting or running)."""


@dataclass(frozen=True)
class Copy:
    """One copy of a component somewhere in the mesh (a residency)."""

    component_id: str
    node_id: str
    tier: Tier
    worker_id: str = ""
    """Set for GPU copies only: the worker whose device holds the copy."""


@dataclass(frozen=True)
class RankedWorker:
    """A candidate with its score and the tier each component is reachable from."""

    candidate: WorkerCandidate
    score: int
    tiers: Mapping[str, Tier] = field(default_factory=dict)
    """Best tier per component id for this worker (``Tier.REMOTE`` when none is near)."""


def reachable_tier(copy: Copy, worker: WorkerCandidate) -> Tier | None:
    """The tier through which ``worker`` can use ``copy``, or None when the copy is not local to it."""
    if copy.node_id != worker.node_id:
        return None
    if copy.tier == Tier.GPU:
        return Tier.GPU if copy.worker_id == worker.worker_id else None
    if copy.tier in (Tier.HOST, Tier.SSD):
        return copy.tier
    return None


def rank_workers(
    components: Mapping[str, int],
    candidates: Iterable[WorkerCandidate],
    copies: Iterable[Copy],
) -> list[RankedWorker]:
    """Ranks ``candidates`` best first for a pipeline.

    ``components`` maps each component id of the pipeline to its catalog bytes;
    ``copies`` are the residencies of those components (others are ignored).
    """
    by_component: dict[str, list[Copy]] = {}
    for copy in copies:
        if copy.component_id in components:
            by_component.setdefault(copy.component_id, []).append(copy)
    ranked: list[RankedWorker] = []
    for worker in candidates:
        tiers: dict[str, Tier] = {}
        score = 0
        for component_id, size in components.items():
            best = Tier.REMOTE
            for copy in by_component.get(component_id, ()):
                tier = reachable_tier(copy, worker)
                if tier is not None and tier > best:
                    best = tier
            tiers[component_id] = best
            # A record without a size still counts as one byte, so holding it is never worth nothing.
            score += TIER_WEIGHTS.get(best, 0) * max(size, 1)
        ranked.append(RankedWorker(worker, score, tiers))
    ranked.sort(key=lambda r: (-r.score, r.candidate.queue_length, r.candidate.worker_id, r.candidate.node_id))
    return ranked
