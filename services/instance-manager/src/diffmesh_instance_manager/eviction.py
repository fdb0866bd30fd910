"""Eviction of the SSD and HOST tiers: the shared utility policy behind a small adapter.

A tier asks its :class:`VictimChooser` which evictable copies (neither leased, nor being
read, nor pinned) to drop to free ``need_bytes``. :class:`UtilityPolicy` adapts
:class:`diffmesh.policy.eviction.UtilityEviction` — utility = P(reuse within the horizon)
x seconds to reload the copy from the tier below x kind weight / bytes, lowest first —
to the instance manager: reuse rates come from a time-decayed request counter the store
feeds on every use (:class:`Popularity`), reload costs from the bandwidth the node
measured (or a default before the first load). Among equal utilities (e.g. copies
nobody has asked for lately) the least recently used goes first.

Under ``DIFFMESH_POLICY=lru`` the tiers use :class:`LruChooser` instead: the shared
:class:`diffmesh.policy.eviction.LRUEviction`, least recently used first, as the
simulator's ``lru`` system evicts.

(Not :class:`diffmesh.policy.eviction.EvictionPolicy`, the simulator's interface over a
whole tier: a chooser only ranks the copies a tier offers it.)
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from diffmesh.catalog import kind_name
from diffmesh.policy.eviction import LRUEviction, UtilityEviction
from diffmesh.policy.popularity import DecayedCounter


@dataclass(frozen=True)
class EvictableCopy:
    """A copy a tier may drop: nothing leases it, nothing is loading from it, the hot plan does not pin it."""

    component_id: str
    bytes: int
    last_used: float
    kind: int


class VictimChooser(Protocol):
    """Chooses which evictable copies of a tier go."""

    def choose(self, candidates: Sequence[EvictableCopy], need_bytes: int, now: float) -> list[str]:
        """Ids to evict, in order, freeing at least ``need_bytes`` if the candidates allow it (else none)."""
        ...

    def order(self, candidates: Sequence[EvictableCopy], now: float) -> list[str]:
        """Every candidate that may go, the first to go first (a pool class needs one block, not bytes)."""
        ...


class Popularity:
    """Time-decayed request counts per component (fed by the store on every use)."""

    def __init__(self, half_life_s: float = 600.0) -> None:
        self.counter: DecayedCounter[str] = DecayedCounter(half_life_s)

    def record(self, component_id: str, t: float) -> None:
        """One use of ``component_id`` at ``t``."""
        self.counter.add(component_id, t)

    def rate(self, component_id: str, t: float) -> float:
        """Current request rate (requests per second)."""
        return self.counter.rate(component_id, t) if component_id in self.counter else 0.0


class _Model:
    """The :class:`diffmesh.policy.eviction.UtilityModel` of one choice."""

    def __init__(
        self,
        candidates: Sequence[EvictableCopy],
        popularity: Popularity,
        reload_cost_s: Callable[[str, int], float],
        pinned: Collection[str],
    ) -> None:
        self._by_id = {c.component_id: c for c in candidates}
        self._popularity = popularity
        self._reload_cost_s = reload_cost_s
        self._pinned = pinned

    def rate(self, key: str, t: float) -> float:
        return self._popularity.rate(key, t)

    def reload_cost_s(self, key: str) -> float:
        return self._reload_cost_s(key, self._by_id[key].bytes)

    def kind(self, key: str) -> str:
        return kind_name(self._by_id[key].kind)

    def pinned(self, key: str) -> bool:
        return key in self._pinned


class UtilityPolicy:
    """Lowest utility first (the shared policy module's :class:`UtilityEviction`); pinned copies never.

    ``reload_cost_s(component_id, bytes)`` says how long bringing the copy back from the
    tier below would take (the store answers from measured bandwidths); ``pinned`` is the
    hot plan's set, read at every choice.
    """

    def __init__(
        self,
        popularity: Popularity,
        reload_cost_s: Callable[[str, int], float],
        pinned: Collection[str],
        horizon_s: float = 300.0,
    ) -> None:
        self.popularity = popularity
        self.reload_cost_s = reload_cost_s
        self.pinned = pinned
        self.horizon_s = horizon_s

    def choose(self, candidates: Sequence[EvictableCopy], need_bytes: int, now: float) -> list[str]:
        """Victims in ascending utility (ties: least recently used first) until ``need_bytes`` are covered."""
        if need_bytes <= 0:
            return []
        policy: UtilityEviction[str] = UtilityEviction(
            _Model(candidates, self.popularity, self.reload_cost_s, self.pinned), self.horizon_s
        )
        # Insertion order is the policy's tie-break: oldest use first.
        ordered = sorted(candidates, key=lambda c: (c.last_used, c.component_id))
        for cand in ordered:
            policy.on_insert(cand.component_id, cand.bytes, now)
        sizes = {c.component_id: c.bytes for c in ordered}
        victims = policy.victims(need_bytes, now, sizes, frozenset())
        if victims is None:  # not enough: evict nothing, the caller reports RESOURCE_EXHAUSTED
            return []
        return victims

    def order(self, candidates: Sequence[EvictableCopy], now: float) -> list[str]:
        """Every unpinned candidate, lowest utility first (for pool-class eviction)."""
        free = [c for c in candidates if c.component_id not in self.pinned]
        return self.choose(free, sum(c.bytes for c in free) or 1, now)


class LruChooser:
    """Least recently used first (the shared :class:`LRUEviction`); pinned copies never.

    The baseline of ``DIFFMESH_POLICY=lru``: no popularity, no reload costs.
    """

    def __init__(self, pinned: Collection[str]) -> None:
        self.pinned = pinned

    def choose(self, candidates: Sequence[EvictableCopy], need_bytes: int, now: float) -> list[str]:
        """Victims, least recently used first, until ``need_bytes`` are covered (none when they cannot be)."""
        if need_bytes <= 0:
            return []
        policy: LRUEviction[str] = LRUEviction()
        for cand in sorted(candidates, key=lambda c: (c.last_used, c.component_id)):
            policy.on_insert(cand.component_id, cand.bytes, now)
        sizes = {c.component_id: c.bytes for c in candidates}
        victims = policy.victims(need_bytes, now, sizes, self.pinned)
        return victims if victims is not None else []

    def order(self, candidates: Sequence[EvictableCopy], now: float) -> list[str]:
        """Every unpinned candidate, least recently used first (for pool-class eviction)."""
        free = [c for c in candidates if c.component_id not in self.pinned]
        return self.choose(free, sum(c.bytes for c in free) or 1, now)
