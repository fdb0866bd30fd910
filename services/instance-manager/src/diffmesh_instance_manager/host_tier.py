"""The HOST tier: components copied from SSD into shared memory, leased to workers.

Two kinds of memory behind one tier: without a pool every copy gets its own segment and
the tier is bounded by bytes (``capacity``, 0 = unbounded); with a
:class:`~diffmesh_instance_manager.pool.HostPool` (installed before the first load) a
copy takes one block of a fitting size class, and when none is free the evictable copy
of such a class that the victim chooser ranks first gives up its block. A copy may go
when no lease holds it and the hot plan does not pin it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from pathlib import Path

from diffmesh.errors import ResourceExhausted
from diffmesh.tiers import Tier
from diffmesh.v1 import common_pb2

from diffmesh_instance_manager.background import BackgroundTasks
from diffmesh_instance_manager.cache_tier import CacheTier, ResidencyNotify
from diffmesh_instance_manager.eviction import EvictableCopy, VictimChooser
from diffmesh_instance_manager.host import (
    ComponentPlan,
    FileLoader,
    HostAllocator,
    HostBlock,
    HostEntry,
    materialize,
    plan_component,
)
from diffmesh_instance_manager.leases import LeaseTable
from diffmesh_instance_manager.pool import HostPool, PoolExhausted

#: Tries to get a pool block before giving up to concurrent loads.
POOL_ATTEMPTS = 8


class HostTier(CacheTier[HostEntry]):
    """HOST copies by component id and the shared memory they live in."""

    def __init__(
        self,
        allocator: HostAllocator,
        loader: FileLoader,
        capacity: int,
        *,
        chooser: VictimChooser,
        notify: ResidencyNotify,
        retry_after_s: float,
        background: BackgroundTasks,
        leases: LeaseTable,
        pinned: Collection[str],
        config_cap: int,
    ) -> None:
        super().__init__(Tier.HOST, capacity, chooser, notify, retry_after_s)
        self.allocator = allocator
        self.loader = loader
        self.pool: HostPool | None = None
        self.background = background
        self.leases = leases
        self.pinned = pinned
        self.config_cap = config_cap

    def use_pool(self, pool: HostPool, loader: FileLoader) -> None:
        """Makes ``pool`` the tier's memory (before the first load): its size classes bound the tier."""
        if self.entries:
            raise RuntimeError("the HOST pool must be installed before anything is loaded")
        self.allocator = pool
        self.pool = pool
        self.loader = loader
        self.capacity = pool.capacity_bytes

    def view(self, entry: HostEntry) -> memoryview:
        """A view of the copy's whole block (empty for a copy without tensors); ``release()`` it."""
        return self.allocator.view(entry.block) if entry.block is not None else memoryview(b"")

    def evictable(self) -> list[EvictableCopy]:
        """Copies no lease holds and the hot plan does not pin."""
        return [
            EvictableCopy(e.component_id, e.bytes, e.last_used, e.kind)
            for e in self.entries.values()
            if self.leases.refs(e.component_id) == 0 and e.component_id not in self.pinned
        ]

    def _free(self, gone: list[HostEntry]) -> None:
        blocks = [e.block for e in gone if e.block is not None]
        if self.pool is not None:
            # Only copies no lease holds are evicted, so the blocks can be reused at once.
            _free_blocks(self.allocator, blocks)
        else:
            label = ",".join(e.component_id for e in gone)
            self.background.spawn(asyncio.to_thread(_free_blocks, self.allocator, blocks), "freeing evicted HOST copies", label)

    def room_for(self, nbytes: int) -> tuple[bool, list[str] | None]:
        """Whether ``nbytes`` fit without evicting; if not, the copies that would go (None: not enough can go)."""
        now = time.time()
        if self.pool is not None:
            pool = self.pool
            fitting = set(pool.fitting_classes(nbytes))
            if not fitting:
                return False, None
            if any(c.free > 0 for i, c in enumerate(pool.stats().classes) if i in fitting):
                return True, []
            candidates = [
                c
                for c in self.evictable()
                if (block := self.entries[c.component_id].block) is not None and pool.class_of(block) in fitting
            ]
            order = self.chooser.order(candidates, now)
            return False, order[:1] or None
        if self.capacity <= 0:
            return True, []
        overflow = self.used() + self.reserved + nbytes - self.capacity
        if overflow <= 0:
            return True, []
        victims = self.chooser.choose(self.evictable(), overflow, now)
        return False, victims or None

    async def load(self, rec: common_pb2.Component, path: Path, is_dir: bool, *, transient: bool = False) -> HostEntry:
        """Copies the SSD artifact at ``path`` into shared memory (headers validated first) and admits it.

        A ``transient`` copy is not cached: the store frees it when its last lease ends.
        """
        plan = await asyncio.to_thread(plan_component, rec.id, path, is_dir, self.config_cap)
        t0 = time.perf_counter()
        if self.pool is not None:
            block = await self._materialize_pooled(self.pool, plan, rec.id)
        else:
            self.reserve(plan.block_bytes, rec.id)
            try:
                block = await asyncio.to_thread(materialize, plan, self.allocator, self.loader)
            finally:
                self.unreserve(plan.block_bytes)
        seconds = time.perf_counter() - t0
        entry = HostEntry(rec.id, rec.kind, rec.family, rec.base_id, block, plan, time.time(), seconds, transient)
        self.admit(entry, seconds)
        return entry

    async def _materialize_pooled(self, pool: HostPool, plan: ComponentPlan, component_id: str) -> HostBlock | None:
        """Copies ``plan`` into a pool block, evicting the first-ranked evictable copy of a fitting class when none is free."""
        if plan.block_bytes > 0 and not pool.fitting_classes(plan.block_bytes):
            largest = max(c.block_size for c in pool.stats().classes if c.blocks)
            raise ResourceExhausted(
                f"HOST tier: component {component_id!r} needs {plan.block_bytes} bytes, more than the pool's largest "
                f"block ({largest} bytes); nothing was loaded",
                retry_after_s=self.retry_after_s,
            )
        for _ in range(POOL_ATTEMPTS):
            try:
                return await asyncio.to_thread(materialize, plan, pool, self.loader)
            except PoolExhausted as exc:
                classes = set(exc.classes)
                candidates = [
                    c
                    for c in self.evictable()
                    if (block := self.entries[c.component_id].block) is not None and pool.class_of(block) in classes
                ]
                if not candidates:
                    raise ResourceExhausted(
                        f"HOST tier full: component {component_id!r} needs a {plan.block_bytes}-byte block and every "
                        f"block that fits is leased, pinned or loading",
                        retry_after_s=self.retry_after_s,
                    ) from None
                # One block of a fitting class is enough: the first-ranked candidate goes.
                order = self.chooser.order(candidates, time.time())
                victim = order[0] if order else min(candidates, key=lambda c: c.last_used).component_id
                self.evict([victim])
        raise ResourceExhausted(
            f"HOST tier busy: component {component_id!r} lost the freed block to concurrent loads {POOL_ATTEMPTS} times",
            retry_after_s=self.retry_after_s,
        )

    async def close(self) -> None:
        """Frees every block, then closes the memory (the pool last, after every load has finished)."""
        entries = list(self.entries.values())
        self.entries.clear()
        await asyncio.to_thread(self._free_all, entries)

    def _free_all(self, entries: list[HostEntry]) -> None:
        _free_blocks(self.allocator, [e.block for e in entries if e.block is not None])
        self.allocator.close()


def _free_blocks(allocator: HostAllocator, blocks: list[HostBlock]) -> None:
    for block in blocks:
        allocator.free(block)
