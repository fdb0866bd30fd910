"""Eviction-policy seam of the SSD and HOST tiers.

A tier asks its policy which unpinned copies to drop to free ``need_bytes``. This issue
ships least-recently-used; the utility policy of :mod:`diffmesh.policy` (reuse
probability x reload cost / bytes, by kind) plugs in through the same interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Candidate:
    """An evictable copy: nothing leases it and nothing is loading from it."""

    component_id: str
    bytes: int
    last_used: float
    kind: int


class EvictionPolicy(Protocol):
    """Chooses victims among evictable copies."""

    def choose(self, candidates: Sequence[Candidate], need_bytes: int, now: float) -> list[str]:
        """Ids to evict, in order, freeing at least ``need_bytes`` if the candidates allow it."""
        ...


class LruPolicy:
    """Least recently used first."""

    def choose(self, candidates: Sequence[Candidate], need_bytes: int, now: float) -> list[str]:
        """Oldest ``last_used`` first until ``need_bytes`` are covered."""
        victims: list[str] = []
        freed = 0
        for cand in sorted(candidates, key=lambda c: (c.last_used, c.component_id)):
            if freed >= need_bytes:
                break
            victims.append(cand.component_id)
            freed += cand.bytes
        return victims
