"""COLD admission: time-decayed opportunistic caching.

A copy fetched on a miss is admitted when there is free room. When the tier is full it is
admitted only if its decayed score beats every copy it would displace (scaled by
``min_ratio``); otherwise the load bypasses the tier (it streams through to the next one)
and the tier keeps what it has. COLD copies that were admitted carry low utility, so they
are the first to go.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ColdAdmission:
    """Admission rule for copies fetched on a miss."""

    min_ratio: float = 1.0

    def admit(self, score: float, nbytes: int, free_bytes: int, victim_scores: Sequence[float] | None) -> bool:
        """Whether to keep the copy.

        ``victim_scores`` are the decayed scores of the copies the tier would evict to make
        room (None when it cannot make room at all).
        """
        if nbytes <= free_bytes:
            return True
        if victim_scores is None:
            return False
        return all(score > self.min_ratio * v for v in victim_scores)
