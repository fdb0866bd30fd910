"""Load the Alibaba GenAI trace (a folder laid out like ``alibaba-genai-2026``) as a :class:`Workload`.

The two request files anonymise model ids differently, so they cannot be joined on id.
They are joined by **popularity rank**:

1. Arrivals, tenants (``groupId``), task types, images and steps come from
   ``lora_request_trace.csv.gz``; pipeline compositions (base + LoRA ids + scales) from
   ``data_trace_processed.csv.gz``.
2. Base models of both files are ranked by request count (ties: first appearance). The
   request file's base of rank *i* becomes the data file's base of rank *i*; a request
   base ranked beyond the data file's bases keeps its own id.
3. A request with ``num_lora = 0`` runs its base alone. Requests with LoRAs are grouped
   into streams ``(tenant, base, num_lora)``. For a mapped base the candidate pipelines
   are the data file's pipelines on that base with the same LoRA count (else the nearest
   positive count on that base; else the LoRA sets of the most popular pipelines of any
   base with that count, put on this base). Streams and candidates are both ranked by
   count, and each stream takes the candidate whose cumulative-share interval holds the
   stream's cumulative-share midpoint, so popular streams get popular pipelines in
   proportion. The join uses no randomness.

Component sizes come from :mod:`diffmesh.trace.sizes` (hash of the id). The trace has no
ControlNet ids, so trace pipelines have none.
"""

from __future__ import annotations

import ast
import bisect
import calendar
import csv
import gzip
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np

from diffmesh.pipeline_key import canonical_key
from diffmesh.trace.model import Component, Pipeline, Workload
from diffmesh.trace.sizes import base_bytes, base_family, lora_bytes

REQUEST_FILE = "lora_request_trace.csv.gz"
PIPELINE_FILE = "data_trace_processed.csv.gz"
TRACE_ENV = "DIFFMESH_TRACE"
TASK_CODES = {"TXT_2_IMG": 0, "IMG_2_IMG": 1, "INPAINTING": 2}


def trace_folder(flag: str | os.PathLike[str] | None) -> Path | None:
    """The trace folder from a flag, else the ``DIFFMESH_TRACE`` environment variable, else None."""
    value = flag or os.environ.get(TRACE_ENV)
    return Path(value) if value else None


