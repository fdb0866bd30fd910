"""The paper-style table, the target check and the plot of ``diffmesh sim``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from diffmesh.sim.engine import SimResult

COLUMNS = (
    ("requests", "reqs", "{:d}"),
    ("latency_mean_s", "mean s", "{:.2f}"),
    ("latency_p50_s", "p50 s", "{:.2f}"),
    ("latency_p95_s", "p95 s", "{:.2f}"),
    ("latency_p99_s", "p99 s", "{:.2f}"),
    ("queue_mean", "queue", "{:.2f}"),
    ("queue_p99", "q p99", "{:.0f}"),
    ("misses", "misses", "{:d}"),
    ("remote_bytes", "REMOTE GB", "{:.0f}"),
    ("peer_bytes", "PEER GB", "{:.0f}"),
    ("ssd_bytes", "SSD GB", "{:.0f}"),
    ("gpu_busy", "busy", "{:.3f}"),
    ("wall_s", "wall s", "{:.2f}"),
)


def table(rows: Mapping[str, Mapping[str, float | int]], oracle_misses: int | None = None) -> str:
    """A fixed-width table of system summaries (bytes shown in GB)."""
    head = ["system", *[c[1] for c in COLUMNS], "req/s"]
    lines = []
    for name, s in rows.items():
        cells = [name]
        for key, _, fmt in COLUMNS:
            v = s[key]
            if key.endswith("_bytes"):
                v = float(v) / 1e9
            cells.append(fmt.format(v))
        wall = float(s["wall_s"])
        cells.append(f"{int(s['requests']) / wall:,.0f}" if wall > 0 else "-")
        lines.append(cells)
    if oracle_misses is not None:
        lines.append(["oracle", *["" for _ in COLUMNS[:7]], str(oracle_misses), *["" for _ in COLUMNS[8:]], ""])
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    fmt_row = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
    return "\n".join([fmt_row(head), fmt_row(["-" * w for w in widths]), *map(fmt_row, lines)])


def change(new: float, old: float) -> float:
    """Relative change of ``new`` against ``old`` (-0.5 = halved)."""
    return (new - old) / old if old else 0.0


def targets(doc: Mapping[str, object]) -> list[tuple[str, bool, str]]:
    """The issue's targets: (name, met, detail)."""
    systems = doc["systems"]
    assert isinstance(systems, Mapping)
    d, lru = systems["diffmesh"], systems["lru"]
    oracle = doc["oracle"]
    assert isinstance(oracle, Mapping)
    out = []
    for key, label, goal in (
        ("latency_mean_s", "mean latency vs lru", -0.55),
        ("latency_p99_s", "p99 latency vs lru", -0.20),
        ("queue_mean", "mean queue vs lru", -0.85),
        ("remote_bytes", "REMOTE bytes vs lru", -0.90),
    ):
        c = change(float(d[key]), float(lru[key]))
        out.append((label, c <= goal, f"{c:+.1%} (target {goal:+.0%})"))
    om = int(oracle["misses"])
    ratio = d["misses"] / om if om else float("inf")
    out.append(("misses vs oracle", ratio <= 1.3, f"{ratio:.2f}x ({d['misses']} vs {om}; target <= 1.30x)"))
    for other in ("rayserve", "modelmesh"):
        if other in systems:
            o = systems[other]
            ok = d["latency_mean_s"] < o["latency_mean_s"] and d["latency_p99_s"] < o["latency_p99_s"]
            out.append(
                (
                    f"ahead of {other}",
                    ok,
                    f"mean {d['latency_mean_s']:.2f} vs {o['latency_mean_s']:.2f}, "
                    f"p99 {d['latency_p99_s']:.2f} vs {o['latency_p99_s']:.2f}",
                )
            )
    return out


def plot(path: Path, results: Mapping[str, SimResult], sweep: Mapping[str, Sequence[tuple[float, float, float]]]) -> None:
    """Latency CDF of every system, and mean/p99 latency over offered load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for name, r in results.items():
        lat = np.sort(r.latency_s)
        ax1.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=name, lw=1.8 if name in ("diffmesh", "lru") else 1.0)
    ax1.set_xscale("log")
    ax1.set_xlabel("end-to-end latency (s, log)")
    ax1.set_ylabel("fraction of requests")
    ax1.set_title("latency CDF")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    for name, pts in sweep.items():
        if not pts:
            continue
        loads = [p[0] for p in pts]
        line = ax2.plot(loads, [p[1] for p in pts], marker="o", label=f"{name} mean")[0]
        ax2.plot(loads, [p[2] for p in pts], marker="x", ls="--", color=line.get_color(), label=f"{name} p99")
    ax2.set_yscale("log")
    ax2.set_xlabel("offered load (fraction of compute capacity)")
    ax2.set_ylabel("latency (s, log)")
    ax2.set_title("latency over offered load")
    ax2.grid(alpha=0.3)
    if any(sweep.values()):
        ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
