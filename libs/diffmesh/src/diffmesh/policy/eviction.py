"""Eviction: which copies leave a full tier, behind one interface.

* :class:`UtilityEviction` — the paper's multi-dimensional utility. A copy's utility is
  ``P(reuse within horizon) x cost to reload it from the next tier that still holds it
  x kind weight / bytes``; the lowest-utility copies go first and pinned copies (the
  HOT plan's replicas) never go.
* :class:`LRUEviction`, :class:`LFUEviction`, :class:`GDSFEviction` — baselines
  (GDSF: Greedy-Dual-Size-Frequency, size-aware).

:class:`BoundedCache` is the byte-bounded tier that asks a policy for victims. All of
it is pure: time is an argument, nothing reads a clock or does I/O.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Container, Hashable, Iterator
from typing import Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)
K_contra = TypeVar("K_contra", bound=Hashable, contravariant=True)

KIND_WEIGHTS: dict[str, float] = {"BASE": 2.0, "LORA": 1.0, "CONTROLNET": 1.0, "FUSED": 1.0}
"""Utility multiplier per component kind. A base weighs double: evicting it also strands
every adapter and overlay that is resident only because of it (their warm state is
useless until the base is back)."""


def reuse_probability(rate_per_s: float, horizon_s: float) -> float:
    """P(at least one request within ``horizon_s``) for Poisson requests at ``rate_per_s``."""
    if rate_per_s <= 0 or horizon_s <= 0:
        return 0.0
    return 1.0 - math.exp(-rate_per_s * horizon_s)


def eviction_utility(reuse_prob: float, reload_cost_s: float, nbytes: int, kind_weight: float = 1.0) -> float:
    """Utility of keeping a copy: expected reload seconds saved per byte it occupies."""
    return reuse_prob * reload_cost_s * kind_weight / max(1, nbytes)


class EvictionPolicy(Protocol[K]):
    """Book-keeping and victim choice for one tier's copies."""

    name: str

    def on_insert(self, key: K, nbytes: int, t: float) -> None:
        """A copy of ``key`` entered the tier."""

    def on_access(self, key: K, t: float) -> None:
        """A resident copy was used."""

    def on_remove(self, key: K) -> None:
        """A copy left the tier (evicted or dropped)."""

    def victims(self, need_bytes: int, t: float, sizes: dict[K, int], protected: Container[K]) -> list[K] | None:
        """Keys to evict, in order, to free at least ``need_bytes``; None when impossible.

        ``sizes`` maps every resident key to its bytes; ``protected`` keys must stay.
        """


def _take(order: Iterator[K], need_bytes: int, sizes: dict[K, int], protected: Container[K]) -> list[K] | None:
    chosen: list[K] = []
    freed = 0
    if need_bytes <= 0:
        return chosen
    for key in order:
        if key in protected:
            continue
        chosen.append(key)
        freed += sizes[key]
        if freed >= need_bytes:
            return chosen
    return None


class LRUEviction(Generic[K]):
    """Least recently used first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[K, None] = OrderedDict()

    def on_insert(self, key: K, nbytes: int, t: float) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: K, t: float) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: K) -> None:
        self._order.pop(key, None)

    def victims(self, need_bytes: int, t: float, sizes: dict[K, int], protected: Container[K]) -> list[K] | None:
        return _take(iter(self._order), need_bytes, sizes, protected)


class LFUEviction(Generic[K]):
    """Least frequently used first (frequency since insertion); ties go to the least recent."""

    name = "lfu"

    def __init__(self) -> None:
        self._freq: dict[K, int] = {}
        self._last: dict[K, float] = {}
        self._seq: dict[K, int] = {}
        self._tick = 0

    def on_insert(self, key: K, nbytes: int, t: float) -> None:
        self._freq[key] = 1
        self._touch(key, t)

    def on_access(self, key: K, t: float) -> None:
        if key in self._freq:
            self._freq[key] += 1
            self._touch(key, t)

    def _touch(self, key: K, t: float) -> None:
        self._tick += 1
        self._last[key] = t
        self._seq[key] = self._tick

    def on_remove(self, key: K) -> None:
        self._freq.pop(key, None)
        self._last.pop(key, None)
        self._seq.pop(key, None)

    def victims(self, need_bytes: int, t: float, sizes: dict[K, int], protected: Container[K]) -> list[K] | None:
        order = sorted(self._freq, key=lambda k: (self._freq[k], self._seq[k]))
        return _take(iter(order), need_bytes, sizes, protected)


class GDSFEviction(Generic[K]):
    """Greedy-Dual-Size-Frequency: priority ``L + frequency x cost / bytes``, lowest first.

    ``L`` rises to the priority of each evicted copy, so long-idle copies age out.
    ``cost_of`` gives a key's reload cost (1 by default: plain size-awareness).
    """

    name = "gdsf"

    def __init__(self, cost_of: Callable[[K], float] | None = None) -> None:
        self._cost_of = cost_of or (lambda _k: 1.0)
        self._clock = 0.0
        self._freq: dict[K, int] = {}
        self._bytes: dict[K, int] = {}
        self._prio: dict[K, float] = {}

    def priority(self, key: K) -> float:
        """Current GDSF priority of a resident key."""
        return self._prio[key]

    def _update(self, key: K) -> None:
        self._prio[key] = self._clock + self._freq[key] * self._cost_of(key) / max(1, self._bytes[key])

    def on_insert(self, key: K, nbytes: int, t: float) -> None:
        self._freq[key] = 1
        self._bytes[key] = nbytes
        self._update(key)

    def on_access(self, key: K, t: float) -> None:
        if key in self._freq:
            self._freq[key] += 1
            self._update(key)

    def on_remove(self, key: K) -> None:
        prio = self._prio.pop(key, None)
        self._freq.pop(key, None)
        self._bytes.pop(key, None)
        if prio is not None and prio > self._clock:
            self._clock = prio

    def victims(self, need_bytes: int, t: float, sizes: dict[K, int], protected: Container[K]) -> list[K] | None:
        order = sorted(self._prio, key=self._prio.__getitem__)
        return _take(iter(order), need_bytes, sizes, protected)


class UtilityModel(Protocol[K_contra]):
    """What the utility policy needs to know about a copy, supplied by the tier's owner."""

    def rate(self, key: K_contra, t: float) -> float:
        """Decayed request rate of the component (requests per second)."""

    def reload_cost_s(self, key: K_contra) -> float:
        """Seconds to bring the copy back from the next tier that still holds it."""

    def kind(self, key: K_contra) -> str:
        """Component kind (``BASE``, ``LORA``, ``CONTROLNET``, ``FUSED``)."""

    def pinned(self, key: K_contra) -> bool:
        """True when the HOT plan pins this copy (it is never evicted)."""


