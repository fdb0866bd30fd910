"""The printed table of ``diffmesh run`` and the per-request latency breakdown from the spans.

The breakdown comes from the custom spans of each request's trace: ``worker.queue``,
``worker.load`` (with its ``worker.load.component`` children, attribute ``source_tier``),
``worker.denoise`` and the instance manager's ``im.acquire.component``. "other" is the
rest of the end-to-end time (routing, gRPC hops, PNG encoding). When no spans are
available (traces exported elsewhere), the worker's ``Timing`` in the result is used.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from diffmesh.catalog import kind_name
from diffmesh.launcher.runner import RequestOutcome
from diffmesh.span_collector import CollectedSpan, SpanStore
from diffmesh.tiers import FASTEST_FIRST, Tier
from diffmesh.v1 import common_pb2

TIER_ORDER = tuple(tier.label for tier in FASTEST_FIRST)
"""Tier labels in the order the tables print them."""


def tier_label(value: Any) -> str:
    """``HOST``-style label of a tier given as an enum number or a (prefixed) name."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return Tier(value).label
        except ValueError:
            return str(value)
    return str(value or "?").upper().removeprefix("TIER_")


@dataclass
class Breakdown:
    """Where one request's time went (seconds)."""

    source: str  # "spans" or "result"
    total_s: float = 0.0
    queue_s: float = 0.0
    load_s: float = 0.0
    denoise_s: float = 0.0
    other_s: float = 0.0
    load_by_tier_s: dict[str, float] = field(default_factory=dict)
    im_acquire_by_tier_s: dict[str, float] = field(default_factory=dict)
    bytes_by_tier: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain dict, rounded to the microsecond."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = round(value, 6)
            elif isinstance(value, dict):
                out[key] = {k: round(v, 6) if isinstance(v, float) else v for k, v in value.items()}
        return out


def _sum(spans: Iterable[CollectedSpan], name: str) -> float:
    return sum(s.duration_s for s in spans if s.name == name)


def _by_tier(spans: Iterable[CollectedSpan], name: str) -> tuple[dict[str, float], dict[str, int]]:
    seconds: dict[str, float] = defaultdict(float)
    moved: dict[str, int] = defaultdict(int)
    for s in spans:
        if s.name == name:
            tier = tier_label(s.attributes.get("source_tier"))
            seconds[tier] += s.duration_s
            moved[tier] += int(s.attributes.get("bytes", 0) or 0)
    return dict(seconds), dict(moved)


def breakdown_from_spans(spans: Sequence[CollectedSpan], fallback_total_s: float = 0.0) -> Breakdown | None:
    """The breakdown of one request's trace; None when the trace has no worker spans."""
    if not any(s.name.startswith("worker.") for s in spans):
        return None
    roots = [s for s in spans if s.is_root]
    if roots:
        total = max(s.duration_s for s in roots)
    elif spans:
        total = (max(s.end_ns for s in spans) - min(s.start_ns for s in spans)) / 1e9
    else:
        total = fallback_total_s
    b = Breakdown("spans", total_s=total)
    b.queue_s = _sum(spans, "worker.queue")
    b.load_s = _sum(spans, "worker.load")
    b.denoise_s = _sum(spans, "worker.denoise")
    b.load_by_tier_s, b.bytes_by_tier = _by_tier(spans, "worker.load.component")
    b.im_acquire_by_tier_s, _ = _by_tier(spans, "im.acquire.component")
    b.other_s = max(0.0, total - b.queue_s - b.load_s - b.denoise_s)
    return b


def breakdown_from_result(result: common_pb2.GenerationResult, latency_s: float) -> Breakdown:
    """The breakdown the worker reported in the result's ``Timing`` and ``loads``."""
    t = result.timing
    b = Breakdown("result", total_s=latency_s, queue_s=t.queue_seconds, load_s=t.load_seconds, denoise_s=t.denoise_seconds)
    for load in result.loads:
        tier = tier_label(load.source_tier)
        b.load_by_tier_s[tier] = b.load_by_tier_s.get(tier, 0.0) + load.seconds
        b.bytes_by_tier[tier] = b.bytes_by_tier.get(tier, 0) + load.bytes
    b.other_s = max(0.0, latency_s - b.queue_s - b.load_s - b.denoise_s)
    return b


