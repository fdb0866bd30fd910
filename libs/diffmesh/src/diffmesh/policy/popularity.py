"""Popularity: exponentially time-decayed request counters and popularity bands.

A counter's value halves every ``half_life_s`` seconds without requests and grows by one
(or by ``amount``) with each request. The decayed count divided by the mean lifetime
``half_life_s / ln 2`` estimates the current request rate. Ranking keys by decayed count
gives the bands: ``HOT`` (top ``hot_fraction`` of the ranked keys), ``WARM`` (the next
``warm_fraction``) and ``COLD`` (the rest). Time is always an argument: no clocks here.
"""

from __future__ import annotations

import math
from collections.abc import Container, Hashable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, NamedTuple, TypeVar

K = TypeVar("K", bound=Hashable)

LN2 = math.log(2.0)

REBASE_EXPONENT = 300.0
"""Forward decay moves its reference time once the growth factor reaches ``exp(REBASE_EXPONENT)``
(about 1e130), far below the float limit (about 1e308)."""


def decay_rate(half_life_s: float) -> float:
    """The decay constant lambda of a half-life: ``ln 2 / half_life_s`` (per second)."""
    if half_life_s <= 0:
        raise ValueError("half_life_s must be positive")
    return LN2 / half_life_s


class Growth(NamedTuple):
    """Forward decay at one time: the factor new requests are scaled by, against which reference."""

    factor: float
    """``exp(lambda x (t - ref))``: a request at ``t`` adds ``amount x factor``; a scaled value
    divided by it is the decayed count at ``t``."""
    ref: float
    """The reference time to use from now on."""
    shrink: float | None
    """When the reference moved to ``t``: multiply every stored scaled value by this first; else None."""


def forward_growth(lam: float, t: float, ref: float) -> Growth:
    """Forward decay's growth factor at ``t`` against reference ``ref`` (decay constant ``lam``).

    Values are stored scaled by ``exp(lam x (t_update - ref))``, so decaying everything is
    dividing by one factor at read time and writes never touch other keys. Before the
    factor could overflow (``REBASE_EXPONENT``) the reference moves to ``t``: the result then
    carries the ``shrink`` every stored value must be multiplied by, and a factor of 1.
    :class:`DecayedCounter` keeps its values in memory this way; the coordinator keeps them
    in Redis sorted sets with the same arithmetic.
    """
    x = lam * (t - ref)
    if x > REBASE_EXPONENT:
        return Growth(1.0, t, math.exp(-x))
    return Growth(math.exp(x), ref, None)


class Band(StrEnum):
    """Popularity band of a pipeline (or component)."""

    HOT = "HOT"
    WARM = "WARM"
    COLD = "COLD"


@dataclass(frozen=True)
class BandThresholds:
    """Fractions of the ranked keys in each band (settings; the paper's 5 % / 25 %)."""

    hot_fraction: float = 0.05
    warm_fraction: float = 0.25
    hysteresis: float = 0.0
    """A key that was HOT stays HOT while its rank is within ``(1 + hysteresis) x`` the HOT count,
    so keys at the boundary do not flap. Off by default: on the shared trace keeping more
    pipelines pinned cost more (fewer unpinned workers) than the avoided replica moves saved."""

    def __post_init__(self) -> None:
        if not (0.0 <= self.hot_fraction <= 1.0 and 0.0 <= self.warm_fraction <= 1.0):
            raise ValueError("band fractions must lie in [0, 1]")
        if self.hot_fraction + self.warm_fraction > 1.0:
            raise ValueError("hot_fraction + warm_fraction must not exceed 1")


