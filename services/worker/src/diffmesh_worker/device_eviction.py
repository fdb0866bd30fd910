"""Which built components leave the device tier first: the shared utility policy, or LRU.

Under ``DIFFMESH_POLICY=diffmesh`` the device cache evicts with
:class:`diffmesh.policy.eviction.UtilityEviction` — the class the instance manager and the
simulator use. A component's utility is ``P(reuse within the horizon) x reload cost x
kind weight / bytes``, lowest first, where

* the reuse rate comes from a time-decayed counter of this worker's own requests
  (:class:`~diffmesh.policy.popularity.DecayedCounter`, fed with every component a
  request used, the base under a FUSED overlay included);
* the reload cost is ``bytes / HOST→device bandwidth``: the next tier that still holds a
  device-resident component is always HOST (the device entry keeps the HOST copy leased),
  and the bandwidth is an EWMA of this worker's own builds (bytes over build seconds),
  :data:`DEFAULT_HOST_TO_DEVICE_BPS` before the first build is measured;
* the plan's pins are never evicted.

Under ``DIFFMESH_POLICY=lru`` it is :class:`~diffmesh.policy.eviction.LRUEviction`.
"""

from __future__ import annotations

from collections.abc import Callable

from diffmesh.catalog import kind_name
from diffmesh.policy.eviction import EvictionPolicy, LRUEviction, UtilityEviction
from diffmesh.policy.popularity import DecayedCounter
from diffmesh.policy_mode import PolicyMode

from diffmesh_worker.device_cache import CacheEntry

DEFAULT_HOST_TO_DEVICE_BPS = 4e9
"""HOST→device bandwidth assumed before the first build is measured: 4 GB/s, a pageable
host-to-GPU copy plus module assembly (CPU zero-copy builds measure far higher)."""

BANDWIDTH_EWMA_WEIGHT = 0.2
"""Weight of the newest build in the bandwidth average."""

MIN_MEASURED_BYTES = 1 << 20
"""Builds smaller than this (1 MiB) are not measured: their time is fixed overhead, not bandwidth."""


class DeviceUsage:
    """This worker's decayed request rates per component and its measured HOST→device bandwidth."""

    def __init__(self, half_life_s: float, default_bps: float = DEFAULT_HOST_TO_DEVICE_BPS) -> None:
        self.counter: DecayedCounter[str] = DecayedCounter(half_life_s)
        self.default_bps = default_bps
        self.measured_bps: float | None = None
        """EWMA of measured builds in bytes/s; None until the first."""

    def record(self, component_ids: list[str], t: float) -> None:
        """One request used ``component_ids`` at ``t``."""
        self.counter.add_many(dict.fromkeys(component_ids), t)

    def rate(self, component_id: str, t: float) -> float:
        """Decayed request rate (requests per second); 0 for a component no request used."""
        return self.counter.rate(component_id, t) if component_id in self.counter else 0.0

    def observe_build(self, nbytes: int, seconds: float) -> None:
        """A component of ``nbytes`` went from its HOST copy onto the device in ``seconds``."""
        if nbytes < MIN_MEASURED_BYTES or seconds <= 0:
            return
        bps = nbytes / seconds
        previous = self.measured_bps
        self.measured_bps = bps if previous is None else (1 - BANDWIDTH_EWMA_WEIGHT) * previous + BANDWIDTH_EWMA_WEIGHT * bps

    @property
    def bandwidth_bps(self) -> float:
        """HOST→device bandwidth: measured, or the default before the first measurement."""
        return self.measured_bps if self.measured_bps is not None else self.default_bps

    def reload_cost_s(self, nbytes: int) -> float:
        """Seconds to bring ``nbytes`` back from HOST."""
        return nbytes / self.bandwidth_bps


class DeviceUtilityModel:
    """The :class:`~diffmesh.policy.eviction.UtilityModel` of the device tier.

    ``entry_of`` looks up a cached entry (bytes and kind); ``pins`` gives the plan's pins.
    """

    def __init__(
        self,
        usage: DeviceUsage,
        entry_of: Callable[[str], CacheEntry | None],
        pins: Callable[[], frozenset[str]],
    ) -> None:
        self.usage = usage
        self.entry_of = entry_of
        self.pins = pins

    def rate(self, key: str, t: float) -> float:
        return self.usage.rate(key, t)

    def reload_cost_s(self, key: str) -> float:
        entry = self.entry_of(key)
        return self.usage.reload_cost_s(entry.bytes if entry is not None else 0)

    def kind(self, key: str) -> str:
        entry = self.entry_of(key)
        return kind_name(entry.kind) if entry is not None else "BASE"

    def pinned(self, key: str) -> bool:
        return key in self.pins()


def eviction_policy(
    mode: PolicyMode,
    usage: DeviceUsage,
    entry_of: Callable[[str], CacheEntry | None],
    pins: Callable[[], frozenset[str]],
    horizon_s: float,
) -> EvictionPolicy[str]:
    """The device tier's policy under ``mode``: utility (``diffmesh``) or LRU (``lru``)."""
    if mode is PolicyMode.LRU:
        return LRUEviction()
    return UtilityEviction(DeviceUtilityModel(usage, entry_of, pins), horizon_s)