def read_rows(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a gzip CSV as dicts."""
    with gzip.open(path, "rt", newline="") as fh:
        yield from csv.DictReader(fh)


def _num(text: str | None, default: float) -> float:
    try:
        value = float(text) if text not in (None, "") else default
    except ValueError:
        return default
    return default if value != value else value


def _rank(counts: Counter[str], first_seen: dict[str, int]) -> list[str]:
    return sorted(counts, key=lambda k: (-counts[k], first_seen[k]))


LoraSet = tuple[tuple[str, float], ...]


def _read_pipelines(path: Path) -> tuple[list[str], dict[str, Counter[LoraSet]]]:
    """Data-file bases ranked by popularity and, per base, LoRA-set counts."""
    base_counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    per_base: dict[str, Counter[LoraSet]] = defaultdict(Counter)
    for i, row in enumerate(read_rows(path)):
        base = row.get("checkpoint_model_version_id") or ""
        if not base:
            continue
        base_counts[base] += 1
        first.setdefault(base, i)
        text = row.get("lora_args") or "[]"
        try:
            args = ast.literal_eval(text) if text.strip() != "[]" else []
        except (ValueError, SyntaxError):
            args = []
        loras: LoraSet = tuple(
            sorted(
                (str(a["modelVersionId"]), round(float(a.get("scale", 1.0)), 2))
                for a in args
                if isinstance(a, dict) and a.get("modelVersionId")
            )
        )
        per_base[base][loras] += 1
    return _rank(base_counts, first), per_base


def _cumulative_pick(stream_counts: list[int], cand_counts: list[int]) -> list[int]:
    """For streams (ranked) pick candidate indices by cumulative-share midpoints."""
    total_s = float(sum(stream_counts))
    total_c = float(sum(cand_counts))
    edges = list(np.cumsum(cand_counts) / total_c)
    picks = []
    acc = 0.0
    for n in stream_counts:
        mid = (acc + n / 2.0) / total_s
        acc += n
        picks.append(min(len(cand_counts) - 1, bisect.bisect_right(edges, mid)))
    return picks


def load_trace(folder: str | os.PathLike[str]) -> Workload:
    """Read the two request files of a trace folder and join them by popularity rank."""
    folder = Path(folder)
    req_path, pipe_path = folder / REQUEST_FILE, folder / PIPELINE_FILE
    for p in (req_path, pipe_path):
        if not p.exists():
            raise FileNotFoundError(f"trace file missing: {p}")
    data_bases, per_base = _read_pipelines(pipe_path)

    rows = []
    for i, row in enumerate(read_rows(req_path)):
        stamp = row.get("gmt_create") or ""
        try:
            t = float(calendar.timegm(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timetuple()))
        except ValueError:
            continue
        images = int(min(8, max(1, _num(row.get("num_images_per_prompt"), 1))))
        steps = int(min(150, max(1, _num(row.get("num_inference_steps"), 30))))
        nl = int(max(0, _num(row.get("num_lora"), 0)))
        base = row.get("checkpoint_model_version_id") or "unknown"
        exec_s = _num(row.get("exec_time_seconds"), float("nan"))
        rows.append(
            (t, i, base, row.get("groupId") or "", TASK_CODES.get(row.get("predict_type") or "", 0), images, steps, nl, exec_s)
        )
    if not rows:
        raise ValueError(f"no requests in {req_path}")
    rows.sort(key=lambda r: (r[0], r[1]))

    req_counts: Counter[str] = Counter(r[2] for r in rows)
    first: dict[str, int] = {}
    for j, r in enumerate(rows):
        first.setdefault(r[2], j)
    req_ranked = _rank(req_counts, first)
    base_map = {b: (data_bases[i] if i < len(data_bases) else f"req-{b}") for i, b in enumerate(req_ranked)}

    # Global LoRA sets by count, per LoRA count, for bases with no LoRA pipelines of their own.
    global_sets: dict[int, Counter[LoraSet]] = defaultdict(Counter)
    for counter in per_base.values():
        for ls, n in counter.items():
            if ls:
                global_sets[len(ls)][ls] += n

    def candidates(base: str, k: int) -> list[tuple[LoraSet, int]]:
        own = per_base.get(base, Counter())
        by_k: dict[int, list[tuple[LoraSet, int]]] = defaultdict(list)
        for ls, n in own.items():
            if ls:
                by_k[len(ls)].append((ls, n))
        pool = by_k or {kk: list(c.items()) for kk, c in global_sets.items()}
        if not pool:
            return []
        kk = min(pool, key=lambda x: (abs(x - k), x))
        return sorted(pool[kk], key=lambda x: (-x[1], x[0]))

    streams: dict[tuple[str, int], Counter[str]] = defaultdict(Counter)
    stream_first: dict[tuple[str, str, int], int] = {}
    for j, r in enumerate(rows):
        if r[7] > 0:
            streams[(base_map[r[2]], r[7])][r[3]] += 1
            stream_first.setdefault((base_map[r[2]], r[3], r[7]), j)
    choice: dict[tuple[str, str, int], LoraSet] = {}
    for (base, k), tenants in sorted(streams.items()):
        cands = candidates(base, k)
        ranked_tenants = sorted(tenants, key=lambda g: (-tenants[g], stream_first[(base, g, k)]))
        if not cands:
            continue
        picks = _cumulative_pick([tenants[g] for g in ranked_tenants], [n for _, n in cands])
        for g, idx in zip(ranked_tenants, picks, strict=True):
            choice[(base, g, k)] = cands[idx][0]

    components: list[Component] = []
    comp_index: dict[str, int] = {}

    def comp(cid: str, kind: str, family: str) -> int:
        idx = comp_index.get(cid)
        if idx is None:
            nbytes = base_bytes(cid, family) if kind == "BASE" else lora_bytes(cid)
            idx = comp_index[cid] = len(components)
            components.append(Component(cid, kind, family, nbytes))
        return idx

    pipelines: list[Pipeline] = []
    pipe_index: dict[str, int] = {}
    tenants_index: dict[str, int] = {}
    n = len(rows)
    pipe_arr = np.empty(n, dtype=np.int32)
    tenant_arr = np.empty(n, dtype=np.int32)
    for j, r in enumerate(rows):
        base = base_map[r[2]]
        loras = choice.get((base, r[3], r[7]), ()) if r[7] > 0 else ()
        key = canonical_key(base, loras)
        pid = pipe_index.get(key)
        if pid is None:
            fam = base_family(base)
            b = comp(base, "BASE", fam)
            lids = tuple(comp(lid, "LORA", fam) for lid, _ in loras)
            pid = pipe_index[key] = len(pipelines)
            pipelines.append(Pipeline(key, b, lids, tuple(s for _, s in loras)))
        pipe_arr[j] = pid
        tenant_arr[j] = tenants_index.setdefault(r[3], len(tenants_index))
    t0 = rows[0][0]
    return Workload(
        name=folder.name,
        components=components,
        pipelines=pipelines,
        arrival_s=np.array([r[0] - t0 for r in rows], dtype=np.float64),
        pipeline=pipe_arr,
        images=np.array([r[5] for r in rows], dtype=np.int16),
        steps=np.array([r[6] for r in rows], dtype=np.int16),
        tenant=tenant_arr,
        task=np.array([r[4] for r in rows], dtype=np.int8),
        start_epoch_s=t0,
        exec_time_s=np.array([r[8] for r in rows], dtype=np.float64),
        notes={"request_bases": len(req_ranked), "data_bases": len(data_bases), "join": "popularity rank"},
    )
