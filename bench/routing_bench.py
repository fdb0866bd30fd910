"""Routing-decision benchmark: the router's placement from its view replica at mesh scale.

Usage (see bench/README.md)::

    python bench/routing_bench.py [--nodes 250] [--workers-per-node 4] [--components 10000]
                                  [--decisions 5000] [--seed 1] [--json FILE]

Builds a synthetic view in-process through :class:`diffmesh.view.View`'s apply methods
(the same calls the router's :class:`~diffmesh.view.ViewReplica` makes for each stream
event): a snapshot of the live set (1,000 workers by default), every node's HOST and SSD
copies and every worker's device copies of a 10,000-component catalog (bases and LoRAs,
chosen by a Zipf popularity), every worker's load, and a plan (HOT pipelines with
replicas and fused overlays, WARM pipelines). The router's own
:class:`~diffmesh_router.worker_table.WorkerTable` and
:class:`~diffmesh_router.view_placer.ViewPlacer` sit on it, as in the service.

One decision = building the request's :class:`~diffmesh_router.view_placer.RequestShape`
from catalog sizes, ranking every worker and taking the first candidate. Requests are
random pipelines (a base and 0-3 LoRAs, Zipf over pipelines). Between decisions (not
timed) the router books the request on its worker (in-flight +1, and -1 for one sent
earlier) and one view event arrives (a load report or a residency change), so the arrays
and the per-component caches change the way they do in service. Reports p50/p99 per
policy mode; the target is p99 <= 1 ms.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "libs" / "diffmesh" / "src"))
sys.path.insert(0, str(REPO / "services" / "router" / "src"))

from diffmesh.pipeline_key import canonical_key, fused_id  # noqa: E402
from diffmesh.policy.routing import GB, Bandwidths, activation_bytes  # noqa: E402
from diffmesh.policy_mode import PolicyMode  # noqa: E402
from diffmesh.v1 import common_pb2, plan_pb2  # noqa: E402
from diffmesh.view import View  # noqa: E402
from diffmesh_router.capacity import CapacitySignal  # noqa: E402
from diffmesh_router.learned import LearnedEstimates, megapixel_steps  # noqa: E402
from diffmesh_router.view_placer import RequestShape, ViewPlacer  # noqa: E402
from diffmesh_router.worker_table import WorkerTable  # noqa: E402

TARGET_P99_MS = 1.0
GPU, HOST, SSD = common_pb2.TIER_GPU, common_pb2.TIER_HOST, common_pb2.TIER_SSD


class Catalog:
    """Bases (one in ten) and LoRAs with sizes, and pipelines over them, Zipf-popular."""

    def __init__(self, rng: random.Random, components: int, pipelines: int) -> None:
        n_bases = max(1, components // 10)
        self.bases = [f"base-{i:05d}" for i in range(n_bases)]
        self.loras = [f"lora-{i:05d}" for i in range(components - n_bases)]
        self.bytes = {b: int(rng.uniform(2, 8) * GB) for b in self.bases}
        self.bytes.update({lo: int(rng.uniform(0.05, 0.5) * GB) for lo in self.loras})
        self.ids = self.bases + self.loras
        self.weights = [1.0 / (i + 1) for i in range(len(self.ids))]
        rng.shuffle(self.weights)
        base_w = [1.0 / (i + 1) for i in range(n_bases)]
        self.pipelines: list[tuple[str, tuple[tuple[str, float], ...]]] = []
        for _ in range(pipelines):
            base = rng.choices(self.bases, base_w)[0]
            k = rng.choice((0, 1, 1, 2, 3))
            loras = tuple(sorted((lo, 1.0) for lo in rng.sample(self.loras, k)))
            self.pipelines.append((base, loras))
        self.pipeline_weights = [1.0 / (i + 1) ** 0.9 for i in range(pipelines)]

    def popular(self, rng: random.Random, k: int) -> list[str]:
        return list(dict.fromkeys(rng.choices(self.ids, self.weights, k=k)))


def build_view(args: argparse.Namespace, rng: random.Random, catalog: Catalog) -> tuple[View, list[tuple[str, str]]]:
    """A view with every node, copy, load and the plan, applied event by event."""
    view = View()
    snap = plan_pb2.ViewSnapshot()
    workers: list[tuple[str, str]] = []
    for n in range(args.nodes):
        node = snap.live.nodes.add(node_id=f"node-{n:04d}", instance_manager_address=f"10.0.{n // 250}.{n % 250}:50053")
        for w in range(args.workers_per_node):
            node.workers.add(worker_id=f"gpu-{w}", address=f"10.0.{n // 250}.{n % 250}:{50060 + w}", device_memory_bytes=80 * GB)
            workers.append((node.node_id, f"gpu-{w}"))
    view.apply(plan_pb2.ViewEvent(event_id="1-0", snapshot=snap))
    seq = 1
    for n in range(args.nodes):
        node_id = f"node-{n:04d}"
        change = plan_pb2.ResidencyChange(node_id=node_id, full_snapshot=True)
        for cid in catalog.popular(rng, args.host_copies):
            change.copies.add(component_id=cid, tier=HOST, present=True, bytes=catalog.bytes[cid])
        for cid in catalog.popular(rng, args.ssd_copies):
            change.copies.add(component_id=cid, tier=SSD, present=True, bytes=catalog.bytes[cid])
        seq += 1
        view.apply(plan_pb2.ViewEvent(event_id=f"{seq}-0", residency=change))
    for node_id, worker_id in workers:
        change = plan_pb2.ResidencyChange(node_id=node_id, worker_id=worker_id, full_snapshot=True)
        for cid in catalog.popular(rng, args.gpu_copies):
            change.copies.add(component_id=cid, tier=GPU, present=True, bytes=catalog.bytes[cid])
        seq += 1
        view.apply(plan_pb2.ViewEvent(event_id=f"{seq}-0", residency=change))
        seq += 1
        view.apply(plan_pb2.ViewEvent(event_id=f"{seq}-0", load=random_load(rng, node_id, worker_id)))
    plan = plan_pb2.Plan(version=1, mode=plan_pb2.POLICY_MODE_DIFFMESH)
    for i, (base, loras) in enumerate(catalog.pipelines[: args.hot + args.warm]):
        key = canonical_key(base, loras)
        band = plan_pb2.BAND_HOT if i < args.hot else plan_pb2.BAND_WARM
        plan.pipelines.add(pipeline_key=key, band=band, rate_per_s=1.0 / (i + 1))
        if i < args.hot:
            hot = plan.hot.add(pipeline_key=key, share=0.5 / (i + 1), fused_id=fused_id(base, loras) if loras else "")
            hot.pipeline.base_id = base
            for lo, scale in loras:
                hot.pipeline.loras.add(id=lo, scale=scale)
            for node_id, worker_id in rng.sample(workers, rng.randint(2, 4)):
                hot.replicas.add(node_id=node_id, worker_id=worker_id)
    seq += 1
    view.apply(plan_pb2.ViewEvent(event_id=f"{seq}-0", plan=plan))
    return view, workers


def random_load(rng: random.Random, node_id: str, worker_id: str) -> plan_pb2.WorkerLoad:
    return plan_pb2.WorkerLoad(
        worker=plan_pb2.WorkerRef(node_id=node_id, worker_id=worker_id),
        queue_length=rng.randint(0, 3),
        running=rng.randint(0, 1),
        device_memory_free_bytes=int(rng.uniform(5, 70) * GB),
        device_memory_total_bytes=80 * GB,
        max_queue=4,
        measured_unix=time.time(),
    )


def shape_of(catalog: Catalog, base: str, loras: tuple[tuple[str, float], ...], rng: random.Random) -> RequestShape:
    """The request's shape, as the router builds it from catalog records (sizes) and parameters."""
    ids = (base, *(lo for lo, _ in loras))
    side = rng.choice((512, 768, 1024))
    images = rng.choice((1, 1, 2, 4))
    return RequestShape(
        canonical_key(base, loras),
        ids,
        tuple(catalog.bytes[c] for c in ids),
        activation_bytes(images, side, side, int(0.4 * GB), 512),
        megapixel_steps(30, images, side, side),
    )


