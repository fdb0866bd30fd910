"""Router scoring by expected completion time (ECT).

``ECT(worker) = queue wait + load time of the pipeline's missing components + compute``,
where each missing component loads from the best tier that holds it for that worker
(GPU: 0; HOST: device copy; SSD: disk read; REMOTE: fetch). Only workers whose free
device memory fits the pipeline's weights *and* its activations (resolution x images)
are eligible. With asymmetric loading the base loads first while adapters stream in
concurrently, so adapters cost only the slowest of them; otherwise loads add up.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from diffmesh.tiers import FASTEST_FIRST, Tier

W = TypeVar("W", bound=Hashable)


def activation_bytes(images: int, width: int, height: int, bytes_per_image_at_native: int, native_side: int) -> int:
    """Device memory the denoising activations need: ∝ pixels x images."""
    scale = (width * height) / float(native_side * native_side)
    return int(bytes_per_image_at_native * scale * max(1, images))


def fits(free_bytes: int, weight_bytes: int, activations: int) -> bool:
    """Whether a worker with ``free_bytes`` of usable device memory can run the pipeline."""
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


def expected_completion_s(queue_wait_s: float, load_s: float, compute_s: float) -> float:
    """Expected completion time of a request on one worker, from now."""
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
    need = weight_bytes + activations
    for wid, wait, load, free in candidates:
        if need > free:
            continue
        ect = wait + load + compute_s
        if best is None or ect < best[1]:
            best = (wid, ect)
    return best


def rank_candidates(
    candidates: Sequence[WorkerEstimate], weight_bytes: int, activations: int, compute_s: float
) -> list[WorkerEstimate]:
    """Eligible candidates ordered by ECT (lowest first), ties by worker id."""
    ok = [c for c in candidates if fits(c.free_bytes, weight_bytes, activations)]
    return sorted(ok, key=lambda c: (expected_completion_s(c.queue_wait_s, c.load_s, compute_s), c.worker_id))
