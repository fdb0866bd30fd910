"""The device tier's eviction: the shared utility policy over this worker's request rates and
measured HOST→device bandwidth, the plan's pins, and LRU under ``DIFFMESH_POLICY=lru``."""

from __future__ import annotations

import math

from diffmesh.policy.eviction import LRUEviction, UtilityEviction
from diffmesh.policy_mode import PolicyMode
from diffmesh.v1 import common_pb2
from diffmesh_worker.device_cache import CacheEntry, DeviceCache, LoraWeights
from diffmesh_worker.device_eviction import DEFAULT_HOST_TO_DEVICE_BPS, DeviceUsage, eviction_policy

LORA = common_pb2.COMPONENT_KIND_LORA
MiB = 1 << 20


def _cache(usage: DeviceUsage, capacity: int, mode: PolicyMode = PolicyMode.DIFFMESH) -> DeviceCache:
    cache: DeviceCache
    policy = eviction_policy(mode, usage, lambda cid: cache.get(cid), lambda: cache.pins, horizon_s=300.0)
    cache = DeviceCache(capacity_bytes=capacity, max_entries=16, policy=policy)
    return cache


def _add(cache: DeviceCache, cid: str, nbytes: int, t: float) -> None:
    cache.add(CacheEntry(cid, LORA, "sd15", nbytes, LoraWeights({}, None), None, last_used_unix=t))


def test_policy_follows_the_mode() -> None:
    usage = DeviceUsage(600.0)
    assert isinstance(_cache(usage, 1).policy, UtilityEviction)
    assert isinstance(_cache(usage, 1, PolicyMode.LRU).policy, LRUEviction)


def test_frequently_used_component_outlives_a_recent_one_used_once() -> None:
    usage = DeviceUsage(600.0)
    cache = _cache(usage, capacity=30 * MiB)
    t = 1000.0
    _add(cache, "often", 10 * MiB, t)
    for i in range(5):
        usage.record(["often"], t + i)
    _add(cache, "once", 10 * MiB, t + 10)
    usage.record(["once"], t + 10)
    cache.touch(["once"], now=t + 10)  # the most recent
    _add(cache, "running", 10 * MiB, t + 11)

    removed = cache.evict_for(10 * MiB, 1, protected={"running"}, now=t + 12)
    assert [cid for cid, _ in removed.components] == ["once"]  # LRU would have taken "often"
    assert "often" in cache

    lru = _cache(usage, capacity=30 * MiB, mode=PolicyMode.LRU)
    for cid, when in (("often", t), ("once", t + 10), ("running", t + 11)):
        _add(lru, cid, 10 * MiB, when)
    assert [cid for cid, _ in lru.evict_for(10 * MiB, 1, protected={"running"}).components] == ["often"]


def test_pins_are_never_evicted_and_unpinning_makes_them_evictable() -> None:
    usage = DeviceUsage(600.0)
    cache = _cache(usage, capacity=20 * MiB)
    _add(cache, "hot", 10 * MiB, 1.0)
    _add(cache, "busy", 10 * MiB, 2.0)
    for i in range(3):
        usage.record(["busy"], 2.0 + i)
    cache.set_pins(["hot"])
    assert [cid for cid, _ in cache.evict_for(10 * MiB, 1, protected=(), now=5.0).components] == ["busy"]
    assert "hot" in cache
    # Still pinned with nothing else to evict: the cache stays over its bound rather than drop a pin.
    assert cache.evict_for(15 * MiB, 1, protected=(), now=5.0).components == []
    cache.set_pins([])  # a newer plan dropped the replica: evictable, not removed
    assert "hot" in cache
    assert [cid for cid, _ in cache.evict_for(15 * MiB, 1, protected=(), now=5.0).components] == ["hot"]


def test_equal_utilities_go_least_recently_used_first() -> None:
    cache = _cache(DeviceUsage(600.0), capacity=30 * MiB)  # no requests recorded: every utility is 0
    for i, cid in enumerate("abc"):
        _add(cache, cid, 10 * MiB, float(i))
    cache.touch(["a"], now=10.0)
    assert [cid for cid, _ in cache.evict_for(20 * MiB, 1, protected=(), now=11.0).components] == ["b", "c"]


def test_reload_cost_uses_measured_bandwidth_after_a_default() -> None:
    usage = DeviceUsage(600.0)
    assert usage.bandwidth_bps == DEFAULT_HOST_TO_DEVICE_BPS
    assert math.isclose(usage.reload_cost_s(int(DEFAULT_HOST_TO_DEVICE_BPS)), 1.0)
    usage.observe_build(1000, 1.0)  # too small to measure bandwidth: fixed overhead
    assert usage.measured_bps is None
    usage.observe_build(100 * MiB, 0.1)
    assert usage.bandwidth_bps == 1000 * MiB
    usage.observe_build(100 * MiB, 0.2)  # EWMA: the newest weighs 0.2
    assert math.isclose(usage.bandwidth_bps, 0.8 * 1000 * MiB + 0.2 * 500 * MiB)
    assert math.isclose(usage.reload_cost_s(900 * MiB), 1.0)
