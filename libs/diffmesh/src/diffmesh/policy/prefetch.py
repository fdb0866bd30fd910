"""WARM prefetcher: a multi-armed bandit over prefetch candidates per time-of-day bucket.

Each (bucket, candidate) pair is an arm with a Beta posterior over "a copy prefetched in
this bucket is used before it is evicted". At a bucket's start the caller offers the
candidates (typically the WARM pipelines) and :meth:`BanditPrefetcher.select` picks the
``k`` arms with the highest Thompson samples; :meth:`reward` feeds the outcome back.
Sampling uses a seeded generator, so the same calls give the same picks.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

DAY_S = 86400.0


def time_bucket(t_s: float, bucket_s: float = 3600.0, day_s: float = DAY_S) -> int:
    """Time-of-day bucket of an absolute time (seconds; bucket 0 starts at midnight)."""
    return int((t_s % day_s) // bucket_s)


class BanditPrefetcher(Generic[K]):
    """Thompson-sampling bandit, one Beta(alpha, beta) arm per (bucket, candidate)."""

    def __init__(self, seed: int = 0, prior: tuple[float, float] = (1.0, 1.0)) -> None:
        self._rng = random.Random(seed)
        self.prior = prior
        self._arms: dict[tuple[int, K], list[float]] = {}

    def posterior(self, bucket: int, key: K) -> tuple[float, float]:
        """(alpha, beta) of an arm."""
        arm = self._arms.get((bucket, key))
        return (arm[0], arm[1]) if arm else self.prior

    def mean(self, bucket: int, key: K) -> float:
        """Posterior mean hit probability of an arm."""
        a, b = self.posterior(bucket, key)
        return a / (a + b)

    def select(self, bucket: int, candidates: Sequence[K], k: int) -> list[K]:
        """Up to ``k`` candidates to prefetch in ``bucket``, best Thompson sample first."""
        if k <= 0 or not candidates:
            return []
        draws = []
        for i, key in enumerate(candidates):
            a, b = self.posterior(bucket, key)
            draws.append((-self._rng.betavariate(a, b), i, key))
        draws.sort(key=lambda d: (d[0], d[1]))
        return [key for _, _, key in draws[:k]]

    def reward(self, bucket: int, key: K, hit: bool) -> None:
        """Outcome of one prefetch: ``hit`` when the copy was used before eviction."""
        arm = self._arms.setdefault((bucket, key), list(self.prior))
        arm[0 if hit else 1] += 1.0
