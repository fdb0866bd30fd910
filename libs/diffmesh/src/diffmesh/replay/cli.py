"""``diffmesh replay``: the trace's first N requests through a local mesh, once per policy, compared.

Starts its own mesh per policy (private Redis, coordinator, 2 nodes x 1 worker, router,
a loopback REMOTE store with a bandwidth cap), after a calibration mesh that measures a
warm request on this machine. Prints a table, writes the JSON (and a latency-CDF PNG
with --plot). Exit status 0 when every policy ran with no failed request and every mesh
stopped cleanly; 1 otherwise; 2 for bad arguments; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from diffmesh.launcher.mesh import stderr_progress
from diffmesh.settings import NODE_ID_PATTERN

say = stderr_progress


def add_parser(subparsers: Any) -> None:
    """Registers ``diffmesh replay``."""
    from diffmesh.replay.mapping import DEFAULT_MAX_BASES, DEFAULT_MAX_LORAS

    p = subparsers.add_parser(
        "replay",
        help="replay a trace through a local mesh per policy and compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--trace", type=Path, default=None, help="trace folder (alibaba-genai-2026 layout); default $DIFFMESH_TRACE")
    p.add_argument("--synthetic", action="store_true", help="without a trace: a synthetic Zipf stream (diffmesh.trace.synthetic)")
    p.add_argument("--json", type=Path, required=True, help="where to write the results (JSON)")
    p.add_argument("--plot", type=Path, default=None, help="PNG of the latency CDFs (needs matplotlib)")
    p.add_argument("--policy", choices=["diffmesh", "lru", "all"], default="all",
                   help="policy to run (default all: lru, then diffmesh)")
    p.add_argument("--requests", type=int, default=400, help="first N requests of the trace (default 400)")
    p.add_argument("--load", type=float, default=0.7, help="offered load as a fraction of the calibrated capacity (default 0.7)")
    p.add_argument("--seed", type=int, default=0, help="image seeds (and the synthetic stream's generator); default 0")
    p.add_argument("--out", type=Path, default=Path("out/replay"), help="run folders and service logs (default out/replay)")
    p.add_argument("--models", type=Path, default=Path(".diffmesh/replay-models"),
                   help="where the replay's models are written and reused (default .diffmesh/replay-models)")
    p.add_argument("--remote-mbps", type=float, default=None,
                   help="REMOTE bandwidth cap in megabits per second (all fetches together); default: from the calibration")
    p.add_argument("--remote-ratio", type=float, default=3.0,
                   help="without --remote-mbps: a base's REMOTE load = this x a mean warm request's compute (default 3)")
    p.add_argument("--max-bases", type=int, default=DEFAULT_MAX_BASES, help=f"demo bases at most (default {DEFAULT_MAX_BASES})")
    p.add_argument("--max-loras", type=int, default=DEFAULT_MAX_LORAS, help=f"demo LoRAs at most (default {DEFAULT_MAX_LORAS})")
    p.add_argument("--nodes", type=int, default=2, help="nodes (default 2)")
    p.add_argument("--workers", type=int, default=1,
                   help="workers per node (default 1: one single-threaded worker per core of a 2-core machine)")
    p.add_argument("--node-prefix", default="node",
                   help="node ids are <prefix>-1 … (default node); an instance manager owns its node id on the host")
    p.add_argument("--plan-seconds", type=float, default=1.0,
                   help="coordinator plan period (default 1 s: the run is time-compressed)")
    p.add_argument("--max-in-flight", type=int, default=48, help="client requests in flight at most (default 48)")
    p.add_argument("--max-queue", type=int, default=2,
                   help="every worker's MAX_QUEUE, both policies (default 2: bursts fill queues and the router spills)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="worker device (default auto)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for every service (repeatable), e.g. DIFFMESH_COORDINATOR_HALF_LIFE_SECONDS=60 "
                   "(keeps that value instead of the compressed default)")
    p.set_defaults(func=run)


class _Interrupted(Exception):
    pass


def _on_signal(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Interrupted(signal.Signals(signum).name)


def _parse_env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env expects KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    """Runs the replay; returns the exit status."""
    from diffmesh.trace.loader import load_trace, trace_folder

    if args.requests < 1 or args.load <= 0 or args.nodes < 1 or args.workers < 1 or args.max_queue < 0:
        say("--requests, --nodes and --workers must be at least 1, --load positive and --max-queue not negative")
        return 2
    cores = os.cpu_count() or 1
    if args.nodes * args.workers > cores:
        say(
            f"warning: {args.nodes * args.workers} single-threaded workers on {cores} cores share them: a worker that"
            " loads lends its compute to the others, which a GPU cannot, so the cost of loading is understated"
        )
    if not re.fullmatch(NODE_ID_PATTERN, f"{args.node_prefix}-{args.nodes}"):
        say(f"--node-prefix {args.node_prefix!r}: node ids must match {NODE_ID_PATTERN}")
        return 2
    try:
        env = _parse_env(args.env)
    except ValueError as err:
        say(str(err))
        return 2
    folder = trace_folder(args.trace)
    if folder is not None and folder.is_dir():
        workload = load_trace(folder)
        source = str(folder)
    elif args.synthetic:
        from diffmesh.trace.synthetic import synthetic_workload

        workload = synthetic_workload(n_requests=max(args.requests, 1000), seed=args.seed)
        source = workload.name
    else:
        where = f"{folder} does not exist" if folder is not None else "no --trace given and DIFFMESH_TRACE is unset"
        say(f"no trace: {where}. Pass --trace DIR (e.g. ../shared/traces/alibaba-genai-2026) or --synthetic.")
        return 2

    import grpc

    from diffmesh.launcher.processes import ServiceFailed
    from diffmesh.replay import summary
    from diffmesh.replay.runner import POLICIES, Replay, ReplayOptions

    options = ReplayOptions(
        workload=workload,
        source=source,
        policies=POLICIES if args.policy == "all" else (args.policy,),
        requests=args.requests,
        load=args.load,
        seed=args.seed,
        out=args.out,
        models=args.models,
        nodes=args.nodes,
        workers_per_node=args.workers,
        node_prefix=args.node_prefix,
        max_bases=args.max_bases,
        max_loras=args.max_loras,
        remote_ratio=args.remote_ratio,
        remote_rate=args.remote_mbps * 1e6 / 8 if args.remote_mbps else None,
        plan_seconds=args.plan_seconds,
        max_in_flight=args.max_in_flight,
        max_queue=args.max_queue,
        device=args.device,
        env=env,
    )
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    try:
        document = Replay(options).run()
    except _Interrupted as sig:
        say(f"interrupted ({sig}): every mesh was stopped")
        return 130
    except (ServiceFailed, TimeoutError, OSError, RuntimeError, ValueError, grpc.RpcError) as err:
        say(f"FAILED: {err}")  # the preparation or the calibration; its mesh was stopped
        return 1
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    systems = document["systems"]
    ran = {name: s for name, s in systems.items() if "error" not in s}
    print(summary.render(ran, document["comparison"]["diffmesh_vs_lru"]), flush=True)
    print(f"\nJSON: {args.json}", flush=True)
    if args.plot is not None:
        from diffmesh.replay.plot import plot_cdfs

        if plot_cdfs({name: s["latencies_s"] for name, s in ran.items()}, args.plot, f"diffmesh replay: {source}"):
            print(f"plot: {args.plot}", flush=True)
        else:
            say("--plot skipped: matplotlib is not installed (pip install 'diffmesh[sim]')")
    status = 0
    for name, s in systems.items():
        if "error" in s:
            say(f"FAILED: {name}: {s['error']}")
            status = 1
        elif s["failed"] or s["mesh_problems"]:
            say(f"FAILED: {name}: {s['failed']} failed requests; mesh problems: {s['mesh_problems'] or 'none'}")
            status = 1
    return status
