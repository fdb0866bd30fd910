"""Eviction policies behind one interface, on hand-built caches."""

from __future__ import annotations

import math

import pytest
from diffmesh.policy.eviction import (
    BoundedCache,
    GDSFEviction,
    LFUEviction,
    LRUEviction,
    UtilityEviction,
    eviction_utility,
    reuse_probability,
)


def test_utility_formula() -> None:
    assert reuse_probability(0.1, 10.0) == pytest.approx(1 - math.exp(-1))
    assert reuse_probability(0.0, 10.0) == 0.0
    # 0.5 reuse x 20 s reload x weight 2 / 10 bytes = 2
    assert eviction_utility(0.5, 20.0, 10, 2.0) == pytest.approx(2.0)


def test_lru_evicts_least_recent_and_respects_protection() -> None:
    cache: BoundedCache[str] = BoundedCache(30, LRUEviction())
    for k in "abc":
        cache.insert(k, 10, 0.0)
    cache.access("a", 1.0)
    assert cache.insert("d", 10, 2.0) == ["b"]
    assert cache.insert("e", 10, 3.0, protected={"c"}) == ["a"]
    assert set(cache.sizes) == {"c", "d", "e"}
    assert cache.used == 30


def test_lfu_evicts_least_frequent() -> None:
    cache: BoundedCache[str] = BoundedCache(20, LFUEviction())
    cache.insert("a", 10, 0.0)
    cache.insert("b", 10, 0.0)
    cache.access("a", 1.0)
    assert cache.insert("c", 10, 2.0) == ["b"]


def test_gdsf_prefers_evicting_large_cheap_copies() -> None:
    cache: BoundedCache[str] = BoundedCache(100, GDSFEviction())
    cache.insert("big", 60, 0.0)  # priority 1/60
    cache.insert("small", 10, 0.0)  # priority 1/10
    assert cache.insert("new", 40, 1.0) == ["big"]
    policy = cache.policy
    assert isinstance(policy, GDSFEviction)
    # The clock rose to the evicted priority, so the newcomer ranks above it.
    assert policy.priority("new") == pytest.approx(1 / 60 + 1 / 40)


class Model:
    def __init__(self) -> None:
        self.rates = {"base": 0.01, "lora": 0.5, "pinned": 0.0}
        self.costs = {"base": 22.0, "lora": 4.0, "pinned": 1.0}

    def rate(self, key: str, t: float) -> float:
        return self.rates[key]

    def reload_cost_s(self, key: str) -> float:
        return self.costs[key]

    def kind(self, key: str) -> str:
        return "BASE" if key == "base" else "LORA"

    def pinned(self, key: str) -> bool:
        return key == "pinned"


def test_utility_eviction_uses_reuse_cost_kind_and_bytes() -> None:
    policy = UtilityEviction(Model(), horizon_s=10.0)
    # base: (1-e^-0.1)*22*2/50 = 0.0837; lora: (1-e^-5)*4*1/10 = 0.397
    assert policy.utility("base", 50, 0.0) == pytest.approx((1 - math.exp(-0.1)) * 22 * 2 / 50)
    assert policy.utility("lora", 10, 0.0) == pytest.approx((1 - math.exp(-5)) * 4 / 10)
    assert policy.utility("pinned", 1, 0.0) == math.inf
    cache: BoundedCache[str] = BoundedCache(70, policy)
    cache.insert("pinned", 10, 0.0)
    cache.insert("base", 50, 0.0)
    cache.insert("lora", 10, 0.0)
    assert cache.plan_insert(20, 1.0) == ["base"]
    # Pinned copies never go, so asking for more than the unpinned bytes fails.
    assert cache.plan_insert(65, 1.0) is None


def test_bounded_cache_refuses_oversized_and_makes_room() -> None:
    cache: BoundedCache[str] = BoundedCache(10, LRUEviction())
    assert cache.insert("huge", 11, 0.0) is None
    cache.insert("a", 6, 0.0)
    assert cache.make_room(8, 1.0) == ["a"]
    assert cache.free == 10


def test_insert_applies_planned_victims() -> None:
    cache: BoundedCache[str] = BoundedCache(10, LRUEviction())
    cache.insert("a", 4, 0.0)
    cache.insert("b", 4, 1.0)
    victims = cache.plan_insert(6, 2.0)
    assert victims == ["a"]
    assert cache.insert("c", 6, 2.0, victims=victims) == ["a"]
    assert set(cache.sizes) == {"b", "c"} and cache.used == 10
    assert cache.insert("d", 20, 3.0, victims=None) is None and "d" not in cache
