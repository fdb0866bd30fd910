"""``diffmesh trace stats --trace DIR --json FILE``: the workload facts of a trace."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffmesh.trace.loader import TRACE_ENV, load_trace, trace_folder
from diffmesh.trace.stats import workload_stats
from diffmesh.trace.synthetic import synthetic_workload


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``trace`` (with its ``stats`` action)."""
    parser = subparsers.add_parser("trace", help="workload facts of a trace (`diffmesh trace stats`)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    stats = actions.add_parser("stats", help="print gini_base, top5pct_share, top50_pipelines_share, lora_share, requests")
    stats.add_argument("--trace", help=f"trace folder (default: ${TRACE_ENV}; a synthetic workload when neither is set)")
    stats.add_argument("--json", type=Path, help="also write the facts to this JSON file")
    stats.add_argument("--seed", type=int, default=0, help="seed of the synthetic workload")
    stats.set_defaults(func=run_stats)


def run_stats(args: argparse.Namespace) -> int:
    """Compute, print and optionally write the workload facts."""
    folder = trace_folder(args.trace)
    workload = load_trace(folder) if folder else synthetic_workload(seed=args.seed)
    facts = {"trace": str(folder) if folder else workload.name, **workload_stats(workload)}
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(facts, indent=2) + "\n")
    return 0
