"""Statistics of one policy's run, the comparison of two, and the table (pure: no I/O).

Definitions (``README.md`` in this folder has the full list, with each number's source):

- latency: from the request's scheduled arrival to its answer, successful requests only;
  p50/p99 by linear interpolation (numpy's default);
- ``queue_mean``: requests waiting for a busy worker anywhere in the mesh, sampled at each
  arrival (the simulator's definition). A request waits from ``done - denoise - load -
  queue`` to ``done - denoise - load`` (the worker's ``Timing``), on the client's clock;
- ``gpu_busy``: Σ (load + denoise seconds of every request) / (workers x wall seconds).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from diffmesh.replay.driver import Outcome

SYSTEM_KEYS = (
    "requests",
    "failed",
    "latency_mean_s",
    "latency_p50_s",
    "latency_p99_s",
    "queue_mean",
    "remote_bytes",
    "peer_bytes",
    "misses",
    "gpu_busy",
)
"""The keys every system has (the issue's list), in table order."""

PLANE_KEYS = (
    "plan_versions",
    "hot_pipelines",
    "pins",
    "fused_overlays",
    "prefetches",
    "prefetch_hits",
    "admissions_refused",
    "peer_fetches",
    "spills",
    "locate_calls",
    "view_updates",
    "workers_used",
)
"""The policy-plane counters (the issue's list)."""


def latency_stats(latencies: Sequence[float]) -> dict[str, float | None]:
    """Mean, p50 and p99 (None for an empty list)."""
    if not latencies:
        return {"latency_mean_s": None, "latency_p50_s": None, "latency_p99_s": None}
    arr = np.asarray(latencies, dtype=np.float64)
    return {
        "latency_mean_s": float(arr.mean()),
        "latency_p50_s": float(np.percentile(arr, 50)),
        "latency_p99_s": float(np.percentile(arr, 99)),
    }


def waiting_interval(o: Outcome) -> tuple[float, float]:
    """When a successful request waited in a worker's queue (client clock, seconds since the start)."""
    end = o.done_s - o.denoise_s - o.load_s
    return end - o.queue_s, end


def queue_lengths(outcomes: Sequence[Outcome]) -> list[int]:
    """Requests waiting in the mesh when each request arrives (``sent_s``), in stream order."""
    intervals = [waiting_interval(o) for o in outcomes if o.ok and o.queue_s > 0]
    starts = sorted(a for a, _ in intervals)
    ends = sorted(b for _, b in intervals)
    # waiting at t: started before t (the arriving request is not behind itself) and not ended by t
    return [bisect.bisect_left(starts, o.sent_s) - bisect.bisect_right(ends, o.sent_s) for o in outcomes]


def gpu_busy(outcomes: Iterable[Outcome], workers: int, wall_s: float) -> float | None:
    """Σ (load + denoise) / (workers x wall); None without wall time or workers."""
    if workers <= 0 or wall_s <= 0:
        return None
    return float(sum(o.load_s + o.denoise_s for o in outcomes if o.ok) / (workers * wall_s))


def loads_by_tier(outcomes: Iterable[Outcome]) -> dict[str, dict[str, int]]:
    """Per component kind, how many loads came from each tier (the results' ``loads``)."""
    table: dict[str, Counter[str]] = {}
    for o in outcomes:
        for load in o.loads:
            table.setdefault(load.kind, Counter())[load.tier] += 1
    return {kind: dict(sorted(c.items())) for kind, c in sorted(table.items())}


def summarize(
    outcomes: Sequence[Outcome],
    wall_s: float,
    workers: int,
    *,
    remote_bytes: int | None,
    peer_bytes: int | None,
    misses: int | None,
) -> dict[str, Any]:
    """The issue's per-system numbers plus a few that explain them (see the module docstring)."""
    ok = [o for o in outcomes if o.ok]
    queue = queue_lengths(outcomes)
    codes = Counter(o.code or "ERROR" for o in outcomes if not o.ok)
    out: dict[str, Any] = {
        "requests": len(outcomes),
        "failed": len(outcomes) - len(ok),
        **latency_stats([o.latency_s for o in ok]),
        "queue_mean": float(np.mean(queue)) if queue else None,
        "remote_bytes": remote_bytes,
        "peer_bytes": peer_bytes,
        "misses": misses,
        "gpu_busy": gpu_busy(ok, workers, wall_s),
        "queue_wait_mean_s": float(np.mean([o.queue_s for o in ok])) if ok else None,
        "load_mean_s": float(np.mean([o.load_s for o in ok])) if ok else None,
        "denoise_mean_s": float(np.mean([o.denoise_s for o in ok])) if ok else None,
        "queue_p99": float(np.percentile(queue, 99)) if queue else None,
        "wall_s": wall_s,
        "failed_by_code": dict(sorted(codes.items())),
        "busy_retries": sum(o.busy_retries for o in outcomes),
        "loads_by_tier": loads_by_tier(ok),
        "requests_per_worker": dict(sorted(Counter(f"{o.node_id}/{o.worker_id}" for o in ok).items())),
    }
    return out


def pct_change(new: float | None, old: float | None) -> float | None:
    """``(new - old) / old`` in percent; None when either is missing or ``old`` is 0."""
    if new is None or old is None or old == 0:
        return None
    return 100.0 * (new - old) / old


def compare(systems: Mapping[str, Mapping[str, Any]], new: str = "diffmesh", old: str = "lru") -> dict[str, float | None] | None:
    """``new`` vs ``old`` in percent (negative: ``new`` is lower); None unless both ran."""
    if new not in systems or old not in systems:
        return None
    a, b = systems[new], systems[old]
    return {
        "latency_mean_pct": pct_change(a.get("latency_mean_s"), b.get("latency_mean_s")),
        "latency_p50_pct": pct_change(a.get("latency_p50_s"), b.get("latency_p50_s")),
        "latency_p99_pct": pct_change(a.get("latency_p99_s"), b.get("latency_p99_s")),
        "queue_mean_pct": pct_change(a.get("queue_mean"), b.get("queue_mean")),
        "remote_bytes_pct": pct_change(a.get("remote_bytes"), b.get("remote_bytes")),
        "misses_pct": pct_change(a.get("misses"), b.get("misses")),
    }


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    return "\n".join(lines)


def render(systems: Mapping[str, Mapping[str, Any]], comparison: Mapping[str, float | None] | None) -> str:
    """The systems table, the policy-plane table and the comparison line."""
    header = ["system", "reqs", "failed", "mean s", "p50 s", "p99 s", "queue", "REMOTE MB", "PEER MB", "misses", "busy"]
    rows = []
    for name, s in systems.items():
        mb = [None if s.get(k) is None else s[k] / 1e6 for k in ("remote_bytes", "peer_bytes")]
        rows.append(
            [
                name,
                _cell(s.get("requests")),
                _cell(s.get("failed")),
                _cell(s.get("latency_mean_s")),
                _cell(s.get("latency_p50_s")),
                _cell(s.get("latency_p99_s")),
                _cell(s.get("queue_mean")),
                _cell(mb[0], 1),
                _cell(mb[1], 1),
                _cell(s.get("misses")),
                _cell(s.get("gpu_busy"), 3),
            ]
        )
    text = _table(header, rows)
    planes = [(name, s["policy_plane"]) for name, s in systems.items() if isinstance(s.get("policy_plane"), Mapping)]
    if planes:
        plane_rows = [[key, *(_cell(p.get(key)) for _, p in planes)] for key in PLANE_KEYS]
        text += "\n\npolicy plane\n" + _table(["counter", *(name for name, _ in planes)], plane_rows)
    if comparison:
        parts = [f"{label} {_cell(comparison.get(key), 1)} %" for label, key in (
            ("mean", "latency_mean_pct"), ("p50", "latency_p50_pct"), ("p99", "latency_p99_pct"),
            ("queue", "queue_mean_pct"), ("REMOTE bytes", "remote_bytes_pct"),
        )]
        text += "\n\ndiffmesh vs lru: " + ", ".join(parts)
    return text
