"""The worker's device slot (FIFO queue, bound, positions, cancellation) and its device-tier cache."""

from __future__ import annotations

import asyncio

import pytest
from diffmesh.errors import ResourceExhausted
from diffmesh.policy.eviction import LRUEviction
from diffmesh.v1 import common_pb2
from diffmesh_worker.device_cache import AcquireLease, CacheEntry, DeviceCache, LoraWeights
from diffmesh_worker.runner import DeviceSlot

CN = common_pb2.COMPONENT_KIND_CONTROLNET


def test_slot_is_fifo_bounded_and_reports_positions() -> None:
    async def scenario() -> None:
        slot = DeviceSlot(max_queue=2)
        first = slot.enter()
        assert first.granted and slot.running == 1 and slot.queue_length == 0
        assert [p async for p in slot.positions(first)] == [0]

        second, third = slot.enter(), slot.enter()
        assert (slot.position(second), slot.position(third)) == (1, 2)
        with pytest.raises(ResourceExhausted) as err:
            slot.enter()
        assert err.value.retry_after_s > 0

        seen: list[int] = []

        async def follow() -> None:
            async for position in slot.positions(third):
                seen.append(position)

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0)
        slot.leave(second)  # cancelled while waiting: third moves up
        await asyncio.sleep(0)
        slot.release(first)  # done: third gets the device
        await asyncio.wait_for(follower, 1)
        assert seen == [2, 1] and third.granted and slot.running == 1 and slot.queue_length == 0
        slot.release(first)  # a stale release changes nothing
        assert slot.running == 1
        slot.leave(third)
        assert slot.running == 0
        assert slot.enter().granted

    asyncio.run(scenario())


def test_zero_queue_only_runs_when_idle() -> None:
    async def scenario() -> None:
        slot = DeviceSlot(max_queue=0)
        ticket = slot.enter()
        with pytest.raises(ResourceExhausted, match="max_queue=0"):
            slot.enter()
        slot.release(ticket)
        assert slot.enter().granted

    asyncio.run(scenario())


def _entry(cid: str, nbytes: int, lease: AcquireLease | None) -> CacheEntry:
    return CacheEntry(cid, CN, "sd15", nbytes, LoraWeights({}, None), lease)


def test_cache_evicts_lru_outside_pinned_and_releases_leases_once_unused() -> None:
    # The LRU policy (DIFFMESH_POLICY=lru); the utility policy's order is in test_worker_device_eviction.py.
    cache = DeviceCache(capacity_bytes=100, max_entries=10, policy=LRUEviction())
    shared = AcquireLease("lease-ab")
    cache.add(_entry("a", 40, shared))
    cache.add(_entry("b", 40, shared))
    cache.add(_entry("c", 10, AcquireLease("lease-c")))
    cache.touch(["a"], now=123.0)  # order now: b, c, a
    assert [e.component_id for e in cache.entries()] == ["b", "c", "a"] and cache.get("a").last_used_unix == 123.0  # type: ignore[union-attr]

    removed = cache.evict_for(incoming_bytes=30, incoming_entries=1, protected={"b"})
    # b is pinned, so c (next LRU) goes; 80 + 30 > 100 still, so a goes too.
    assert [cid for cid, _ in removed.components] == ["c", "a"]
    assert removed.leases == ["lease-c"]  # lease-ab still holds b
    assert cache.used_bytes == 40 and "b" in cache

    removed = cache.remove(["b"])
    assert removed.leases == ["lease-ab"] and len(cache) == 0


def test_cache_bounds_entry_count() -> None:
    cache = DeviceCache(capacity_bytes=0, max_entries=2, policy=LRUEviction())
    for cid in "xyz":
        cache.evict_for(1, 1, protected={cid})
        cache.add(_entry(cid, 1, None))
    assert [e.component_id for e in cache.entries()] == ["y", "z"]
    assert [cid for cid, _ in cache.clear().components] == ["y", "z"]


def test_background_work_takes_only_an_idle_device_and_yields_to_requests() -> None:
    async def scenario() -> None:
        changes: list[tuple[int, int]] = []
        slot = DeviceSlot(max_queue=0)
        slot.on_change = lambda: changes.append((slot.queue_length, slot.running))
        background = slot.try_background()
        assert background is not None and not slot.idle and slot.try_background() is None
        assert (slot.running, slot.queue_length) == (0, 0)  # background work is not a request

        # A request arriving takes the place the background holds (even with max_queue=0) and asks it to yield.
        request = slot.enter()
        assert not request.granted and slot.position(request) == 1 and slot.requests_waiting
        with pytest.raises(ResourceExhausted):
            slot.enter()  # a second one: as if the first were running
        slot.release_background(background)
        assert request.granted and slot.running == 1 and slot.queue_length == 0
        assert slot.try_background() is None  # busy: a request runs
        slot.release(request)
        assert slot.idle and changes[-1] == (0, 0) and (1, 0) in changes and (0, 1) in changes

    asyncio.run(scenario())