class DecayedCounter(Generic[K]):
    """Exponentially time-decayed counts per key.

    ``add`` and ``count`` are O(1); ``ranked`` sorts the live keys. Times must not go
    backwards for one key (an earlier time is treated as the key's last update time).

    Values are stored scaled by ``exp(lambda x (t_update - t_ref))`` against one reference
    time, so a request adds ``amount x growth(t)`` and no per-key decay is computed on
    writes; ``growth(t)`` is cached per time (callers pass the same ``t`` for every key
    of one event) and the reference moves forward (rescaling all values) before the
    factor could overflow. This is an exact rewrite of the per-key decay, not an
    approximation.
    """

    def __init__(self, half_life_s: float) -> None:
        self._lambda = decay_rate(float(half_life_s))
        self.half_life_s = float(half_life_s)
        self._value: dict[K, float] = {}
        """Scaled values: decayed count at ``_stamp[k]`` x ``growth(_stamp[k])``."""
        self._stamp: dict[K, float] = {}
        self._ref = 0.0
        self._ref_set = False
        self._cached_t = math.nan
        self._cached_g = 1.0

    def __len__(self) -> int:
        return len(self._value)

    def __contains__(self, key: object) -> bool:
        return key in self._value

    def _growth(self, t: float) -> float:
        if t == self._cached_t:
            return self._cached_g
        if not self._ref_set:
            self._ref, self._ref_set = t, True
        g, self._ref, shrink = forward_growth(self._lambda, t, self._ref)
        if shrink is not None:
            for k in self._value:
                self._value[k] *= shrink
        self._cached_t, self._cached_g = t, g
        return g

    def add(self, key: K, t: float, amount: float = 1.0) -> float:
        """Record ``amount`` requests for ``key`` at time ``t``; returns the new decayed count."""
        stamp = self._stamp.get(key)
        if stamp is not None and t < stamp:
            t = stamp
        g = self._cached_g if t == self._cached_t else self._growth(t)
        value = self._value.get(key, 0.0) + amount * g
        self._value[key] = value
        self._stamp[key] = t
        return value / g

    def add_many(self, keys: Iterable[K], t: float, amount: float = 1.0) -> None:
        """:meth:`add` for several keys at one time (one growth factor for all)."""
        value, stamp = self._value, self._stamp
        g = self._growth(t)
        inc = amount * g
        for key in keys:
            s = stamp.get(key)
            if s is not None and t < s:
                self.add(key, t, amount)
                continue
            value[key] = value.get(key, 0.0) + inc
            stamp[key] = t

    def count(self, key: K, t: float) -> float:
        """Decayed count of ``key`` at time ``t`` (0 for unknown keys)."""
        old = self._value.get(key)
        if old is None:
            return 0.0
        stamp = self._stamp[key]
        if t == self._cached_t and t >= stamp:
            return old / self._cached_g
        return old / self._growth(t if t > stamp else stamp)

    def rate(self, key: K, t: float) -> float:
        """Estimated request rate of ``key`` at ``t`` (requests per second)."""
        old = self._value.get(key)
        if old is None:
            return 0.0
        if t == self._cached_t and t >= self._stamp[key]:
            return old / self._cached_g * self._lambda
        return self.count(key, t) * self._lambda

    def ranked(self, t: float, keys: Iterable[K] | None = None) -> list[tuple[K, float]]:
        """``(key, decayed count)`` sorted by count, highest first; ties by key order of insertion."""
        items = self._value.items() if keys is None else ((k, self._value[k]) for k in keys if k in self._value)
        inv = 1.0 / self._growth(t)
        stamp = self._stamp
        scored = [(k, v * inv if t >= stamp[k] else v / self._growth(stamp[k])) for k, v in items]
        scored.sort(key=lambda kv: -kv[1])
        return scored

    def total(self, t: float) -> float:
        """Sum of all decayed counts at ``t``."""
        return sum(c for _, c in self.ranked(t))

    def prune(self, t: float, min_count: float) -> int:
        """Forget keys whose decayed count fell below ``min_count``; returns how many."""
        dead = [k for k, c in self.ranked(t) if c < min_count]
        for k in dead:
            del self._value[k]
            del self._stamp[k]
        return len(dead)


def band_sizes(n: int, thresholds: BandThresholds) -> tuple[int, int]:
    """How many of ``n`` ranked keys are HOT and WARM.

    Counts round up so that any non-empty ranking has at least one HOT key.
    """
    if n <= 0:
        return 0, 0
    hot = min(n, math.ceil(n * thresholds.hot_fraction - 1e-9))
    warm_end = min(n, math.ceil(n * (thresholds.hot_fraction + thresholds.warm_fraction) - 1e-9))
    return hot, max(0, warm_end - hot)


def assign_bands(
    ranked_keys: Sequence[K], thresholds: BandThresholds = BandThresholds(), previous_hot: Container[K] = ()
) -> dict[K, Band]:
    """Bands for keys listed most popular first; keys not listed are COLD by convention.

    Keys in ``previous_hot`` keep HOT down to rank ``hot x (1 + hysteresis)``.
    """
    hot, warm = band_sizes(len(ranked_keys), thresholds)
    sticky = math.ceil(hot * (1.0 + thresholds.hysteresis) - 1e-9)
    bands: dict[K, Band] = {}
    for i, key in enumerate(ranked_keys):
        if i < hot or (i < sticky and key in previous_hot):
            bands[key] = Band.HOT
        else:
            bands[key] = Band.WARM if i < hot + warm else Band.COLD
    return bands
