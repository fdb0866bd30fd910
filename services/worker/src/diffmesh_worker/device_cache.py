"""The device tier: components built on this worker's device, with last use and their IM leases.

Entries are keyed by component id:

* BASE → :class:`~diffmesh_worker.assemble.BuiltBase` (UNet, VAE, text encoder, ...);
* CONTROLNET → :class:`~diffmesh_worker.assemble.BuiltControlNet`;
* LORA → :class:`LoraWeights` (the zero-copy state dict, loaded as an adapter into bases on use);
* FUSED → a :class:`~diffmesh_worker.assemble.BuiltBase` whose ``base_id`` names the BASE
  entry it shares modules and tensors with; it only counts its overlay's bytes, and it
  leaves the cache together with that base (never outlives the base's lease).

Each entry keeps the HOST copy it was built from leased from the instance manager (one
Acquire lease can cover several entries; it is released once none of them is cached).
The cache is bounded by bytes and by entry count. Which entries leave when it is full is
an :class:`~diffmesh.policy.eviction.EvictionPolicy` — the shared utility policy
(:mod:`diffmesh_worker.device_eviction`) or LRU — never the running request's components
and never the plan's pins (:attr:`DeviceCache.pins`). The policy sees entries in recency
order (least recently used first), which is how it breaks ties. This class does no I/O:
callers release leases and report residency for what :meth:`DeviceCache.evict_for` and
friends return.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffmesh.policy.eviction import EvictionPolicy, LRUEviction
from diffmesh.v1 import common_pb2

from diffmesh_worker.adapters import unload_adapter
from diffmesh_worker.assemble import BuiltBase, BuiltControlNet


@dataclass
class AcquireLease:
    """The lease of one ``InstanceManager.Acquire`` call and the cached components still relying on it."""

    lease_id: str
    holding: set[str] = field(default_factory=set)


@dataclass
class LoraWeights:
    """A LoRA's tensors (zero-copy views of the HOST copy) and its adapter metadata."""

    state: dict[str, torch.Tensor]
    metadata: dict[str, Any] | None


Built = BuiltBase | BuiltControlNet | LoraWeights


@dataclass
class CacheEntry:
    """One component resident on the device."""

    component_id: str
    kind: int
    family: str
    bytes: int
    built: Built
    lease: AcquireLease | None
    last_used_unix: float = field(default_factory=time.time)


@dataclass
class Removed:
    """What evicting entries left to do: leases to release and ids whose residency ended."""

    components: list[tuple[str, int]] = field(default_factory=list)  # (component id, bytes)
    leases: list[str] = field(default_factory=list)


class DeviceCache:
    """Bounded cache of built components, evicting as ``policy`` says (None: LRU; see the module docstring)."""

    def __init__(self, capacity_bytes: int, max_entries: int, policy: EvictionPolicy[str] | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self.max_entries = max_entries
        self.policy: EvictionPolicy[str] = LRUEviction() if policy is None else policy
        self.pins: frozenset[str] = frozenset()
        """Ids the plan keeps on this device (its HOT replicas' components): never evicted."""
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()

    def __contains__(self, component_id: object) -> bool:
        return component_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, component_id: str) -> CacheEntry | None:
        """The entry, or None."""
        return self._entries.get(component_id)

    def entries(self) -> list[CacheEntry]:
        """All entries, least recently used first."""
        return list(self._entries.values())

    @property
    def used_bytes(self) -> int:
        """Bytes of every entry."""
        return sum(e.bytes for e in self._entries.values())

    def set_pins(self, component_ids: Iterable[str]) -> None:
        """Replaces the plan's pins; ids dropped from them become evictable (nothing is removed here)."""
        self.pins = frozenset(component_ids)

    def touch(self, component_ids: Iterable[str], now: float | None = None) -> None:
        """Marks entries as just used."""
        now = time.time() if now is None else now
        for cid in component_ids:
            entry = self._entries.get(cid)
            if entry is not None:
                entry.last_used_unix = now
                self._entries.move_to_end(cid)
                # Re-inserted, not just accessed: the policy's insertion order is its tie-break.
                self.policy.on_remove(cid)
                self.policy.on_insert(cid, entry.bytes, now)

    def add(self, entry: CacheEntry) -> None:
        """Inserts (or replaces) an entry as the most recently used."""
        self._entries[entry.component_id] = entry
        self._entries.move_to_end(entry.component_id)
        self.policy.on_remove(entry.component_id)
        self.policy.on_insert(entry.component_id, entry.bytes, entry.last_used_unix)
        if entry.lease is not None:
            entry.lease.holding.add(entry.component_id)

    def evict_for(
        self, incoming_bytes: int, incoming_entries: int, protected: Iterable[str], now: float | None = None
    ) -> Removed:
        """Evicts entries outside ``protected`` and the pins, in the policy's order, until the incoming ones fit.

        As far as possible: when only protected or pinned entries are left, the cache stays over its bounds.
        """
        removed = Removed()

        def over() -> bool:
            over_bytes = self.capacity_bytes > 0 and self.used_bytes + incoming_bytes > self.capacity_bytes
            return over_bytes or len(self._entries) + incoming_entries > self.max_entries

        if not over():
            return removed
        keep = set(protected) | self.pins
        # At least one byte each, so that the policy's byte target also orders empty entries.
        sizes = {cid: max(1, e.bytes) for cid, e in self._entries.items()}
        evictable = sum(size for cid, size in sizes.items() if cid not in keep)
        if evictable == 0:
            return removed
        now = time.time() if now is None else now
        for cid in self.policy.victims(evictable, now, sizes, keep) or []:
            if not over():
                break
            if cid in self._entries:  # not gone with its base already
                self._remove(cid, removed)
        return removed

    def remove(self, component_ids: Iterable[str]) -> Removed:
        """Removes the given entries."""
        removed = Removed()
        for cid in component_ids:
            if cid in self._entries:
                self._remove(cid, removed)
        return removed

    def clear(self) -> Removed:
        """Removes everything (at shutdown)."""
        return self.remove(list(self._entries))

    def _remove(self, cid: str, removed: Removed) -> None:
        entry = self._entries.pop(cid)
        self.policy.on_remove(cid)
        if entry.kind == common_pb2.COMPONENT_KIND_LORA:
            # A LoRA leaves the device: drop its adapter from every base it was loaded into.
            for other in self._entries.values():
                if isinstance(other.built, BuiltBase):
                    unload_adapter(other.built, cid)
        if isinstance(entry.built, BuiltBase) and entry.built.base_id:
            # An overlay leaving alone: drop its adapters, but not from the text encoder its base still uses.
            base = self._entries.get(entry.built.base_id)
            base_adapters = base.built.adapters if base is not None and isinstance(base.built, BuiltBase) else {}
            for lora_id in list(entry.built.adapters):
                unload_adapter(entry.built, lora_id, text_encoder=lora_id not in base_adapters)
        if entry.kind == common_pb2.COMPONENT_KIND_BASE:
            # Overlays share this base's tensors (and its HOST lease): they go with it.
            for other in list(self._entries.values()):
                if isinstance(other.built, BuiltBase) and other.built.base_id == cid and other.component_id in self._entries:
                    self._remove(other.component_id, removed)
        removed.components.append((cid, entry.bytes))
        if entry.lease is not None:
            entry.lease.holding.discard(cid)
            if not entry.lease.holding and entry.lease.lease_id not in removed.leases:
                removed.leases.append(entry.lease.lease_id)