def spans_complete(spans: Sequence[CollectedSpan]) -> bool:
    """True once a request's trace has its root span and the worker's denoise span."""
    return any(s.is_root for s in spans) and any(s.name == "worker.denoise" for s in spans)


def wait_for_request_spans(store: SpanStore, trace_ids: Sequence[str], timeout: float = 10.0) -> bool:
    """Waits until every request trace is complete (see :func:`spans_complete`)."""
    wanted = set(trace_ids)

    def ready(spans: list[CollectedSpan]) -> bool:
        grouped: dict[str, list[CollectedSpan]] = defaultdict(list)
        for s in spans:
            if s.trace_id in wanted:
                grouped[s.trace_id].append(s)
        return all(spans_complete(grouped.get(t, [])) for t in wanted)

    return store.wait_for(ready, timeout)


def breakdowns(outcomes: Sequence[RequestOutcome], store: SpanStore | None) -> dict[int, Breakdown]:
    """Request index → breakdown, from spans where the store has them, else from the result."""
    traces = store.traces() if store is not None else {}
    out: dict[int, Breakdown] = {}
    for o in outcomes:
        if o.result is None:
            continue
        b = breakdown_from_spans(traces.get(o.trace_id, []), o.latency_s) if o.trace_id else None
        out[o.index] = b or breakdown_from_result(o.result, o.latency_s)
    return out


# -- rendering ---------------------------------------------------------------------------------
def components_cell(result: common_pb2.GenerationResult) -> str:
    """``id<-TIER`` for every component of the pipeline."""
    return ", ".join(f"{load.component_id}<-{tier_label(load.source_tier)}" for load in result.loads) or "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def render_requests(outcomes: Sequence[RequestOutcome]) -> str:
    """The request table: request, pipeline key, worker, tier of each component, latency."""
    rows = []
    for o in outcomes:
        name = f"{o.index} {o.request.name}"
        if o.result is None:
            rows.append([name, o.request.base_id, "-", f"FAILED: {o.error}", "-"])
        else:
            r = o.result
            rows.append([name, r.pipeline_key or o.request.base_id, r.worker_id or "?", components_cell(r), f"{o.latency_s:.3f}"])
    return _table(["request", "pipeline", "worker", "components (id<-tier)", "latency s"], rows)


def _tiers(values: dict[str, float]) -> str:
    order = [t for t in TIER_ORDER if t in values] + sorted(t for t in values if t not in TIER_ORDER)
    return " ".join(f"{t} {values[t]:.3f}" for t in order) or "-"


def render_breakdown(outcomes: Sequence[RequestOutcome], table: dict[int, Breakdown]) -> str:
    """The latency breakdown table (seconds)."""
    rows = []
    for o in outcomes:
        b = table.get(o.index)
        if b is None:
            continue
        rows.append([
            f"{o.index} {o.request.name}", f"{b.total_s:.3f}", f"{b.queue_s:.3f}", f"{b.load_s:.3f}",
            _tiers(b.load_by_tier_s), _tiers(b.im_acquire_by_tier_s), f"{b.denoise_s:.3f}", f"{b.other_s:.3f}", b.source,
        ])
    return _table(["request", "total", "queue", "load", "load by tier", "IM acquire by tier", "denoise", "other", "from"], rows)


def summary(
    outcomes: Sequence[RequestOutcome], table: dict[int, Breakdown], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON summary written to ``OUT/summary.json``."""
    requests = []
    for o in outcomes:
        entry: dict[str, Any] = {
            "index": o.index,
            "name": o.request.name,
            "base_id": o.request.base_id,
            "loras": [{"id": lo.id, "scale": lo.scale} for lo in o.request.loras],
            "controlnets": [c.id for c in o.request.controlnets],
            "ok": o.ok,
            "error": o.error,
            "latency_s": round(o.latency_s, 6),
            "trace_id": o.trace_id,
            "images": [str(p) for p in o.images],
        }
        if o.result is not None:
            entry |= {
                "pipeline_key": o.result.pipeline_key,
                "worker_id": o.result.worker_id,
                "node_id": o.result.node_id,
                "components": [
                    {"id": load.component_id, "kind": kind_name(load.kind),
                     "tier": tier_label(load.source_tier), "bytes": load.bytes, "seconds": round(load.seconds, 6)}
                    for load in o.result.loads
                ],
            }
        if o.index in table:
            entry["breakdown"] = table[o.index].to_json()
        requests.append(entry)
    return {"requests": requests, **(extra or {})}