def run(args: argparse.Namespace, mode: PolicyMode) -> dict[str, Any]:
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    catalog = Catalog(rng, args.components, args.pipelines)
    view, workers = build_view(args, rng, catalog)
    build_s = time.perf_counter() - t0
    learned = LearnedEstimates(Bandwidths.from_hops(8 * GB, 2.1 * GB, 1 * GB, 0.23 * GB), 0.2)
    table = WorkerTable(view, learned, CapacitySignal())
    placer = ViewPlacer(table, mode)
    # Half the workers have finished requests: measured service times and compute speeds.
    for key in rng.sample(workers, len(workers) // 2):
        learned.service_s[key] = rng.uniform(2.0, 8.0)
        learned.seconds_per_unit[key] = rng.uniform(0.15, 0.3)
        table.learned_changed(key)
    sent: deque[tuple[str, str]] = deque()
    samples: list[int] = []
    seq = 10**9
    for i in range(args.warmup + args.decisions):
        base, loras = rng.choices(catalog.pipelines, catalog.pipeline_weights)[0]
        start = time.perf_counter_ns()
        shape = shape_of(catalog, base, loras, rng)
        target = placer.rank(shape).first()
        took = time.perf_counter_ns() - start
        if i >= args.warmup:
            samples.append(took)
        # The router books the request; one sent earlier ends; one view event arrives.
        table.in_flight_changed(target.key, 1)
        sent.append(target.key)
        if len(sent) > args.in_flight:
            table.in_flight_changed(sent.popleft(), -1)
        seq += 1
        node_id, worker_id = rng.choice(workers)
        if i % 2:
            view.apply(plan_pb2.ViewEvent(event_id=f"{seq}-0", load=random_load(rng, node_id, worker_id)))
        else:
            cid = rng.choice(catalog.ids)
            change = plan_pb2.ResidencyChange(node_id=node_id, worker_id=worker_id)
            change.copies.add(component_id=cid, tier=GPU, present=rng.random() < 0.5, bytes=catalog.bytes[cid])
            view.apply(plan_pb2.ViewEvent(event_id=f"{seq}-0", residency=change))
    us = sorted(s / 1000.0 for s in samples)

    def pct(p: float) -> float:
        return us[min(len(us) - 1, round(p / 100.0 * (len(us) - 1)))]

    return {
        "mode": mode.value,
        "decisions": len(us),
        "p50_us": round(pct(50), 1),
        "p90_us": round(pct(90), 1),
        "p99_us": round(pct(99), 1),
        "max_us": round(us[-1], 1),
        "mean_us": round(statistics.fmean(us), 1),
        "p99_target_met": pct(99) <= TARGET_P99_MS * 1000.0,
        "view": {
            "workers": len(view.workers),
            "nodes": len(view.nodes),
            "components_with_copies": view.components(),
            "copies": sum(len(view.copies(c)) for c in catalog.ids),
            "hot_pipelines": len(view.plan.hot),
            "build_s": round(build_s, 2),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=250)
    parser.add_argument("--workers-per-node", type=int, default=4)
    parser.add_argument("--components", type=int, default=10_000)
    parser.add_argument("--pipelines", type=int, default=20_000, help="distinct pipelines requests are drawn from")
    parser.add_argument("--host-copies", type=int, default=150, help="HOST copies drawn per node (Zipf; duplicates merge)")
    parser.add_argument("--ssd-copies", type=int, default=500, help="SSD copies drawn per node (Zipf; duplicates merge)")
    parser.add_argument("--gpu-copies", type=int, default=6, help="device copies drawn per worker")
    parser.add_argument("--hot", type=int, default=50, help="HOT pipelines in the plan (2-4 replicas each)")
    parser.add_argument("--warm", type=int, default=250, help="WARM pipelines in the plan")
    parser.add_argument("--in-flight", type=int, default=2000, help="requests the router keeps in flight")
    parser.add_argument("--decisions", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mode", choices=["diffmesh", "lru", "all"], default="all")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    modes = list(PolicyMode) if args.mode == "all" else [PolicyMode(args.mode)]
    results = [run(args, mode) for mode in modes]
    v = results[0]["view"]
    print(
        f"view: {v['workers']} workers on {v['nodes']} nodes, {v['components_with_copies']} components with copies "
        f"({v['copies']} copies), {v['hot_pipelines']} HOT pipelines; built in {v['build_s']} s through View.apply"
    )
    header = "".join(f"{h:>10}" for h in ("decisions", "p50 us", "p90 us", "p99 us", "max us", "mean us"))
    print(f"{'mode':<10}{header}  target p99 <= 1 ms")
    for r in results:
        met = "met" if r["p99_target_met"] else "NOT met"
        print(
            f"{r['mode']:<10}{r['decisions']:>10}{r['p50_us']:>10}{r['p90_us']:>10}{r['p99_us']:>10}{r['max_us']:>10}"
            f"{r['mean_us']:>10}  {met}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "results": {r["mode"]: r for r in results},
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "python": platform.python_version(),
            "machine": platform.machine(),
            "target_p99_ms": TARGET_P99_MS,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
