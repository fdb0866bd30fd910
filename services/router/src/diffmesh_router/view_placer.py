"""Placement from the router's replica of the view: no coordinator call per request.

``diffmesh`` mode ranks every live worker by expected completion time
(:mod:`diffmesh.policy.routing`): queue wait (busy count x the worker's measured mean
service time, or this request's compute estimate before a measurement) + load time of
each component from the best source that holds it for that worker + compute (the
request's megapixel-steps x the worker's measured seconds per unit). Workers whose usable
device memory does not fit the weights and the activations go last (when none fits, all
are ranked by ECT: the worker evicts or sub-batches). Workers with room in their queue
come before full ones; on equal ECT the pipeline's band decides
(:func:`~diffmesh.policy.routing.band_groups`: HOT to its replicas, COLD off the HOT
pool), then the lower worker id.

Workers share a load profile (which source each component comes from) far more often
than not, so the load is computed once per distinct profile with the policy's scalar
functions and spread over the workers with numpy.

``lru`` mode ranks by busy count only (fewest waiting or running, ties by worker id),
as the simulator's baseline does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from diffmesh.errors import Unavailable
from diffmesh.policy.popularity import Band
from diffmesh.policy.routing import (
    Source,
    band_groups,
    component_load_s,
    expected_completion_s,
    fits,
    pipeline_load_s,
)
from diffmesh.policy_mode import PolicyMode
from diffmesh.view import WorkerKey
from numpy.typing import NDArray

from diffmesh_router.worker_table import WorkerTable

log = logging.getLogger(__name__)

NO_WORKER = "no live worker is registered with the coordinator; start a worker and retry"
_RADIX = len(Source)


@dataclass(frozen=True)
class Target:
    """A worker to send a request to."""

    node_id: str
    worker_id: str
    address: str

    @property
    def key(self) -> WorkerKey:
        """(node_id, worker_id)."""
        return (self.node_id, self.worker_id)


@dataclass(frozen=True)
class RequestShape:
    """What a placement needs to know about one request."""

    pipeline_key: str
    """The requested pipeline's canonical key (its band comes from the plan)."""
    component_ids: tuple[str, ...]
    """Components of the pipeline the worker will run, base (or FUSED overlay) first."""
    component_bytes: tuple[int, ...]
    activations: int
    """Device bytes of the denoising activations (resolution x images)."""
    units: float
    """Compute units: steps x images x megapixels."""


class Ranking:
    """Workers best first for one request; :meth:`targets` yields them lazily."""

    def __init__(
        self,
        keys: tuple[WorkerKey, ...],
        addresses: tuple[str, ...],
        order: NDArray[np.intp],
        count: int,
        band: Band | None,
        ect_s: NDArray[np.float64] | None = None,
    ) -> None:
        self._keys = keys
        self._addresses = addresses
        self.order = order
        self.count = count
        """How many workers are candidates (the eligible ones)."""
        self.band = band
        self._ect = ect_s

    def __len__(self) -> int:
        return self.count

    def targets(self) -> Iterator[Target]:
        """Candidates best first."""
        for i in self.order[: self.count].tolist():
            node_id, worker_id = self._keys[i]
            yield Target(node_id, worker_id, self._addresses[i])

    def first(self) -> Target:
        """The best candidate."""
        return next(self.targets())

    def ect_s(self, position: int = 0) -> float | None:
        """Expected completion time of the candidate at ``position`` (None in lru mode)."""
        if self._ect is None or position >= self.count:
            return None
        return float(self._ect[self.order[position]])


