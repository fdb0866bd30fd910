"""Size classes of the HOST pool: weighted k-means over the catalog's component sizes.

Each catalog component contributes its size in bytes with a weight (its share of
requests). The sizes are clustered into ``k`` groups minimising the weighted sum of
squared distances to the group means (1-D k-means). In one dimension the optimal
clusters are contiguous runs of the sorted sizes, so the problem is solved exactly by
dynamic programming over the distinct sizes: deterministic, no random initialisation and
no local optima. Every class's block size is the largest size in its cluster rounded up
to a multiple of :data:`BLOCK_GRANULARITY` (2 MiB), so every member fits in one block;
clusters whose rounded block sizes coincide are merged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Block sizes are multiples of 2 MiB: aligned for O_DIRECT and huge-page friendly.
BLOCK_GRANULARITY = 2 * 1024 * 1024
DEFAULT_CLASSES = 5


@dataclass(frozen=True)
class SizeClass:
    """One class of pool blocks."""

    block_size: int
    """Bytes per block: the cluster's largest size rounded up to the granularity."""
    weight: float
    """Summed weight (request share) of the cluster's members, normalised over all classes."""
    members: int
    """Number of catalog components in the cluster."""
    mean_size: float
    """Weighted mean size of the cluster's members."""


#: Share of every class weight spread evenly over the catalog, so components nobody has
#: requested yet (a new base, a cold start) still get pool blocks.
DEFAULT_PRIOR = 0.1


def request_share_weights(requests: Sequence[float], prior: float = DEFAULT_PRIOR) -> list[float]:
    """Weights for :func:`size_classes` from each component's recorded requests.

    ``(1 - prior) x`` the component's share of all requests ``+ prior / n``; with no
    requests at all, equal weights. Raises ``ValueError`` for a negative or non-finite
    count or a ``prior`` outside [0, 1].
    """
    if not 0.0 <= prior <= 1.0:
        raise ValueError(f"prior must be within [0, 1], got {prior}")
    for r in requests:
        if not math.isfinite(r) or r < 0:
            raise ValueError(f"request count must be finite and >= 0, got {r}")
    n = len(requests)
    total = float(sum(requests))
    if n == 0:
        return []
    if total <= 0:
        return [1.0 / n] * n
    return [(1.0 - prior) * r / total + prior / n for r in requests]


def round_up(n: int, granularity: int = BLOCK_GRANULARITY) -> int:
    """``n`` rounded up to a positive multiple of ``granularity``."""
    return max(1, -(-n // granularity)) * granularity


def size_classes(
    sizes: Sequence[int],
    weights: Sequence[float] | None = None,
    k: int = DEFAULT_CLASSES,
    granularity: int = BLOCK_GRANULARITY,
) -> list[SizeClass]:
    """Up to ``k`` size classes for components of ``sizes`` requested in proportion ``weights``.

    ``weights`` defaults to equal weights; all-zero weights are treated as equal. Returns
    the classes sorted by block size (fewer than ``k`` when there are fewer distinct
    sizes or rounded block sizes). Raises ``ValueError`` for no sizes, a negative size,
    mismatched lengths, a negative or non-finite weight, ``k`` < 1 or a bad granularity.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if granularity < 1:
        raise ValueError(f"granularity must be >= 1, got {granularity}")
    if not sizes:
        raise ValueError("no component sizes to cluster")
    if weights is None:
        weights = [1.0] * len(sizes)
    if len(weights) != len(sizes):
        raise ValueError(f"{len(sizes)} sizes but {len(weights)} weights")
    for s in sizes:
        if s < 0:
            raise ValueError(f"component size must be >= 0, got {s}")
    for w in weights:
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight must be finite and >= 0, got {w}")
    if sum(weights) == 0:
        weights = [1.0] * len(sizes)

    # Distinct sizes with summed weights and member counts (catalogs repeat sizes a lot).
    acc: dict[int, list[float]] = {}
    for s, w in zip(sizes, weights, strict=True):
        entry = acc.setdefault(int(s), [0.0, 0.0])
        entry[0] += float(w)
        entry[1] += 1
    xs = np.array(sorted(acc), dtype=np.float64)
    ws = np.array([acc[int(x)][0] for x in xs], dtype=np.float64)
    counts = [int(acc[int(x)][1]) for x in xs]
    bounds = _optimal_segments(xs, ws, min(k, len(xs)))

    total_w = float(ws.sum())
    # (block size, summed weight, members, weighted size sum); neighbours that round to the
    # same block size are merged.
    merged: list[tuple[int, float, int, float]] = []
    for lo, hi in bounds:
        block = round_up(int(xs[hi - 1]), granularity)
        w = float(ws[lo:hi].sum())
        members = sum(counts[lo:hi])
        wsum = float((ws[lo:hi] * xs[lo:hi]).sum())
        if merged and merged[-1][0] == block:
            _, pw, pm, ps = merged.pop()
            w, members, wsum = w + pw, members + pm, wsum + ps
        merged.append((block, w, members, wsum))
    return [SizeClass(block, w / total_w, members, wsum / w if w > 0 else float(block)) for block, w, members, wsum in merged]


def _optimal_segments(xs: np.ndarray, ws: np.ndarray, k: int) -> list[tuple[int, int]]:
    """Splits sorted ``xs`` into ``k`` contiguous runs minimising the weighted within-run variance.

    Returns half-open index ranges ``[(lo, hi), …]``. Ties are broken towards the
    earliest split point, so the result is deterministic.
    """
    n = len(xs)
    # Prefix sums of w, w·x, w·x² (index i = sum over xs[:i]); costs are computed in
    # float64 on values scaled to [0, 1] to keep cancellation small for byte-sized numbers.
    scale = float(xs[-1]) or 1.0
    x = xs / scale
    pw = np.concatenate(([0.0], np.cumsum(ws)))
    pwx = np.concatenate(([0.0], np.cumsum(ws * x)))
    pwx2 = np.concatenate(([0.0], np.cumsum(ws * x * x)))

    def cost(lo: np.ndarray, hi: int) -> np.ndarray:
        """Weighted SSE of xs[lo:hi] for every lo in ``lo`` (vectorised)."""
        w = pw[hi] - pw[lo]
        s = pwx[hi] - pwx[lo]
        s2 = pwx2[hi] - pwx2[lo]
        with np.errstate(divide="ignore", invalid="ignore"):
            c = s2 - np.where(w > 0, s * s / w, 0.0)
        return np.maximum(c, 0.0)

    inf = float("inf")
    # best[j][i]: minimal cost of splitting xs[:i] into j runs; arg[j][i]: start of the last run.
    best = np.full((k + 1, n + 1), inf)
    arg = np.zeros((k + 1, n + 1), dtype=np.int64)
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            lo = np.arange(j - 1, i)
            cand = best[j - 1][lo] + cost(lo, i)
            m = int(np.argmin(cand))  # first minimum → earliest split
            best[j][i] = cand[m]
            arg[j][i] = lo[m]
    bounds: list[tuple[int, int]] = []
    hi = n
    for j in range(k, 0, -1):
        lo_i = int(arg[j][hi])
        bounds.append((lo_i, hi))
        hi = lo_i
    bounds.reverse()
    return bounds
