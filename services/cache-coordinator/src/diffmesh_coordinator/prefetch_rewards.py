"""The WARM prefetch bandit of the planning coordinator, and its rewards from residency reports.

Picks: :class:`~diffmesh.policy.prefetch.BanditPrefetcher` chooses which WARM pipelines to
prefetch, at most ``per_bucket`` at a time; the planner places them on nodes. A new
time-of-day bucket starts from no picks. Within a bucket, picks that are still WARM stay
(so the plan, and its version, stay the same while nothing changes), and whenever a slot
is free and the WARM set offers pipelines not picked — the bucket's first plan, WARM
pipelines that appear later (a cold start), a pick that left the band — the bandit selects
among those for the free slots at once, not at the next bucket.

Rewards: for each prefetched copy (node, component) the tracker watches that node's HOST
residency as the view stream reports it. The last use reported when the copy first shows
up in HOST is its baseline; a later report of the same copy with a newer last use (a
re-report, or the report of its eviction, which carries its last use) is a *hit*; an
eviction without a newer use is a *miss*. A copy that never arrives within ``give_up_s``
is forgotten without a reward.

State lives in this coordinator's memory: when another replica takes over planning, the
bandit starts again from its prior (a few buckets of learning lost, nothing wrong done).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from diffmesh.policy.planner import PlanDecision
from diffmesh.policy.prefetch import BanditPrefetcher, time_bucket
from diffmesh.v1 import common_pb2, plan_pb2

log = logging.getLogger(__name__)


@dataclass
class _Outstanding:
    bucket: int
    pipeline_key: str
    issued_unix: float
    baseline: float | None = None
    """Last use reported when the copy was first seen in HOST; None: not seen yet."""


class PrefetchRewards:
    """Bandit picks per time bucket and hit/miss rewards from HOST residency changes."""

    def __init__(self, per_bucket: int, bucket_s: float, give_up_s: float, seed: int = 0) -> None:
        self.per_bucket = per_bucket
        self.bucket_s = bucket_s
        self.give_up_s = give_up_s
        self.bandit: BanditPrefetcher[str] = BanditPrefetcher(seed=seed)
        self.bucket = -1
        self.picks: list[str] = []
        """The current bucket's picks that were still WARM at the last plan, in pick order."""
        self.outstanding: dict[tuple[str, str], _Outstanding] = {}
        self.hits = 0
        self.misses = 0

    def chooser(self, now: float) -> Callable[[Sequence[str]], Sequence[str]]:
        """The planner's ``choose_prefetch`` at ``now``: stable picks, free slots filled from new WARM pipelines."""
        bucket = time_bucket(now, self.bucket_s)

        def choose(warm: Sequence[str]) -> Sequence[str]:
            if self.per_bucket <= 0:
                return []
            if bucket != self.bucket:
                self.bucket = bucket
                self.picks = []
            offered = set(warm)
            picks = [k for k in self.picks if k in offered]
            free = self.per_bucket - len(picks)
            others = [k for k in warm if k not in picks]
            if free > 0 and others:
                picks += self.bandit.select(bucket, others, free)
            self.picks = picks
            return list(picks)

        return choose

    def issued(self, decision: PlanDecision, now: float, host_last_used: Mapping[tuple[str, str], float]) -> None:
        """Starts tracking the prefetch picks of ``decision``.

        ``host_last_used`` maps ``(node_id, component_id)`` to the last use of the HOST
        copies nodes hold now: a pick already there starts with that baseline.
        """
        prefetch_of = {n.node_id: set(n.prefetch_ids) for n in decision.nodes}
        components = {p.key: p.component_ids for p in decision.pipelines}
        for key, node_id in decision.prefetch_homes:
            for cid in components.get(key, ()):
                if cid in prefetch_of.get(node_id, ()) and (node_id, cid) not in self.outstanding:
                    self.outstanding[(node_id, cid)] = _Outstanding(self.bucket, key, now, host_last_used.get((node_id, cid)))

    def observe(self, change: plan_pb2.ResidencyChange) -> None:
        """Feeds one residency change of the view stream (only instance managers' HOST copies matter)."""
        if change.worker_id or not self.outstanding:
            return
        node_id = change.node_id
        seen: set[str] = set()
        for copy in change.copies:
            if copy.tier != common_pb2.TIER_HOST:
                continue
            seen.add(copy.component_id)
            entry = self.outstanding.get((node_id, copy.component_id))
            if entry is None:
                continue
            if entry.baseline is None:
                if copy.present:
                    entry.baseline = copy.last_used_unix
                else:
                    del self.outstanding[(node_id, copy.component_id)]  # went before it was seen: no outcome
            elif copy.last_used_unix > entry.baseline:
                self._reward((node_id, copy.component_id), True)
            elif not copy.present:
                self._reward((node_id, copy.component_id), False)
        if change.full_snapshot:
            # Tracked copies absent from a full snapshot are gone, last use unknown: a miss once they had arrived.
            for (n, cid), entry in list(self.outstanding.items()):
                if n == node_id and cid not in seen and entry.baseline is not None:
                    self._reward((n, cid), False)

    def expire(self, now: float) -> None:
        """Forgets prefetches that never arrived within ``give_up_s``."""
        for key, entry in list(self.outstanding.items()):
            if entry.baseline is None and now - entry.issued_unix > self.give_up_s:
                del self.outstanding[key]

    def _reward(self, key: tuple[str, str], hit: bool) -> None:
        entry = self.outstanding.pop(key)
        self.bandit.reward(entry.bucket, entry.pipeline_key, hit)
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        log.info(
            "prefetch outcome",
            extra={"node_id": key[0], "component_id": key[1], "pipeline_key": entry.pipeline_key, "hit": hit},
        )
