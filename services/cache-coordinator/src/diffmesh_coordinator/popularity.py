"""Time-decayed popularity of components and pipelines, kept in Redis sorted sets.

This is the seam for the popularity policy: :class:`CoordinatorStore` hands every batch of
records to a :class:`PopularityCounter`, which queues its Redis writes on the same
transaction that appends the records to the request stream.

:class:`DecayedPopularity` uses *forward decay*, the arithmetic of
:class:`diffmesh.policy.popularity.DecayedCounter` (:func:`~diffmesh.policy.popularity.forward_growth`):
a request at time ``t`` adds ``exp(lambda x (t - ref))`` to its pipeline's and its
components' scores (``ZINCRBY``), against one reference time ``ref`` kept in Redis, so
Redis does the counting and no write touches other members. The decayed count at ``now``
is the score divided by ``exp(lambda x (now - ref))``. Before that factor could overflow,
one Lua script multiplies every score by the shrink factor and moves ``ref`` to ``now``;
writers WATCH the reference key, so a write that raced a rebase retries with the new one.
Requests count at the coordinator's clock when they are stored (routers' clocks may skew).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from diffmesh.policy.popularity import Growth, decay_rate, forward_growth
from diffmesh.v1 import coordinator_pb2

from diffmesh_coordinator.keys import KeyLayout

# KEYS: the sorted sets to rescale, then the reference key; ARGV: shrink factor, new reference.
_REBASE_LUA = """
local shrink = tonumber(ARGV[1])
for i = 1, #KEYS - 1 do
  local rows = redis.call('ZRANGE', KEYS[i], 0, -1, 'WITHSCORES')
  for j = 1, #rows, 2 do
    redis.call('ZADD', KEYS[i], tonumber(rows[j + 1]) * shrink, rows[j])
  end