class ViewPlacer:
    """Ranks the live workers of the view for a request (see the module docstring)."""

    def __init__(self, table: WorkerTable, mode: PolicyMode, asymmetric: bool = True) -> None:
        self.table = table
        self.mode = mode
        self.asymmetric = asymmetric
        self._pool_cache: tuple[tuple[int, int], NDArray[np.bool_]] | None = None

    def has_workers(self) -> bool:
        """Whether the view lists at least one live worker."""
        return bool(self.table.keys)

    def rank(self, shape: RequestShape) -> Ranking:
        """Every live worker ranked for ``shape``; Unavailable when the view lists none."""
        t = self.table
        n = len(t.keys)
        if n == 0:
            raise Unavailable(NO_WORKER)
        busy = t.busy()
        rows = np.arange(n)
        if self.mode is PolicyMode.LRU:
            return Ranking(t.keys, t.addresses, np.lexsort((rows, busy)), n, None)

        load = self._load_s(shape)
        learned = t.learned
        spu = np.where(np.isnan(t.seconds_per_unit), learned.unit_default(), t.seconds_per_unit)
        compute = shape.units * spu
        service = np.where(np.isnan(t.service_s), compute, t.service_s)
        ect = expected_completion_s(busy * service, load, compute)

        eligible = fits(self._usable(shape), sum(shape.component_bytes), shape.activations)
        count = int(eligible.sum())
        if count == 0:
            log.warning(
                "no worker's free device memory fits the pipeline; ranking every worker",
                extra={"pipeline_key": shape.pipeline_key, "weights": sum(shape.component_bytes)},
            )
            eligible = np.ones(n, dtype=np.bool_)
            count = n
        room = busy < t.max_queue + 1.0
        plan = t.view.plan
        band = plan.band(shape.pipeline_key)
        hot = plan.hot.get(shape.pipeline_key)
        replica = np.zeros(n, dtype=np.bool_)
        if hot is not None:
            for key in hot.replicas:
                r = t.row.get(key)
                if r is not None:
                    replica[r] = True
        group, preference = band_groups(band, self._hot_pool(), replica)
        order = np.lexsort((rows, preference, ect, group, ~room, ~eligible))
        return Ranking(t.keys, t.addresses, order, count, band, ect)

    def _load_s(self, shape: RequestShape) -> NDArray[np.float64]:
        """Per worker, seconds to make the pipeline's missing components ready."""
        t = self.table
        n = len(t.keys)
        profile = np.zeros(n, dtype=np.int64)
        scale = 1
        for cid in shape.component_ids:
            found = t.sources(cid)
            source = found.node_source[t.node_of].astype(np.int64)
            if found.gpu_rows.size:
                source[found.gpu_rows] = Source.GPU
            profile += source * scale
            scale *= _RADIX
        profiles, where = np.unique(profile, return_inverse=True)
        bandwidths = t.learned.bandwidths()
        loads = np.empty(profiles.size, dtype=np.float64)
        for j, code in enumerate(profiles.tolist()):
            costs = []
            for nbytes in shape.component_bytes:
                costs.append(component_load_s(nbytes, Source(code % _RADIX), bandwidths))
                code //= _RADIX
            loads[j] = pipeline_load_s(costs[0], costs[1:], self.asymmetric)
        return loads[where]

    def _usable(self, shape: RequestShape) -> NDArray[np.int64]:
        """Usable device bytes per worker; a copy the plan pins for this very pipeline counts as usable."""
        t = self.table
        usable = t.usable_bytes()
        pinned = t.view.plan.pinned
        if pinned:
            for cid in shape.component_ids:
                found = t.sources(cid)
                for r, nbytes in zip(found.gpu_rows.tolist(), found.gpu_bytes.tolist(), strict=True):
                    if cid in pinned.get(t.keys[r], ()):
                        usable[r] += nbytes
        return usable

    def _hot_pool(self) -> NDArray[np.bool_]:
        t = self.table
        stamp = (t.view.plan.version, t.view.live_version)
        if self._pool_cache is not None and self._pool_cache[0] == stamp:
            return self._pool_cache[1]
        pool = np.zeros(len(t.keys), dtype=np.bool_)
        for key in t.view.plan.hot_pool:
            r = t.row.get(key)
            if r is not None:
                pool[r] = True
        self._pool_cache = (stamp, pool)
        return pool
