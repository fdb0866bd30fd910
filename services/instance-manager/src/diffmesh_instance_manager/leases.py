"""Leases: who holds which HOST copies; a copy with a live lease is never evicted or freed.

A lease belongs to a *holder* (a worker id). So that a worker that dies without calling
``Release`` does not pin copies forever, leases expire: a holder's leases end when it
has neither taken a new lease (``Acquire``/``Fuse``) nor been reported live by the
coordinator (a registered worker of this node whose lease there is current) for
``ttl_s`` seconds. ``ttl_s`` = 0 disables expiry.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from diffmesh.errors import NotFound


@dataclass
class Lease:
    """One Acquire's hold on its components (each id counted once per lease)."""

    lease_id: str
    holder: str
    component_ids: set[str] = field(default_factory=set)


class LeaseTable:
    """Leases, per-component reference counts and holder liveness (event-loop confined, no locking)."""

    def __init__(self, ttl_s: float = 0.0) -> None:
        self.ttl_s = ttl_s
        self._leases: dict[str, Lease] = {}
        self._refs: Counter[str] = Counter()
        self._seen: dict[str, float] = {}

    def open(self, holder: str, now: float = 0.0) -> Lease:
        """Starts an empty lease for ``holder`` (and renews the holder's other leases)."""
        lease = Lease(lease_id=uuid.uuid4().hex, holder=holder)
        self._leases[lease.lease_id] = lease
        self.renew([holder], now)
        return lease

    def renew(self, holders: Iterable[str], now: float) -> None:
        """Marks ``holders`` alive at ``now``."""
        for holder in holders:
            if self._seen.get(holder, -1.0) < now:
                self._seen[holder] = now

    def pin(self, lease: Lease, component_id: str) -> None:
        """Adds ``component_id`` to ``lease`` (no-op when already in it)."""
        if component_id not in lease.component_ids:
            lease.component_ids.add(component_id)
            self._refs[component_id] += 1

    def close(self, lease_id: str) -> list[str]:
        """Ends a lease; returns the ids whose last lease it was. NOT_FOUND for an unknown lease."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            raise NotFound("lease", lease_id)
        freed: list[str] = []
        for cid in lease.component_ids:
            self._refs[cid] -= 1
            if self._refs[cid] <= 0:
                del self._refs[cid]
                freed.append(cid)
        if not any(other.holder == lease.holder for other in self._leases.values()):
            self._seen.pop(lease.holder, None)
        return sorted(freed)

    def expire(self, now: float) -> tuple[list[str], list[str]]:
        """Ends the leases of holders silent for more than ``ttl_s``; returns (lease ids, ids that lost their last lease)."""
        if self.ttl_s <= 0:
            return [], []
        dead = {h for h, seen in self._seen.items() if now - seen > self.ttl_s}
        ended = [lid for lid, lease in self._leases.items() if lease.holder in dead]
        freed: list[str] = []
        for lid in ended:
            freed += self.close(lid)
        for holder in dead:
            self._seen.pop(holder, None)
        return ended, sorted(freed)

    def holders(self) -> set[str]:
        """Holders with at least one lease."""
        return {lease.holder for lease in self._leases.values()}

    def refs(self, component_id: str) -> int:
        """Live leases holding ``component_id``."""
        return self._refs.get(component_id, 0)

    def __len__(self) -> int:
        return len(self._leases)