end
redis.call('SET', KEYS[#KEYS], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class RankedPipeline:
    """A pipeline with its decayed request count and the component ids its records named."""

    key: str
    count: float
    component_ids: tuple[str, ...]


class PopularityCounter(Protocol):
    """Turns recorded requests into popularity state."""

    def watched_keys(self, keys: KeyLayout) -> list[str]:
        """Keys the record transaction WATCHes (it retries when one changed meanwhile)."""
        ...

    async def prepare(self, pipe: Any, keys: KeyLayout, now: float) -> Any:
        """Reads what the writes need, on the WATCHing pipeline before MULTI; returns it for :meth:`queue_updates`."""
        ...

    def queue_updates(self, pipe: Any, keys: KeyLayout, records: Sequence[coordinator_pb2.RequestRecord], prepared: Any) -> None:
        """Queues the Redis writes for ``records`` on the transaction pipeline ``pipe`` (after MULTI)."""
        ...

    async def component_counts(self, redis: Any, keys: KeyLayout, limit: int, now: float) -> list[tuple[str, float]]:
        """The ``limit`` most requested components and their counts at ``now``, most requested first, ties by id."""
        ...


def _decayed(score: float, growth: Growth) -> float:
    """The decayed count at the growth's time of a score scaled against the stored reference."""
    return score * growth.shrink if growth.shrink is not None else score / growth.factor


class DecayedPopularity:
    """Forward-decayed counts in ``pop:components`` and ``pop:pipelines``, reference in ``pop:ref``."""

    def __init__(self, half_life_s: float = 3600.0, clock: Callable[[], float] = time.time) -> None:
        self.half_life_s = half_life_s
        self.lam = decay_rate(half_life_s)
        self.clock = clock

    def watched_keys(self, keys: KeyLayout) -> list[str]:
        """The reference key: a rebase between read and write makes the write retry."""
        return [keys.popularity_ref]

    async def _growth(self, redis: Any, keys: KeyLayout, now: float) -> Growth:
        raw = await redis.get(keys.popularity_ref)
        return forward_growth(self.lam, now, now if raw is None else float(raw))

    async def prepare(self, pipe: Any, keys: KeyLayout, now: float) -> tuple[Growth, bool]:
        """The growth factor at ``now`` and whether the reference key is missing (first write)."""
        raw = await pipe.get(keys.popularity_ref)
        return forward_growth(self.lam, now, now if raw is None else float(raw)), raw is None

    def queue_updates(self, pipe: Any, keys: KeyLayout, records: Sequence[coordinator_pb2.RequestRecord], prepared: Any) -> None:
        """Adds ``growth`` per record to its pipeline and to each distinct component it uses."""
        growth, missing_ref = prepared
        if missing_ref:
            pipe.set(keys.popularity_ref, repr(growth.ref))
        elif growth.shrink is not None:
            self.queue_rebase(pipe, keys, growth)
        pipelines: dict[str, float] = {}
        components: dict[str, float] = {}
        first_ids: dict[str, str] = {}
        for r in records:
            pipelines[r.pipeline_key] = pipelines.get(r.pipeline_key, 0.0) + growth.factor
            first_ids.setdefault(r.pipeline_key, ",".join(dict.fromkeys(r.component_ids)))
            for cid in set(r.component_ids):
                components[cid] = components.get(cid, 0.0) + growth.factor
        for key, amount in sorted(pipelines.items()):
            pipe.zincrby(keys.pipeline_popularity, amount, key)
        for cid, amount in sorted(components.items()):
            pipe.zincrby(keys.component_popularity, amount, cid)
        if first_ids:
            pipe.hset(keys.pipeline_components, mapping=first_ids)

    def queue_rebase(self, pipe: Any, keys: KeyLayout, growth: Growth) -> None:
        """Queues the rescale of every score by ``growth.shrink`` and the move of the reference."""
        rebase_keys = [keys.pipeline_popularity, keys.component_popularity, keys.popularity_ref]
        pipe.eval(_REBASE_LUA, len(rebase_keys), *rebase_keys, repr(growth.shrink), repr(growth.ref))

    async def component_counts(self, redis: Any, keys: KeyLayout, limit: int, now: float) -> list[tuple[str, float]]:
        """Reads ``pop:components`` with the reference in one transaction, then orders ties by id."""
        async with redis.pipeline(transaction=True) as pipe:
            pipe.get(keys.popularity_ref)
            pipe.zrange(keys.component_popularity, 0, limit - 1, desc=True, withscores=True)
            raw_ref, rows = await pipe.execute()
        growth = forward_growth(self.lam, now, now if raw_ref is None else float(raw_ref))
        out = [(str(m), _decayed(float(score), growth)) for m, score in rows]
        return sorted(out, key=lambda row: (-row[1], row[0]))

    async def ranked_pipelines(self, redis: Any, keys: KeyLayout, now: float, min_count: float) -> list[RankedPipeline]:
        """Pipelines whose decayed count at ``now`` is at least ``min_count``, most requested first (ties by key)."""
        async with redis.pipeline(transaction=True) as pipe:
            pipe.get(keys.popularity_ref)
            pipe.zrange(keys.pipeline_popularity, 0, -1, desc=True, withscores=True)
            raw_ref, rows = await pipe.execute()
        growth = forward_growth(self.lam, now, now if raw_ref is None else float(raw_ref))
        counted = [(str(m), _decayed(float(score), growth)) for m, score in rows]
        counted = [(k, c) for k, c in counted if c >= min_count]
        counted.sort(key=lambda row: (-row[1], row[0]))
        if not counted:
            return []
        ids = await redis.hmget(keys.pipeline_components, [k for k, _ in counted])
        return [
            RankedPipeline(k, c, tuple(filter(None, (raw or "").split(",")))) for (k, c), raw in zip(counted, ids, strict=True)
        ]

    async def prune(self, redis: Any, keys: KeyLayout, now: float, min_count: float) -> int:
        """Forgets pipelines and components whose decayed count at ``now`` fell below ``min_count``; returns the pipelines.

        A WATCH transaction on the reference key, so a rebase meanwhile makes it retry with
        the new scale (a stale threshold would otherwise drop everything).
        """
        removed = 0

        async def tx(pipe: Any) -> None:
            nonlocal removed
            growth = await self._growth(pipe, keys, now)
            if growth.shrink is not None:
                return  # the next write rebases first; pruning waits for it
            floor = min_count * growth.factor
            dead = await pipe.zrangebyscore(keys.pipeline_popularity, "-inf", f"({floor!r}")
            pipe.multi()
            if dead:
                pipe.zrem(keys.pipeline_popularity, *dead)
                pipe.hdel(keys.pipeline_components, *dead)
            pipe.zremrangebyscore(keys.component_popularity, "-inf", f"({floor!r}")
            removed = len(dead)

        await redis.transaction(tx, keys.popularity_ref)
        return removed
