"""One replay: the stream, the models, the REMOTE store, calibration, then one fresh mesh per policy."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from diffmesh.launcher.mesh import LocalMesh, MeshConfig, stderr_progress
from diffmesh.launcher.processes import ServiceFailed
from diffmesh.replay import calibration, counters, mapping, models, stream, summary, time_constants
from diffmesh.replay.driver import DEFAULT_MAX_IN_FLIGHT, Outcome, Sender
from diffmesh.replay.progress import ProgressBar
from diffmesh.replay.remote_store import RemoteStore
from diffmesh.trace.model import Workload

Progress = Callable[[str], None]
POLICIES = ("lru", "diffmesh")
"""Run order of ``--policy all``: the baseline first."""


@dataclass
class ReplayOptions:
    """Everything ``diffmesh replay`` takes (the CLI's flags)."""

    workload: Workload
    source: str
    policies: Sequence[str] = POLICIES
    requests: int = 400
    load: float = 0.7
    seed: int = 0
    out: Path = Path("out/replay")
    models: Path = Path(".diffmesh/replay-models")
    nodes: int = 2
    workers_per_node: int = 1
    node_prefix: str = "node"
    max_bases: int = mapping.DEFAULT_MAX_BASES
    max_loras: int = mapping.DEFAULT_MAX_LORAS
    remote_ratio: float = 3.0
    remote_rate: float | None = None
    """REMOTE cap in bytes/s; None: from the calibration (``remote_ratio``)."""
    lora_ratio: float = 5.0
    base_width: int = 32
    plan_seconds: float = 1.0
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_queue: int = 2
    """Every worker's ``MAX_QUEUE``: small, so bursts fill queues and the router spills."""
    device: str = "auto"
    env: dict[str, str] = field(default_factory=dict)
    stream_settings: stream.StreamSettings = field(default_factory=stream.StreamSettings)
    progress: Progress = stderr_progress


class Replay:
    """Prepares the stream and the models, runs every policy, returns the JSON document."""

    def __init__(self, options: ReplayOptions) -> None:
        self.o = options
        self.say = options.progress
        self.out = options.out.resolve()
        self.time_env: dict[str, str] = {}
        """The traffic time constants, compressed (set by the calibration; the calibration mesh runs without)."""

    # -- preparation ---------------------------------------------------------------------
    def prepare(self) -> None:
        """Catalog mapping, uncompressed stream, model files."""
        o = self.o
        self.cmap = mapping.map_catalog(o.workload, o.requests, o.max_bases, o.max_loras)
        settings = o.stream_settings
        raw = stream.build_requests(o.workload, self.cmap, o.requests, settings)
        # --seed moves every image seed; the stream itself is the trace's.
        self.requests = [replace(r, seed=o.seed * 100_000 + r.seed) for r in raw]
        self.say(
            f"stream: {len(self.requests)} requests from {o.source}; {len(self.cmap.base_ids)} demo bases for "
            f"{self.cmap.trace_bases} trace bases, {len(self.cmap.lora_ids)} demo LoRAs for {self.cmap.trace_loras}"
        )
        self.model_set = models.write_model_set(
            o.models, self.cmap.base_ids, self.cmap.lora_ids, width=o.base_width, lora_ratio=o.lora_ratio, progress=self.say
        )
        self.max_loras = max((len(r.loras) for r in self.requests), default=0)
        self.sizes = calibration.tier_sizes(
            base_bytes=self.model_set.base_bytes,
            lora_bytes=self.model_set.lora_bytes,
            catalog_bytes=self.model_set.catalog_bytes,
            max_loras=self.max_loras,
            workers_per_node=o.workers_per_node,
        )

    def _mesh_config(self, policy: str, run_dir: Path, store: RemoteStore, catalog: Path) -> MeshConfig:
        o = self.o
        return MeshConfig(
            run_dir=run_dir,
            models_dir=self.model_set.root,
            workers=o.workers_per_node,
            nodes=o.nodes,
            node_prefix=o.node_prefix,
            device=o.device,
            host_pool_bytes=self.sizes.host_bytes,
            ssd_capacity_bytes=self.sizes.ssd_bytes,
            worker_cache_bytes=self.sizes.worker_cache_bytes,
            catalog=catalog,
            allowed_roots=[store.url + "/"],
            redis_url="",
            otlp_endpoint="",
            collect_spans=False,
            env={**self.time_env, **o.env, "DIFFMESH_POLICY": policy},
            service_env={
                "worker": {"DIFFMESH_WORKER_TORCH_THREADS": "1", "DIFFMESH_WORKER_MAX_QUEUE": str(o.max_queue)},
                "coordinator": {"DIFFMESH_COORDINATOR_PLAN_SECONDS": f"{o.plan_seconds:g}"},
            },
            progress=self.say,
        )

    # -- calibration ---------------------------------------------------------------------
    def calibrate(self, store: RemoteStore, catalog: Path) -> dict[str, Any]:
        """Measures on a fresh mesh, then sets the REMOTE cap and compresses the stream."""
        o = self.o
        run_dir = self.out / "calibration"
        shutil.rmtree(run_dir, ignore_errors=True)
        store.set_rate(None)
        self.say("calibration: starting a mesh (DIFFMESH_POLICY=lru, REMOTE uncapped)")
        with LocalMesh(self._mesh_config("lru", run_dir, store, catalog)) as mesh:
            workers = [mesh.worker_addresses()[w] for w in sorted(mesh.worker_addresses(), key=_worker_order)]
            measured = calibration.measure(workers, self.cmap.base_ids[0], self.requests, o.stream_settings.size, self.say)
        mean_compute = stream.mean_compute(self.requests, measured.model)
        rate = o.remote_rate or calibration.remote_rate_for(self.model_set.base_bytes, mean_compute, o.remote_ratio)
        trace_s = np.array([r.trace_s for r in self.requests])
        factor = stream.compression_for_load(trace_s, mean_compute, measured.work_per_s, o.load)
        self.stream = stream.compress(self.requests, factor)
        constants = time_constants.compress(factor, o.env)
        self.time_env = constants.env
        store.set_rate(rate)
        capacity = measured.work_per_s / mean_compute
        cal = {
            "compute_model": measured.model.to_json(),
            "samples": [{"steps": s, "images": i, "denoise_s": round(t, 6)} for s, i, t in measured.samples],
            "mean_compute_s": mean_compute,
            "burst_requests": measured.burst_requests,
            "burst_wall_s": measured.burst_wall_s,
            "work_per_s": measured.work_per_s,
            "capacity_rps": capacity,
            "load": o.load,
            "offered_rps_typical": o.load * capacity,
            "compression": factor,
            "time_constants": constants.rows,
            "remote_rate_bytes_per_s": rate,
            "remote_rate_source": "--remote-mbps" if o.remote_rate else f"base REMOTE = {o.remote_ratio:g} x mean compute",
            "base_remote_s": self.model_set.base_bytes / rate,
            "lora_remote_s": self.model_set.lora_bytes / rate if self.model_set.lora_bytes else None,
            "base_remote_over_compute": self.model_set.base_bytes / rate / mean_compute,
            "base_over_lora_bytes": self.model_set.base_bytes / self.model_set.lora_bytes if self.model_set.lora_bytes else None,
            **self.sizes.to_json(),
            "host_fraction_of_catalog": self.sizes.host_bytes / self.model_set.catalog_bytes,
            "ssd_fraction_of_catalog": self.sizes.ssd_bytes / self.model_set.catalog_bytes,
            "wall_s": measured.wall_s,
        }
        self.say(
            f"calibration: mean warm compute {mean_compute:.3f} s, {measured.work_per_s:.2f} work-s/s -> capacity "
            f"{capacity:.2f} req/s; REMOTE cap {rate / 1e6:.2f} MB/s (a base alone {cal['base_remote_s']:.2f} s = "
            f"{cal['base_remote_over_compute']:.1f}x compute); time compression {factor:.1f}x; stream spans "
            f"{self.stream[-1].arrival_s:.0f} s"
        )
        self.say(f"calibration: {constants.describe()}")
        return cal

    # -- one policy ----------------------------------------------------------------------
    def run_policy(self, policy: str, store: RemoteStore, catalog: Path) -> dict[str, Any]:
        """The stream on a fresh mesh running ``policy``; the system's summary."""
        o = self.o
        run_dir = self.out / policy
        shutil.rmtree(run_dir, ignore_errors=True)  # fresh SSD folders and logs
        before = store.counters()
        mesh = LocalMesh(self._mesh_config(policy, run_dir, store, catalog))
        outcomes: list[Outcome] = []
        wall = 0.0
        mesh_counters = counters.MeshCounters()
        problems: list[str] = []
        try:
            mesh.start()
            watcher = counters.PlanWatcher(mesh.coordinator_address).start()
            bar = ProgressBar(policy, len(self.stream))
            sender = Sender(mesh.router_address, o.max_in_flight, on_done=lambda out: bar.advance(out.ok, sender.in_flight))
            try:
                outcomes, wall = sender.run(self.stream)
            finally:
                bar.close()
                seen = watcher.stop()
            mesh_counters = counters.collect(
                mesh.instance_manager_addresses(), mesh.router_address, mesh.coordinator_address, seen
            )
        finally:
            problems = mesh.stop()
        delta = store.counters().minus(before)
        ssd_misses = mesh_counters.ssd_misses()
        peer_fetches = mesh_counters.im_sum("peer_fetches")
        misses = None if ssd_misses is None else ssd_misses - (peer_fetches or 0)
        system = summary.summarize(
            outcomes,
            wall,
            o.nodes * o.workers_per_node,
            remote_bytes=delta.body_bytes,
            peer_bytes=mesh_counters.im_sum("peer_bytes"),
            misses=misses,
        )
        system["policy_plane"] = policy_plane(mesh_counters, outcomes)
        system["router"] = _router_extras(mesh_counters)
        system["plan"] = _plan_extras(mesh_counters)
        system["im_remote_bytes"] = mesh_counters.im_sum("remote_bytes")
        system["ssd_misses"] = ssd_misses
        system["store"] = {"file_gets": delta.gets, "heads": delta.heads}
        system["counter_notes"] = mesh_counters.notes
        system["mesh_problems"] = problems
        system["latencies_s"] = [round(x.latency_s, 6) for x in outcomes if x.ok]
        return system

    # -- all -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Every step; returns the JSON document."""
        started = time.monotonic()
        self.prepare()
        self.out.mkdir(parents=True, exist_ok=True)
        systems: dict[str, dict[str, Any]] = {}
        with RemoteStore(self.model_set.root) as store:
            catalog = self.out / "catalog.json"
            per_model = dict(Counter(r.base_id for r in self.requests)) | dict(
                Counter(lid for r in self.requests for lid, _ in r.loras)
            )
            catalog.write_text(json.dumps(self.model_set.catalog(store.url, per_model), indent=2) + "\n")
            self.say(f"REMOTE store: {store.url} over {self.model_set.root}")
            cal = self.calibrate(store, catalog)
            for policy in self.o.policies:
                self.say(f"{policy}: starting a fresh mesh (DIFFMESH_POLICY={policy})")
                try:
                    systems[policy] = self.run_policy(policy, store, catalog)
                except (ServiceFailed, TimeoutError, OSError, RuntimeError) as err:
                    self.say(f"{policy}: FAILED: {err}")
                    systems[policy] = {"error": str(err)}
                    continue
                s = systems[policy]
                self.say(
                    f"{policy}: {s['requests'] - s['failed']}/{s['requests']} ok, mean {_fmt(s['latency_mean_s'])} s, "
                    f"p99 {_fmt(s['latency_p99_s'])} s"
                )
        return {
            "systems": systems,
            "comparison": {"diffmesh_vs_lru": summary.compare(systems)},
            "calibration": cal,
            "stream": self._stream_json(),
            "catalog": self._catalog_json(),
            "mesh": {
                "nodes": self.o.nodes,
                "workers_per_node": self.o.workers_per_node,
                "worker_torch_threads": 1,
                "plan_seconds": self.o.plan_seconds,
                "device": self.o.device,
                "max_in_flight": self.o.max_in_flight,
                "worker_max_queue": self.o.max_queue,
                "env": dict(self.o.env),
            },
            "wall_s": time.monotonic() - started,
        }

    def _stream_json(self) -> dict[str, Any]:
        reqs = self.stream
        settings = self.o.stream_settings
        return {
            "source": self.o.source,
            "requests": len(reqs),
            "trace_span_s": reqs[-1].trace_s if reqs else 0.0,
            "wall_span_s": reqs[-1].arrival_s if reqs else 0.0,
            "tasks": dict(Counter(r.task for r in reqs)),
            "images": dict(sorted(Counter(r.images for r in reqs).items())),
            "trace_images": dict(sorted(Counter(r.trace_images for r in reqs).items())),
            "steps": dict(sorted(Counter(r.steps for r in reqs).items())),
            "lora_requests": sum(1 for r in reqs if r.loras),
            "pipelines": len({r.pipeline for r in reqs}),
            "settings": {
                "steps_divisor": settings.steps_divisor,
                "min_steps": settings.min_steps,
                "max_images": settings.max_images,
                "size": settings.size,
                "max_gap_s": settings.max_gap_s,
            },
            "seed": self.o.seed,
        }

    def _catalog_json(self) -> dict[str, Any]:
        ms = self.model_set
        return {
            "bases": len(ms.bases),
            "loras": len(ms.loras),
            "trace_bases": self.cmap.trace_bases,
            "trace_loras": self.cmap.trace_loras,
            "requests_per_base": self.cmap.requests_per_base,
            "requests_per_lora": self.cmap.requests_per_lora,
            "base_bytes": ms.base_bytes,
            "lora_bytes": ms.lora_bytes,
            "lora_rank": ms.lora_rank,
            "unet_width": ms.width,
            "catalog_bytes": ms.catalog_bytes,
            "models": str(ms.root),
        }


def _worker_order(worker_id: str) -> tuple[int, str]:
    tail = worker_id.rpartition("-")[2]
    return (int(tail), worker_id) if tail.isdigit() else (1 << 30, worker_id)


def _fmt(value: float | None) -> str:
    return "null" if value is None else f"{value:.2f}"


def policy_plane(mc: counters.MeshCounters, outcomes: Sequence[Outcome]) -> dict[str, int | None]:
    """The issue's policy-plane counters from the services' own numbers (None: not readable)."""
    plan_read = mc.plan.replies > 0
    router = mc.router
    return {
        "plan_versions": mc.plan.latest_version if plan_read else None,
        "hot_pipelines": mc.plan.max_hot if plan_read else None,
        "pins": mc.im_sum("pinned_components"),
        "fused_overlays": mc.im_sum("fusions_done"),
        "prefetches": mc.im_sum("prefetches_started"),
        "prefetch_hits": mc.im_sum("prefetch_hits"),
        "admissions_refused": mc.im_sum("admissions_refused"),
        "peer_fetches": mc.im_sum("peer_fetches"),
        "spills": int(router.spills) if router is not None else None,
        "locate_calls": int(router.locate_calls) if router is not None else None,
        "view_updates": int(router.view_updates) if router is not None else None,
        "workers_used": len({(o.node_id, o.worker_id) for o in outcomes if o.ok}),
    }


def _router_extras(mc: counters.MeshCounters) -> dict[str, Any] | None:
    r = mc.router
    if r is None:
        return None
    names = (
        "policy", "requests", "view_decisions", "fallback_decisions", "list_nodes_calls", "view_snapshots",
        "view_connected", "plan_version", "full_waits", "resource_exhausted", "fused_rewrites", "hot_requests",
        "warm_requests", "cold_requests", "unavailable_retries",
    )
    return {name: getattr(r, name) for name in names}


def _plan_extras(mc: counters.MeshCounters) -> dict[str, Any]:
    p = mc.plan
    return {
        "get_plan_replies": p.replies,
        "versions_seen": p.versions,
        "max_plan_pins": p.max_plan_pins,
        "max_plan_prefetches": p.max_plan_prefetches,
        "hot_keys": sorted(p.hot_keys),
        "fused_registered": mc.fused_registered,
    }
