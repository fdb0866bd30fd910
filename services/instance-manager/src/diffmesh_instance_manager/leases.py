"""Leases: who holds which HOST copies; a copy with a live lease is never evicted."""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field

from diffmesh.errors import NotFound


@dataclass
class Lease:
    """One Acquire's hold on its components (each id counted once per lease)."""

    lease_id: str
    holder: str
    component_ids: set[str] = field(default_factory=set)


class LeaseTable:
    """Leases and per-component reference counts (event-loop confined, no locking)."""

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}
        self._refs: Counter[str] = Counter()

    def open(self, holder: str) -> Lease:
        """Starts an empty lease for ``holder``."""
        lease = Lease(lease_id=uuid.uuid4().hex, holder=holder)
        self._leases[lease.lease_id] = lease
        return lease

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
        return sorted(freed)

    def refs(self, component_id: str) -> int:
        """Live leases holding ``component_id``."""
        return self._refs.get(component_id, 0)

    def __len__(self) -> int:
        return len(self._leases)
