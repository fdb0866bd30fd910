"""Popularity accounting of recorded requests.

This is the seam for the popularity policy: :class:`CoordinatorStore` hands every batch of
records to a :class:`PopularityCounter`, which queues its Redis writes on the same
transaction that appends the records to the request stream. :class:`PlainCounts` keeps
plain request counts per component and per pipeline; time-decayed popularity, ranks and
bands (``diffmesh.policy``) replace it by implementing the same protocol.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

from diffmesh.v1 import coordinator_pb2

from diffmesh_coordinator.keys import KeyLayout


class PopularityCounter(Protocol):
    """Turns recorded requests into popularity state."""

    def queue_updates(self, pipe: Any, keys: KeyLayout, records: Sequence[coordinator_pb2.RequestRecord]) -> None:
        """Queues the Redis writes for ``records`` on the transaction pipeline ``pipe``."""
        ...

    async def component_counts(self, redis: Any, keys: KeyLayout, limit: int) -> list[tuple[str, float]]:
        """The ``limit`` most requested components and their counts, most requested first, ties by id."""
        ...


class PlainCounts:
    """Undecayed request counts: ``pop:components`` and ``pop:pipelines`` sorted sets."""

    def queue_updates(self, pipe: Any, keys: KeyLayout, records: Sequence[coordinator_pb2.RequestRecord]) -> None:
        """Adds one per record to its pipeline and to each distinct component it uses."""
        pipelines = Counter(r.pipeline_key for r in records)
        components = Counter(cid for r in records for cid in set(r.component_ids))
        for key, n in sorted(pipelines.items()):
            pipe.zincrby(keys.pipeline_popularity, n, key)
        for cid, n in sorted(components.items()):
            pipe.zincrby(keys.component_popularity, n, cid)

    async def component_counts(self, redis: Any, keys: KeyLayout, limit: int) -> list[tuple[str, float]]:
        """Reads ``pop:components`` (``ZRANGE … REV WITHSCORES``), then orders ties by id."""
        rows = await redis.zrange(keys.component_popularity, 0, limit - 1, desc=True, withscores=True)
        out = [(m.decode() if isinstance(m, bytes) else str(m), float(score)) for m, score in rows]
        return sorted(out, key=lambda row: (-row[1], row[0]))
