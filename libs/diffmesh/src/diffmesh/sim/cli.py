"""``diffmesh sim``: replay a trace through every compared system and the oracle.

``diffmesh sim --trace DIR --json FILE --plot FILE [--seed N] [--gpus N] [--load X]``
prints the table and the target check, writes the JSON document and the plot.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from diffmesh.sim.calibration import calibrate
from diffmesh.sim.config import ABLATIONS, SYSTEMS, ClusterConfig, PolicySettings
from diffmesh.sim.report import plot, table, targets
from diffmesh.sim.runner import DEFAULT_LOAD, baseline_denoise_share, calibrate_to_baseline, compare, prepare, run_system
from diffmesh.trace.loader import TRACE_ENV, load_trace, trace_folder
from diffmesh.trace.synthetic import synthetic_workload

SWEEP_LOADS = (0.3, 0.45, 0.6, 0.75, 0.9)
SWEEP_SYSTEMS = ("lru", "rayserve", "modelmesh", "diffmesh")


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``sim``."""
    p = subparsers.add_parser("sim", help="replay a trace through the simulator and compare systems")
    p.add_argument("--trace", help=f"trace folder (default: ${TRACE_ENV}; a synthetic workload when neither is set)")
    p.add_argument("--json", type=Path, help="write the results JSON here")
    p.add_argument("--plot", type=Path, help="write the latency CDF + load sweep PNG here")
    p.add_argument("--seed", type=int, default=0, help="seed (bandit sampling, synthetic workload)")
    p.add_argument("--gpus", type=int, default=64, help="GPUs in the cluster, 8 per node (default 64)")
    p.add_argument(
        "--load", type=float, default=DEFAULT_LOAD, help=f"offered load, fraction of compute capacity (default {DEFAULT_LOAD})"
    )
    p.add_argument("--requests", type=int, default=0, help="replay only the first N requests (0: all)")
    p.add_argument("--no-sweep", action="store_true", help="skip the offered-load sweep of the plot")
    p.add_argument(
        "--days",
        default="",
        metavar="A:B",
        help="replay only days [A, B) of the trace, counted from its first arrival (e.g. 8:16 for a held-out half)",
    )
    p.add_argument(
        "--compute-share-of",
        choices=("baseline", "trace"),
        default="baseline",
        help="denoising is 22.5%% of the simulated lru baseline's mean end-to-end time (default) "
        "or of the trace's observed mean end-to-end time",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the comparison, print it, write JSON and plot."""
    began = time.perf_counter()
    folder = trace_folder(args.trace)
    workload = load_trace(folder) if folder else synthetic_workload(seed=args.seed)
    if args.days:
        a, _, b = args.days.partition(":")
        workload = workload.window(float(a or 0) * 86400.0, float(b) * 86400.0 if b else float("inf"))
    if args.requests > 0:
        workload = workload.head(args.requests)
    cal = calibrate(folder, workload)
    cluster = ClusterConfig.for_gpus(args.gpus)
    if args.compute_share_of == "baseline":
        cal = calibrate_to_baseline(workload, cal, cluster, args.load)
    settings = PolicySettings()
    prep = prepare(workload, cal, cluster, args.load)
    result = compare(prep, settings, args.seed)
    result.config = {
        "trace": str(folder) if folder else workload.name,
        "requests": len(workload),
        "seed": args.seed,
        "gpus": cluster.gpus,
        "nodes": cluster.nodes,
        "gpus_per_node": cluster.gpus_per_node,
        "gpu_gb": cluster.gpu_gb,
        "host_gb_per_node": round(cluster.host_bytes(prep.catalog_bytes) / 1e9, 1),
        "ssd_gb_per_node": round(cluster.ssd_bytes(prep.catalog_bytes) / 1e9, 1),
        "catalog_gb": round(prep.catalog_bytes / 1e9, 1),
        "load": args.load,
        "time_compression": round(prep.compression, 3),
        "mean_compute_s": round(prep.mean_compute_s, 3),
        "compute_share_of": args.compute_share_of,
        "metrics": {
            "misses": "fetches from REMOTE (on demand, replica or scale-out warm-up, prefetch); one per node copy made",
            "remote_bytes": "bytes of those REMOTE fetches",
            "peer_fetches": "copies from another node's HOST/SSD over the cluster network (not misses)",
            "peer_bytes": "bytes of those peer copies",
            "ssd_bytes": "bytes read from plus written to node SSDs",
            "queue_mean": "requests waiting to start in the whole cluster, sampled at each arrival",
            "oracle.misses": "Belady-Size over one cache of the pooled SSD capacity of all nodes",
        },
        "lru_denoise_share": round(baseline_denoise_share(prep, settings), 4),
        "calibration": cal.summary(),
        "policy": {k: (v if isinstance(v, int | float) else str(v)) for k, v in vars(settings).items()},
        "requests_per_cpu_s": {
            name: round(len(workload) / r.cpu_s) for name, r in {**result.systems, **result.ablations}.items() if r.cpu_s > 0
        },
    }
    doc = result.to_json()
    systems = doc["systems"]
    assert isinstance(systems, dict)
    rows = {k: v for k, v in systems.items() if k != "ablations"}
    rows.update({f"abl:{k}": v for k, v in systems["ablations"].items()})
    print(
        f"trace: {result.config['trace']}  requests: {len(workload)}  "
        f"GPUs: {cluster.gpus} ({cluster.nodes} nodes)  load: {args.load}"
    )
    print(table(rows, result.oracle_misses))
    print()
    for label, ok, detail in targets(doc):
        print(f"  [{'met' if ok else 'MISSED'}] {label}: {detail}")
    if args.plot:
        sweep: dict[str, list[tuple[float, float, float]]] = {name: [] for name in SWEEP_SYSTEMS}
        if not args.no_sweep:
            for load in SWEEP_LOADS:
                sp = prepare(workload, cal, cluster, load)
                for name in SWEEP_SYSTEMS:
                    lat = run_system(sp, SYSTEMS[name], settings, args.seed).latency_s
                    sweep[name].append((load, float(lat.mean()), float(np.percentile(lat, 99))))
        plot(args.plot, {**result.systems, **{f"abl:{k}": v for k, v in result.ablations.items()}}, sweep)
        print(f"plot: {args.plot}")
    doc["config"]["wall_s_per_system"] = {  # type: ignore[index]
        name: round(r.wall_s, 3) for name, r in {**result.systems, **result.ablations}.items()
    }
    doc["config"]["total_wall_s"] = round(time.perf_counter() - began, 2)  # type: ignore[index]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"json: {args.json}")
    print(f"total wall time: {doc['config']['total_wall_s']} s")  # type: ignore[index]
    return 0


__all__ = ["ABLATIONS", "SYSTEMS", "add_parser", "run"]
