"""The SSD tier: verified artifacts fetched from REMOTE or a peer node (or derived here), bounded and evictable.

Its copies live in the :class:`~diffmesh_instance_manager.ssd.SsdCache` directory; the
index is saved after every change so the tier survives restarts. A copy may go when no
HOST load is reading it, none is about to (a HOST load of it is in flight) and the hot
plan does not pin it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from diffmesh.artifacts import TENSOR_SUFFIX
from diffmesh.errors import FailedPrecondition
from diffmesh.tiers import Tier
from diffmesh.v1 import common_pb2

from diffmesh_instance_manager.background import BackgroundTasks
from diffmesh_instance_manager.cache_tier import CacheTier, ResidencyNotify
from diffmesh_instance_manager.eviction import EvictableCopy, VictimChooser
from diffmesh_instance_manager.fetch_common import Fetcher
from diffmesh_instance_manager.remote_access import RemoteAccess
from diffmesh_instance_manager.ssd import SsdCache, SsdEntry, entry_name


class SsdTier(CacheTier[SsdEntry]):
    """SSD copies by component id, the cache directory behind them and the REMOTE fetch into it."""

    def __init__(
        self,
        cache: SsdCache,
        capacity: int,
        *,
        chooser: VictimChooser,
        notify: ResidencyNotify,
        retry_after_s: float,
        background: BackgroundTasks,
        pinned: Collection[str],
        host_loading: Callable[[], Collection[str]],
        remote: RemoteAccess,
        fetcher: Fetcher,
    ) -> None:
        super().__init__(Tier.SSD, capacity, chooser, notify, retry_after_s)
        self.cache = cache
        self.background = background
        self.pinned = pinned
        self.host_loading = host_loading
        self.remote = remote
        self.fetcher = fetcher
        self.readers: Counter[str] = Counter()
        self._index_seq = 0

    async def open(self) -> None:
        """Loads the index (unfinished fetches and orphans are dropped)."""
        self.entries = await asyncio.to_thread(self.cache.open)
        self._index_seq = 1

    def fresh(self, rec: common_pb2.Component) -> SsdEntry | None:
        """The copy of ``rec`` when it is here with the record's digest."""
        entry = self.entries.get(rec.id)
        return entry if entry is not None and entry.sha256 == rec.sha256.lower() else None

    def path(self, entry: SsdEntry) -> Path:
        """Where ``entry``'s artifact lives."""
        return self.cache.path(entry)

    @contextmanager
    def reading(self, component_id: str) -> Iterator[None]:
        """Marks the copy as being read (it is not evicted meanwhile)."""
        self.readers[component_id] += 1
        try:
            yield
        finally:
            self.readers[component_id] -= 1
            if self.readers[component_id] <= 0:
                del self.readers[component_id]

    def evictable(self) -> list[EvictableCopy]:
        """Copies nobody reads, no HOST load is about to read and the hot plan does not pin."""
        loading = set(self.host_loading())
        return [
            EvictableCopy(e.component_id, e.bytes, e.last_used, e.kind)
            for e in self.entries.values()
            if self.readers[e.component_id] == 0 and e.component_id not in loading and e.component_id not in self.pinned
        ]

    def _free(self, gone: list[SsdEntry]) -> None:
        paths = [self.cache.path(s) for s in gone]
        self.background.spawn(asyncio.to_thread(_discard_paths, self.cache, paths), "freeing evicted SSD copies")
        self.background.spawn(self.save_index(), "saving the SSD index")

    async def save_index(self) -> None:
        """Writes the index (a later snapshot is never overwritten by an earlier one)."""
        self._index_seq += 1
        await asyncio.to_thread(self.cache.save_index, list(self.entries.values()), self._index_seq)

    async def fetch_remote(self, rec: common_pb2.Component) -> int:
        """Fetches ``rec`` from REMOTE (URI checked against the allowed roots), verifies it and publishes it here;
        returns the bytes fetched."""
        source = await asyncio.to_thread(self.remote.resolve, rec.id, rec.uri)

        async def read(tmp: Path) -> tuple[int, bool]:
            return await asyncio.to_thread(self.fetcher.fetch, source, rec.sha256, tmp), source.is_dir

        return await self.fetch_verified(rec, read)

    async def fetch_verified(self, rec: common_pb2.Component, read: Callable[[Path], Awaitable[tuple[int, bool]]]) -> int:
        """Publishes ``rec``'s artifact as ``read(tmp)`` writes it (REMOTE or a peer), after room is made for it.

        ``read`` writes the artifact to ``tmp`` (which does not exist yet), checks it against
        ``rec.sha256`` and returns (bytes, is_dir). Nothing is published when it fails, or when
        the artifact turns out larger than the room the tier can make. Returns the bytes.
        """
        if not rec.sha256:
            raise FailedPrecondition(
                f"component {rec.id!r}: the catalog record has no sha256; unverified artifacts are not loaded"
            )
        need = rec.bytes if rec.bytes > 0 else 0
        self.reserve(need, rec.id)
        reserved = need
        tmp = self.cache.tmp_path(rec.id)
        t0 = time.perf_counter()
        try:
            size, is_dir = await read(tmp)
            if size > reserved:
                # The catalog under-stated the size (or did not give it): room for the rest, or nothing is published.
                self.reserve(size - reserved, rec.id)
                reserved = size
            digest = rec.sha256.lower()
            new = SsdEntry(rec.id, digest, entry_name(rec.id, digest), size, is_dir, rec.kind, time.time())
            old = self.entries.pop(rec.id, None)
            if old is not None and old.name != new.name:
                await asyncio.to_thread(self.cache.discard, self.cache.path(old))
            await asyncio.to_thread(self.cache.publish, tmp, new)
        except BaseException:
            await asyncio.to_thread(self.cache.discard, tmp)
            raise
        finally:
            self.unreserve(reserved)
        self.admit(new, time.perf_counter() - t0)
        await self.save_index()
        return size

    async def publish_derived(self, component_id: str, tmp: Path, digest: str, size: int, kind: int) -> SsdEntry:
        """Publishes a safetensors file derived on this node (a fused overlay at ``tmp``), making room for it first.

        The caller discards ``tmp`` when this fails.
        """
        self.reserve(size, component_id)
        try:
            name = entry_name(component_id, digest) + TENSOR_SUFFIX
            entry = SsdEntry(component_id, digest, name, size, False, kind, time.time())
            await asyncio.to_thread(self.cache.publish, tmp, entry)
            old = self.entries.get(component_id)
            self.entries[component_id] = entry
        finally:
            self.unreserve(size)
        if old is not None and old.name != entry.name:
            await asyncio.to_thread(self.cache.discard, self.cache.path(old))
        await self.save_index()
        self.notify(component_id, Tier.SSD, True, size, entry.last_used)
        return entry


def _discard_paths(cache: SsdCache, paths: list[Path]) -> None:
    for path in paths:
        cache.discard(path)
