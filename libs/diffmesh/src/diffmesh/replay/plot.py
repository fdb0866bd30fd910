"""The latency CDF of every policy's run, as a PNG (needs matplotlib: the ``sim`` extra)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_cdfs(latencies: Mapping[str, Sequence[float]], path: Path, title: str = "") -> bool:
    """Writes the CDFs to ``path``; False (nothing written) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in latencies.items():
        if not values:
            continue
        xs = np.sort(np.asarray(values, dtype=np.float64))
        ys = np.arange(1, xs.size + 1) / xs.size
        ax.step(xs, ys, where="post", label=f"{name} (mean {xs.mean():.2f} s, p99 {np.percentile(xs, 99):.2f} s)")
    ax.set_xscale("log")
    ax.set_xlabel("latency (s, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title or "diffmesh replay: latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
