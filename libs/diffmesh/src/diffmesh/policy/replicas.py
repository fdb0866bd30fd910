"""HOT replica planner: persistent GPU replicas for HOT pipelines, sized by load share.

Each HOT pipeline gets ``max(min_replicas, round(share x workers x headroom))`` replicas
(``share`` is its fraction of the cluster's decayed work). The plan is persistent: a
replica stays where it was while the target still asks for it, and a plan only shrinks
when the target falls clearly below the current count (``shrink_slack``). New replicas go
first to workers that already pin the same base (the base is shared), then to nodes that
already host the pipeline (their SSD/HOST tiers hold its files), then to the worker with
the most unpinned memory; worker order breaks ties, so the plan is deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class HotPipeline:
    """A HOT pipeline to place."""

    key: str
    share: float
    """Fraction of the cluster's load (0..1)."""
    base: str
    base_bytes: int
    extra_bytes: int = 0
    """Bytes pinned beside the base: LoRAs, a fused overlay, ControlNets."""
    nodes: tuple[str, ...] = ()
    """Nodes whose SSD/HOST tiers already hold the pipeline's files (preferred for new replicas)."""


@dataclass(frozen=True)
class WorkerSlot:
    """A worker that can hold replicas."""

    worker_id: str
    node_id: str
    pin_budget_bytes: int
    """Device bytes the plan may pin on it (the rest stays for activations and COLD work)."""


@dataclass(frozen=True)
class ReplicaSettings:
    """Planner settings."""

    headroom: float = 1.0
    min_replicas: int = 1
    shrink_slack: int = 1
    """Keep current replicas unless the target is more than this many below them."""


def replica_target(share: float, n_workers: int, settings: ReplicaSettings = ReplicaSettings()) -> int:
    """Replicas a pipeline with load ``share`` should have on ``n_workers`` workers."""
    if n_workers <= 0:
        return 0
    return max(settings.min_replicas, min(n_workers, round(share * n_workers * settings.headroom)))


class _Packing:
    def __init__(self, workers: Sequence[WorkerSlot]) -> None:
        self.budget = {w.worker_id: w.pin_budget_bytes for w in workers}
        self.node = {w.worker_id: w.node_id for w in workers}
        self.order = {w.worker_id: i for i, w in enumerate(workers)}
        self.bases: dict[str, set[str]] = {w.worker_id: set() for w in workers}
        self.used = {w.worker_id: 0 for w in workers}

    def cost(self, wid: str, p: HotPipeline) -> int:
        return p.extra_bytes + (0 if p.base in self.bases[wid] else p.base_bytes)

    def fits(self, wid: str, p: HotPipeline) -> bool:
        return self.used[wid] + self.cost(wid, p) <= self.budget[wid]

    def place(self, wid: str, p: HotPipeline) -> None:
        self.used[wid] += self.cost(wid, p)
        self.bases[wid].add(p.base)


def plan_hot_replicas(
    hot: Sequence[HotPipeline],
    workers: Sequence[WorkerSlot],
    previous: Mapping[str, Sequence[str]] | None = None,
    settings: ReplicaSettings = ReplicaSettings(),
) -> dict[str, list[str]]:
    """Worker ids per HOT pipeline key (pipelines that fit nowhere get an empty list)."""
    previous = previous or {}
    pack = _Packing(workers)
    plan: dict[str, list[str]] = {}
    ordered = sorted(hot, key=lambda p: (-p.share, p.key))
    # First pass: keep existing replicas (persistence), as many as the target allows.
    for p in ordered:
        target = replica_target(p.share, len(workers), settings)
        kept: list[str] = []
        old = [w for w in previous.get(p.key, ()) if w in pack.budget]
        keep_n = len(old) if len(old) <= target + settings.shrink_slack else target
        for wid in old[:keep_n]:
            if pack.fits(wid, p):
                pack.place(wid, p)
                kept.append(wid)
        plan[p.key] = kept
    # Second pass: grow to target.
    for p in ordered:
        target = replica_target(p.share, len(workers), settings)
        chosen = plan[p.key]
        while len(chosen) < target:
            nodes = {pack.node[w] for w in chosen} | set(p.nodes)
            best: tuple[int, int, int, int] | None = None
            best_wid = ""
            for wid in pack.budget:
                if wid in chosen or not pack.fits(wid, p):
                    continue
                score = (
                    0 if p.base in pack.bases[wid] else 1,
                    0 if pack.node[wid] in nodes else 1,
                    pack.used[wid] - pack.budget[wid],
                    pack.order[wid],
                )
                if best is None or score < best:
                    best, best_wid = score, wid
            if best is None:
                break
            pack.place(best_wid, p)
            chosen.append(best_wid)
    return plan
