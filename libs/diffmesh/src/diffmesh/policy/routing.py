"""Router scoring by expected completion time (ECT).

``ECT(worker) = queue wait + load time of the pipeline's missing components + compute``,
where each missing component loads from the best source that holds it for that worker
(:class:`Source`: GPU on that worker: 0; HOST or SSD of its node; PEER, another node's
HOST or SSD copy; else REMOTE). Only workers whose free device memory fits the pipeline's
weights *and* its activations (resolution x images) are eligible. With asymmetric
loading the base loads first while adapters stream in concurrently, so adapters cost
only the slowest of them; otherwise loads add up.

The simulator (:mod:`diffmesh.sim.engine`) and the router (``diffmesh_router``) both
score with these functions: :func:`expected_completion_s`, :func:`pipeline_load_s`,
:func:`adapters_load_s` and :func:`fits` take floats or, for the router's scoring of
every worker at once, numpy arrays (the arithmetic is the same). :func:`band_groups`
turns a pipeline's popularity band into the pool preference the router ranks by.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeVar, overload

import numpy as np
from numpy.typing import NDArray

from diffmesh.policy.popularity import Band
from diffmesh.tiers import FASTEST_FIRST, Tier

W = TypeVar("W", bound=Hashable)
Num = TypeVar("Num", float, NDArray[np.float64])
"""A float, or an array of floats with one entry per worker."""

GB = 1_000_000_000


class Source(IntEnum):
    """Where a component missing on a worker's device would load from, fastest first."""

    GPU = 0
    """Already built on that worker's device: nothing to load."""
    HOST = 1
    """The shared-memory pool of the worker's node."""
    SSD = 2
    """The cache directory of the worker's node."""
    PEER = 3
    """Another node's SSD copy, streamed node to node."""
    REMOTE = 4
    """The component's remote store."""


@dataclass(frozen=True)
class Bandwidths:
    """Effective bytes per second from each source to a worker's device (load seconds = bytes / rate)."""

    host_bps: float
    ssd_bps: float
    peer_bps: float
    remote_bps: float

    @classmethod
    def from_hops(cls, host_bps: float, ssd_bps: float, peer_bps: float, remote_bps: float) -> Bandwidths:
        """End-to-end rates from the rate of each hop: HOST→device, SSD→HOST, PEER→SSD and REMOTE→SSD.

        A copy from a slower source passes through the faster tiers (REMOTE and PEER land
        on the node's SSD, then HOST, then the device), so its seconds per byte add up.
        """
        to_device = 1.0 / host_bps
        from_ssd = to_device + 1.0 / ssd_bps
        return cls(host_bps, 1.0 / from_ssd, 1.0 / (from_ssd + 1.0 / peer_bps), 1.0 / (from_ssd + 1.0 / remote_bps))

    def rate(self, source: Source) -> float:
        """Bytes per second from ``source`` (infinite for GPU)."""
        if source is Source.GPU:
            return float("inf")
        return (self.host_bps, self.ssd_bps, self.peer_bps, self.remote_bps)[source - 1]


def component_load_s(nbytes: int, source: Source, bandwidths: Bandwidths) -> float:
    """Seconds to make one component of ``nbytes`` ready on a device from ``source`` (GPU: 0)."""
    if source is Source.GPU:
        return 0.0
    return nbytes / bandwidths.rate(source)


def source_of(local: Tier | None, peer_holds: bool) -> Source:
    """The source of a component for one worker.

    ``local`` is the best tier of a copy the worker reaches directly (GPU only for a copy
    on that worker's device, HOST or SSD for its node's tiers; None: none);
    ``peer_holds`` says whether another live node's SSD holds a copy (instance managers
    stream peer copies from SSD).
    """
    if local is Tier.GPU:
        return Source.GPU
    if local is Tier.HOST:
        return Source.HOST
    if local is Tier.SSD:
        return Source.SSD
    return Source.PEER if peer_holds else Source.REMOTE


def activation_bytes(images: int, width: int, height: int, bytes_per_image_at_native: int, native_side: int) -> int:
    """Device memory the denoising activations need: ∝ pixels x images."""
    scale = (width * height) / float(native_side * native_side)
    return int(bytes_per_image_at_native * scale * max(1, images))


@overload
def fits(free_bytes: int, weight_bytes: int, activations: int) -> bool: ...


@overload
def fits(free_bytes: NDArray[np.int64], weight_bytes: int, activations: int) -> NDArray[np.bool_]: ...


def fits(free_bytes: int | NDArray[np.int64], weight_bytes: int, activations: int) -> bool | NDArray[np.bool_]:
    """Whether a worker with ``free_bytes`` of usable device memory can run the pipeline (per worker for an array)."""
    return weight_bytes + activations <= free_bytes


