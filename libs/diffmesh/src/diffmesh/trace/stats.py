"""Workload facts the paper reports: popularity skew, head shares, LoRA use."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from diffmesh.trace.model import Workload


def gini(counts: Sequence[float] | np.ndarray) -> float:
    """Gini coefficient of non-negative counts (0: all equal; → 1: one takes all)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n = x.size
    if n == 0 or x.sum() <= 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float((2.0 * np.sum(ranks * x)) / (n * x.sum()) - (n + 1.0) / n)


def top_share(counts: Sequence[float] | np.ndarray, k: int) -> float:
    """Share of the total held by the ``k`` largest counts."""
    x = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    total = x.sum()
    return float(x[: max(0, k)].sum() / total) if total > 0 else 0.0


def top_fraction_share(counts: Sequence[float] | np.ndarray, fraction: float) -> float:
    """Share held by the top ``fraction`` of keys (at least one key)."""
    n = len(counts)
    return top_share(counts, max(1, math.ceil(n * fraction - 1e-9))) if n else 0.0


def workload_stats(w: Workload) -> dict[str, float | int]:
    """The facts ``diffmesh trace stats`` prints."""
    pipe_counts = np.bincount(w.pipeline, minlength=len(w.pipelines))
    base_of = np.array([p.base for p in w.pipelines], dtype=np.int64)
    base_counts_all = np.bincount(base_of[w.pipeline], minlength=len(w.components))
    base_counts = base_counts_all[base_counts_all > 0]
    has_lora = np.array([len(p.loras) > 0 for p in w.pipelines], dtype=bool)
    span = float(w.arrival_s[-1] - w.arrival_s[0]) if len(w) else 0.0
    images = np.asarray(w.images)
    return {
        "requests": len(w),
        "gini_base": round(gini(base_counts), 4),
        "top5pct_share": round(top_fraction_share(base_counts, 0.05), 4),
        "top50_pipelines_share": round(top_share(pipe_counts, 50), 4),
        "lora_share": round(float(has_lora[w.pipeline].mean()) if len(w) else 0.0, 4),
        "base_models": int(base_counts.size),
        "pipelines": int((pipe_counts > 0).sum()),
        "loras": sum(1 for c in w.components if c.kind == "LORA"),
        "catalog_gb": round(sum(c.nbytes for c in w.components) / 1e9, 1),
        "span_days": round(span / 86400.0, 2),
        "images_mean": round(float(images.mean()) if len(w) else 0.0, 3),
    }
