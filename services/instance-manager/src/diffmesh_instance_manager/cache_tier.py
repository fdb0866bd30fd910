"""One cache tier of this node (SSD or HOST): its copies, byte budget, counters and eviction.

A copy is admitted in two steps: :meth:`CacheTier.reserve` makes room for its bytes
(asking the tier's :class:`~diffmesh_instance_manager.eviction.VictimChooser` which
evictable copies go when the tier is bounded and full, RESOURCE_EXHAUSTED with a retry
hint when not enough can go), and once the copy is in place the reservation is
returned with :meth:`CacheTier.unreserve`. Which copies may go, and how their bytes are
freed, is each tier's own (:mod:`.ssd_tier`, :mod:`.host_tier`). Event-loop confined.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from diffmesh.errors import ResourceExhausted
from diffmesh.tiers import Tier

from diffmesh_instance_manager.eviction import EvictableCopy, VictimChooser

log = logging.getLogger(__name__)

ResidencyNotify = Callable[[str, Tier, bool, int, float], None]
"""``notify(component_id, tier, present, bytes, last_used)``: a copy arrived in or left a tier."""


class CachedCopy(Protocol):
    """What a tier needs to know of one of its copies."""

    @property
    def component_id(self) -> str:
        """The component's id."""
        ...

    @property
    def kind(self) -> int:
        """Its ``ComponentKind``."""
        ...

    @property
    def bytes(self) -> int:
        """Bytes the copy occupies in the tier."""
        ...

    last_used: float


@dataclass
class TierCounters:
    """Counters of one tier since start."""

    hits: int = 0
    misses: int = 0
    loaded_bytes: int = 0
    load_seconds: float = 0.0
    evicted_bytes: int = 0

    def bandwidth(self, default: float) -> float:
        """Measured load bandwidth in bytes/s (``default`` before the first load)."""
        return self.loaded_bytes / self.load_seconds if self.load_seconds > 0 and self.loaded_bytes > 0 else default


E = TypeVar("E", bound=CachedCopy)


class CacheTier(ABC, Generic[E]):
    """Copies of one tier by component id, bounded by ``capacity`` bytes (0 = unbounded)."""

    def __init__(self, tier: Tier, capacity: int, chooser: VictimChooser, notify: ResidencyNotify, retry_after_s: float) -> None:
        self.tier = tier
        self.capacity = capacity
        self.chooser = chooser
        self.notify = notify
        self.retry_after_s = retry_after_s
        self.entries: dict[str, E] = {}
        self.counters = TierCounters()
        self.reserved = 0

    def used(self) -> int:
        """Bytes the tier's copies occupy."""
        return sum(e.bytes for e in self.entries.values())

    @abstractmethod
    def evictable(self) -> list[EvictableCopy]:
        """Copies that may go now (the tier says which are in use or pinned)."""

    @abstractmethod
    def _free(self, gone: list[E]) -> None:
        """Frees the storage of copies just dropped from the index."""

    def reserve(self, need: int, component_id: str) -> None:
        """Reserves ``need`` bytes, evicting evictable copies when the tier is bounded and full.

        RESOURCE_EXHAUSTED (nothing evicted, nothing reserved) when ``need`` exceeds the
        capacity or not enough is evictable. Every reservation is returned with :meth:`unreserve`.
        """
        name = self.tier.label
        if self.capacity > 0:
            if need > self.capacity:
                raise ResourceExhausted(
                    f"{name} tier: component {component_id!r} needs {need} bytes, more than the tier's capacity of "
                    f"{self.capacity}; nothing was published",
                    retry_after_s=self.retry_after_s,
                )
            overflow = self.used() + self.reserved + need - self.capacity
            if overflow > 0:
                candidates = self.evictable()
                victims = self.chooser.choose(candidates, overflow, time.time())
                sizes = {c.component_id: c.bytes for c in candidates}
                victims = [v for v in victims if v in sizes]
                if sum(sizes[v] for v in victims) < overflow:
                    raise ResourceExhausted(
                        f"{name} tier full: component {component_id!r} needs {need} bytes and only "
                        f"{sum(sizes.values())} bytes are evictable (the rest is leased, pinned, being read or loading); "
                        "nothing was published",
                        retry_after_s=self.retry_after_s,
                    )
                self.evict(victims)
        self.reserved += need

    def unreserve(self, nbytes: int) -> None:
        """Returns a reservation (the copy is in place, or it failed)."""
        self.reserved -= nbytes

    def evict(self, victims: list[str]) -> None:
        """Drops ``victims`` from the index now and frees their storage (:meth:`_free`)."""
        self._drop(victims, evicted=True)
        log.info("evicted", extra={"tier": self.tier.label, "components": ",".join(victims)})

    def discard(self, component_ids: list[str]) -> None:
        """Drops copies that were never cached (transient ones whose use ended): freed, not counted as evicted."""
        self._drop(component_ids, evicted=False)

    def _drop(self, component_ids: list[str], *, evicted: bool) -> None:
        gone = [self.entries.pop(v) for v in component_ids]
        for e in gone:
            if evicted:
                self.counters.evicted_bytes += e.bytes
            self.notify(e.component_id, self.tier, False, e.bytes, e.last_used)
        self._free(gone)

    def admit(self, entry: E, seconds: float) -> None:
        """Adds a copy that was loaded in ``seconds``: counted and reported."""
        self.entries[entry.component_id] = entry
        self.counters.loaded_bytes += entry.bytes
        self.counters.load_seconds += seconds
        self.notify(entry.component_id, self.tier, True, entry.bytes, entry.last_used)
