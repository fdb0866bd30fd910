"""The instance manager's eviction adapter over the shared utility policy, and lease expiry."""

from __future__ import annotations

import pytest
from diffmesh.errors import NotFound
from diffmesh.v1 import common_pb2
from diffmesh_instance_manager.eviction import EvictableCopy, LruChooser, Popularity, UtilityPolicy
from diffmesh_instance_manager.leases import LeaseTable

LORA = common_pb2.COMPONENT_KIND_LORA
BASE = common_pb2.COMPONENT_KIND_BASE


def _policy(
    popularity: Popularity, pinned: set[str] | None = None, cost_per_byte: dict[str, float] | None = None
) -> UtilityPolicy:
    costs = cost_per_byte or {}
    return UtilityPolicy(popularity, lambda cid, n: n * costs.get(cid, 1e-9), pinned if pinned is not None else set())


def test_popular_copies_outlive_recent_ones() -> None:
    pop = Popularity(half_life_s=60)
    for t in (1.0, 2.0, 3.0):
        pop.record("popular", t)
    pop.record("recent", 50.0)
    cands = [EvictableCopy("popular", 100, 3.0, LORA), EvictableCopy("recent", 100, 50.0, LORA)]
    assert _policy(pop).choose(cands, 100, 60.0) == ["recent"]


def test_cheap_to_reload_copies_go_first_and_bases_weigh_double() -> None:
    pop = Popularity(half_life_s=60)
    for cid in ("slow", "fast", "base", "lora"):
        pop.record(cid, 0.0)
    cands = [EvictableCopy("slow", 100, 0.0, LORA), EvictableCopy("fast", 100, 0.0, LORA)]
    # "fast" reloads ten times faster (its SSD copy is still there): it goes.
    assert _policy(pop, cost_per_byte={"slow": 1e-8, "fast": 1e-9}).choose(cands, 1, 1.0) == ["fast"]
    kinds = [EvictableCopy("base", 100, 0.0, BASE), EvictableCopy("lora", 100, 0.0, LORA)]
    assert _policy(pop).choose(kinds, 1, 1.0) == ["lora"]


def test_unrequested_copies_fall_back_to_least_recently_used_and_pinned_never_go() -> None:
    pop = Popularity()
    cands = [EvictableCopy("new", 10, 5.0, LORA), EvictableCopy("old", 10, 1.0, LORA), EvictableCopy("pin", 10, 0.0, LORA)]
    policy = _policy(pop, pinned={"pin"})
    assert policy.choose(cands, 15, 9.0) == ["old", "new"]
    assert policy.choose(cands, 25, 9.0) == []  # impossible without the pinned copy: nothing is evicted
    assert policy.order(cands, 9.0) == ["old", "new"]


def test_leases_expire_for_silent_holders_only() -> None:
    table = LeaseTable(ttl_s=10.0)
    ghost = table.open("ghost", now=0.0)
    table.pin(ghost, "a")
    live = table.open("live", now=0.0)
    table.pin(live, "a")
    table.pin(live, "b")
    table.renew(["live"], now=8.0)
    assert table.expire(now=9.0) == ([], [])
    ended, freed = table.expire(now=11.0)
    assert ended == [ghost.lease_id] and freed == []  # "a" is still held by the live lease
    assert table.refs("a") == 1
    with pytest.raises(NotFound):
        table.close(ghost.lease_id)
    ended, freed = table.expire(now=19.0)
    assert ended == [live.lease_id] and freed == ["a", "b"]
    assert LeaseTable(ttl_s=0).expire(now=1e9) == ([], [])


def test_lru_chooser_evicts_the_least_recently_used_whatever_the_kind() -> None:
    cands = [EvictableCopy("old-base", 10, 1.0, BASE), EvictableCopy("new", 10, 5.0, LORA), EvictableCopy("pin", 10, 0.0, LORA)]
    chooser = LruChooser({"pin"})
    assert chooser.choose(cands, 5, 9.0) == ["old-base"]  # the utility policy would keep a base (double weight)
    assert chooser.choose(cands, 15, 9.0) == ["old-base", "new"]
    assert chooser.choose(cands, 25, 9.0) == []  # not without the pinned copy: nothing is evicted
    assert chooser.order(cands, 9.0) == ["old-base", "new"]