class UtilityEviction(Generic[K]):
    """Lowest :func:`eviction_utility` first; pinned copies never.

    Victims are chosen by scanning the tier's copies when space is needed (tiers hold
    tens to hundreds of copies), so utilities always use the current rates and the
    current location of the next copy.
    """

    name = "utility"

    def __init__(self, model: UtilityModel[K], horizon_s: float, kind_weights: dict[str, float] | None = None) -> None:
        self.model = model
        self.horizon_s = horizon_s
        self.kind_weights = dict(KIND_WEIGHTS if kind_weights is None else kind_weights)
        self._keys: dict[K, None] = {}

    def utility(self, key: K, nbytes: int, t: float) -> float:
        """Utility of the copy of ``key`` at ``t`` (``inf`` when pinned)."""
        m = self.model
        if m.pinned(key):
            return math.inf
        p = reuse_probability(m.rate(key, t), self.horizon_s)
        return eviction_utility(p, m.reload_cost_s(key), nbytes, self.kind_weights.get(m.kind(key), 1.0))

    def on_insert(self, key: K, nbytes: int, t: float) -> None:
        self._keys[key] = None

    def on_access(self, key: K, t: float) -> None:
        """Rates live in the popularity counters; nothing to do here."""

    def on_remove(self, key: K) -> None:
        self._keys.pop(key, None)

    def victims(self, need_bytes: int, t: float, sizes: dict[K, int], protected: Container[K]) -> list[K] | None:
        if need_bytes <= 0:
            return []
        m = self.model
        pinned, rate, reload_cost, kind = m.pinned, m.rate, m.reload_cost_s, m.kind
        weights = self.kind_weights
        horizon = self.horizon_s
        scored = []
        for i, k in enumerate(self._keys):
            if k in protected or pinned(k):
                continue
            # Inlined utility(): P(reuse) x reload cost x kind weight / bytes.
            r = rate(k, t)
            p = 1.0 - math.exp(-r * horizon) if r > 0 and horizon > 0 else 0.0
            scored.append((p * reload_cost(k) * weights.get(kind(k), 1.0) / max(1, sizes[k]), i, k))
        scored.sort()
        return _take((k for _, _, k in scored), need_bytes, sizes, ())


class BoundedCache(Generic[K]):
    """A tier of ``capacity`` bytes whose copies an :class:`EvictionPolicy` evicts."""

    def __init__(self, capacity: int, policy: EvictionPolicy[K]) -> None:
        self.capacity = int(capacity)
        self.policy = policy
        self.sizes: dict[K, int] = {}
        self.used = 0

    def __contains__(self, key: object) -> bool:
        return key in self.sizes

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def free(self) -> int:
        """Unused bytes."""
        return self.capacity - self.used

    def access(self, key: K, t: float) -> bool:
        """Mark a use; True when the copy is resident."""
        if key in self.sizes:
            self.policy.on_access(key, t)
            return True
        return False

    def plan_insert(self, nbytes: int, t: float, protected: Container[K] = ()) -> list[K] | None:
        """Victims that inserting ``nbytes`` would evict (nothing is changed); None if it cannot fit."""
        if nbytes > self.capacity:
            return None
        return self.policy.victims(nbytes - self.free, t, self.sizes, protected)

    def insert(
        self, key: K, nbytes: int, t: float, protected: Container[K] = (), *, victims: list[K] | None = None
    ) -> list[K] | None:
        """Insert a copy, evicting as the policy says; returns the evicted keys, or None (nothing changed) if it cannot fit.

        ``victims``, when given, are the keys :meth:`plan_insert` chose at this same state:
        they are evicted as they are, without a second scan (``protected`` is then not
        consulted). None lets the policy choose now.
        """
        if key in self.sizes:
            self.policy.on_access(key, t)
            return []
        if victims is None:
            victims = [] if nbytes <= self.capacity - self.used else self.plan_insert(nbytes, t, protected)
            if victims is None:
                return None
        for v in victims:
            self.remove(v)
        self.sizes[key] = nbytes
        self.used += nbytes
        self.policy.on_insert(key, nbytes, t)
        return victims

    def make_room(self, nbytes: int, t: float, protected: Container[K] = ()) -> list[K] | None:
        """Evict until ``nbytes`` are free (for transient use, e.g. activations); None if impossible."""
        victims = self.policy.victims(nbytes - self.free, t, self.sizes, protected)
        if victims is None:
            return None
        for v in victims:
            self.remove(v)
        return victims

    def remove(self, key: K) -> bool:
        """Drop a copy; True when it was resident."""
        nbytes = self.sizes.pop(key, None)
        if nbytes is None:
            return False
        self.used -= nbytes
        self.policy.on_remove(key)
        return True