def best_tier_cost(costs: Mapping[Tier, float], holding: Iterable[Tier]) -> tuple[Tier, float]:
    """The fastest tier among ``holding`` (REMOTE when none) and its load cost from ``costs``.

    A GPU copy costs nothing; ``costs`` needs entries for HOST, SSD and REMOTE.
    """
    held = set(holding)
    for tier in FASTEST_FIRST:
        if tier in held or tier is Tier.REMOTE:
            return tier, 0.0 if tier is Tier.GPU else costs[tier]
    raise AssertionError("unreachable")


def pipeline_load_s(base_s: float, other_s: Sequence[float], asymmetric: bool = True) -> float:
    """Seconds to make a pipeline ready from its missing components' load times."""
    if not other_s:
        return base_s
    return base_s + (max(other_s) if asymmetric else sum(other_s))


def adapters_load_s(resident: Collection[int], costs: Sequence[float], needed: Sequence[int], asymmetric: bool) -> float:
    """Load seconds of the non-base components of ``needed`` missing from ``resident``.

    ``costs[c]`` is component ``c``'s load time from its best source. Asymmetric loading
    streams them concurrently after the base (the slowest counts); otherwise they add up.
    The same value as :func:`pipeline_load_s` with a base that costs nothing, without a list.
    """
    out = 0.0
    for c in needed[1:]:
        if c not in resident:
            x = costs[c]
            if asymmetric:
                if x > out:
                    out = x
            else:
                out += x
    return out


def expected_completion_s(queue_wait_s: Num, load_s: Num, compute_s: Num) -> Num:
    """Expected completion time of a request on one worker (or on each worker of arrays), from now."""
    return queue_wait_s + load_s + compute_s


@dataclass(frozen=True)
class WorkerEstimate:
    """A worker with the estimates the ECT scorer needs for one request."""

    worker_id: str
    queue_wait_s: float
    load_s: float
    """Load time of the request's missing components on this worker."""
    free_bytes: int
    """Device memory usable by this request (capacity minus pinned copies of other pipelines)."""


def choose_worker(
    candidates: Iterable[tuple[W, float, float, int]], weight_bytes: int, activations: int, compute_s: float
) -> tuple[W, float] | None:
    """The eligible worker with the lowest ECT and that ECT; None when none fits.

    ``candidates`` yields ``(worker, queue_wait_s, load_s, free_bytes)``; ties keep the
    earlier candidate, so the caller's order makes the choice deterministic.
    """
    best: tuple[W, float] | None = None
    for wid, wait, load, free in candidates:
        if not fits(free, weight_bytes, activations):
            continue
        ect = expected_completion_s(wait, load, compute_s)
        if best is None or ect < best[1]:
            best = (wid, ect)
    return best


def rank_candidates(
    candidates: Sequence[WorkerEstimate], weight_bytes: int, activations: int, compute_s: float
) -> list[WorkerEstimate]:
    """Eligible candidates ordered by ECT (lowest first), ties by worker id."""
    ok = [c for c in candidates if fits(c.free_bytes, weight_bytes, activations)]
    return sorted(ok, key=lambda c: (expected_completion_s(c.queue_wait_s, c.load_s, compute_s), c.worker_id))


def band_groups(
    band: Band, in_hot_pool: NDArray[np.bool_], replica: NDArray[np.bool_]
) -> tuple[NDArray[np.int8], NDArray[np.int8]]:
    """Per worker, the pool group (0 first) and the preference on equal ECT (0 first) for one request.

    Every band ranks all workers by ECT in one group; the band only breaks ties:

    * HOT: the pipeline's replicas first (a replica loses only when another worker
      finishes sooner, i.e. the replicas' queue wait exceeds a load from elsewhere);
    * COLD: workers outside the HOT replicas' pool first;
    * WARM: no preference.

    Tail traffic cannot evict head pipelines anyway: the plan pins their copies, and a
    worker's pinned bytes are not usable by other pipelines (:func:`fits`). An earlier
    version kept COLD requests off the pool while a worker outside it had room: a
    request could then queue behind others there while a pool worker would have
    finished it sooner, and the simulator (:mod:`diffmesh.sim.engine`, plain ECT with
    pins) never did that.

    ``in_hot_pool`` marks the workers holding any HOT pipeline's replica, ``replica`` the
    replicas of this request's pipeline.
    """
    zeros = np.zeros(in_hot_pool.shape, dtype=np.int8)
    if band is Band.HOT:
        return zeros, (~replica).astype(np.int8)
    if band is Band.COLD:
        return zeros, in_hot_pool.astype(np.int8)
    return zeros, zeros
