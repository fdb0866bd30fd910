"""The discrete-event simulator.

Events are request arrivals (from the workload, time-compressed), service completions
(a heap) and, for diffmesh, periodic plan ticks. Each worker owns one GPU and serves its
FIFO queue one request at a time: it loads what the pipeline misses on the GPU from the
best tier of its node (HOST, else SSD, else -- with a global view -- a PEER node's copy,
else REMOTE; copies from PEER or REMOTE also fill the node's SSD and HOST), makes room
for the activations, then denoises. Node tiers and GPUs are
:class:`~diffmesh.policy.eviction.BoundedCache` objects driven by the eviction,
admission, popularity, replica, fusion-planning, prefetch and routing policies of
:mod:`diffmesh.policy` (which of them the running services call too is listed there).

Per event the work is bounded by the pipeline's components and a few workers: ECT
routing is an exact branch-and-bound over the workers (see :meth:`Simulator._route_ect`)
on per-node load costs that are cached and refreshed only where a copy changed, so a
run costs about O(requests x (holders of the base + components)) plus eviction scans.
"""

from __future__ import annotations

import gc
import heapq
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from diffmesh.policy.admission import ColdAdmission
from diffmesh.policy.eviction import BoundedCache, EvictionPolicy, LRUEviction, UtilityEviction
from diffmesh.policy.fusion_plan import overlay_bytes, plan_fusion
from diffmesh.policy.planner import PipelineDemand, PlannerSettings, PlanWorker, plan_hot
from diffmesh.policy.popularity import Band, DecayedCounter, assign_bands
from diffmesh.policy.prefetch import BanditPrefetcher, time_bucket
from diffmesh.policy.routing import adapters_load_s, choose_worker, pipeline_load_s
from diffmesh.sim.calibration import Calibration, compute_s, jitter_factor
from diffmesh.sim.config import GB, ClusterConfig, PolicySettings, SystemSpec
from diffmesh.trace.model import Workload
from diffmesh.trace.sizes import FAMILIES

UNFUSED_LORA_OVERHEAD = 0.10
"""Extra denoising time per unfused LoRA (the adapter's low-rank matmuls run every step)."""
OVERLAY_INIT_S = 0.1
INF = math.inf


@dataclass
class SimResult:
    """Per-request outcomes and totals of one simulated system."""

    name: str
    latency_s: np.ndarray
    queue_wait_s: np.ndarray
    queue_len: np.ndarray
    misses: int
    """Fetches from REMOTE (on demand, for a replica warm-up or by prefetch): one per (node, component) copy made."""
    remote_bytes: int
    """Bytes of those fetches."""
    ssd_bytes: int
    gpu_loads: int
    busy_s: float
    span_s: float
    gpus: int
    wall_s: float
    busy_start: np.ndarray
    busy_end: np.ndarray
    arrival_s: np.ndarray
    window_s: float
    """Busy fractions are averaged over windows of this many simulated seconds (one trace hour)."""
    cpu_s: float = 0.0
    peer_fetches: int = 0
    """Copies made from another node's HOST/SSD over the cluster network (not REMOTE: not misses)."""
    peer_bytes: int = 0
    steals: int = 0

    def busy_fraction(self) -> float:
        """GPU busy fraction (loading or denoising) per window, averaged with each window weighted by its arrivals.

        Weighting by arrivals keeps the idle nights and empty days of a diurnal trace from
        diluting the figure: it is the utilisation a typical request meets.
        """
        return weighted_busy_fraction(self.busy_start, self.busy_end, self.arrival_s, self.window_s, self.gpus)

    def summary(self) -> dict[str, float | int]:
        """The per-system JSON object of ``diffmesh sim``."""
        lat = self.latency_s
        q = self.queue_len
        return {
            "requests": int(lat.size),
            "latency_mean_s": round(float(lat.mean()), 4),
            "latency_p50_s": round(float(np.percentile(lat, 50)), 4),
            "latency_p95_s": round(float(np.percentile(lat, 95)), 4),
            "latency_p99_s": round(float(np.percentile(lat, 99)), 4),
            "queue_mean": round(float(q.mean()), 4),
            "queue_p99": round(float(np.percentile(q, 99)), 4),
            "misses": int(self.misses),
            "remote_bytes": int(self.remote_bytes),
            "ssd_bytes": int(self.ssd_bytes),
            "peer_fetches": int(self.peer_fetches),
            "peer_bytes": int(self.peer_bytes),
            "gpu_busy": round(self.busy_fraction(), 4),
            "wall_s": round(self.wall_s, 4),
        }


def weighted_busy_fraction(starts: np.ndarray, ends: np.ndarray, arrivals: np.ndarray, window_s: float, gpus: int) -> float:
    """Arrival-weighted mean over windows of (busy GPU-seconds in the window) / (GPUs x window)."""
    if arrivals.size == 0 or starts.size == 0 or window_s <= 0:
        return 0.0
    s = np.sort(starts)
    e = np.sort(ends)
    cs = np.concatenate([[0.0], np.cumsum(s)])
    ce = np.concatenate([[0.0], np.cumsum(e)])
    t0 = float(arrivals.min())
    n_win = int((max(float(e[-1]), float(arrivals.max())) - t0) // window_s) + 2
    edges = t0 + window_s * np.arange(n_win + 1)
    k = np.searchsorted(s, edges)
    m = np.searchsorted(e, edges)
    busy_upto = (k * edges - cs[k]) - (m * edges - ce[m])
    per_window = np.diff(busy_upto) / (gpus * window_s)
    idx = ((arrivals - t0) // window_s).astype(np.int64)
    return float(per_window[idx].mean())


class PreparedWorkload:
    """Everything about a workload that does not depend on the system: costs, sizes, compute."""

    def __init__(self, workload: Workload, cal: Calibration, cluster: ClusterConfig, compression: float) -> None:
        self.workload = workload
        self.cal = cal
        self.cluster = cluster
        self.compression = compression
        comps = workload.components
        n_c = len(comps)
        self.catalog_bytes = sum(c.nbytes for c in comps)
        kinds = [c.kind for c in comps]
        nbytes = [c.nbytes for c in comps]
        median_bytes = {}
        for kind in {"BASE", "LORA", "CONTROLNET"}:
            sizes = [b for b, k in zip(nbytes, kinds, strict=True) if k == kind]
            median_bytes[kind] = float(np.median(sizes)) if sizes else 1.0
        init = [cal.init_s[k] for k in kinds]
        xfer = [(cal.median_s[k] - cal.init_s[k]) * b / median_bytes[k] for k, b in zip(kinds, nbytes, strict=True)]
        # Overlays (fused pipelines) get component indices after the catalog.
        self.overlay_of: dict[int, int] = {}
        self.overlay_pipe: dict[int, int] = {}
        for p, pipe in enumerate(workload.pipelines):
            if pipe.loras:
                o = n_c + len(self.overlay_of)
                self.overlay_of[p] = o
                self.overlay_pipe[o] = p
                base = pipe.base
                kinds.append("FUSED")
                nbytes.append(overlay_bytes(nbytes[base]))
                init.append(OVERLAY_INIT_S)
                xfer.append(xfer[base] * nbytes[-1] / max(1, nbytes[base]))
        self.kind = kinds
        self.nbytes = nbytes
        self.remote_cost = [i + x for i, x in zip(init, xfer, strict=True)]
        self.ssd_cost = [i + x / cal.ssd_speedup for i, x in zip(init, xfer, strict=True)]
        self.host_cost = [i + x / cal.host_speedup for i, x in zip(init, xfer, strict=True)]
        self.peer_cost = [i + x / cal.peer_speedup for i, x in zip(init, xfer, strict=True)]
        self.overlays_of_lora: dict[int, list[int]] = {}
        """The fused overlays built from each LoRA (their build cost depends on it)."""
        for o, pipe_i in self.overlay_pipe.items():
            for lo in workload.pipelines[pipe_i].loras:
                self.overlays_of_lora.setdefault(lo, []).append(o)
        self.n_components = n_c

        pipes = workload.pipelines
        self.base = [p.base for p in pipes]
        self.others = [p.loras + p.controlnets for p in pipes]
        self.loras = [p.loras for p in pipes]
        self.family = [comps[p.base].family for p in pipes]
        self.comps = [(p.base, *p.loras, *p.controlnets) for p in pipes]
        self.fused_comps = [
            ((p.base, self.overlay_of[j], *p.controlnets) if j in self.overlay_of else None) for j, p in enumerate(pipes)
        ]
        self.weights = [sum(nbytes[c] for c in cs) for cs in self.comps]
        self.fused_weights = [(sum(nbytes[c] for c in fc) if fc else 0) for fc in self.fused_comps]
        self.keys = [p.key for p in pipes]

        pid = workload.pipeline
        self.req_pipe = pid.tolist()
        self.arrival = (workload.arrival_s / compression).tolist()
        self.trace_time = (workload.arrival_s + workload.start_epoch_s).tolist()
        gpu_bytes = int(cluster.gpu_gb * GB)
        self.gpu_bytes = gpu_bytes
        comp_s = []
        act = []
        for i in range(len(workload)):
            p = self.req_pipe[i]
            fam = FAMILIES[self.family[p]]
            imgs = int(workload.images[i])
            comp_s.append(compute_s(cal, int(workload.steps[i]), imgs, fam.name))
            a = int(fam.activation_gb_per_image * GB * imgs)
            # A batch that cannot fit beside the weights on an empty GPU runs in sub-batches.
            act.append(max(0, min(a, gpu_bytes - self.weights[p])))
        self.compute = comp_s
        self.act = act

    @property
    def mean_compute_s(self) -> float:
        """Mean denoising seconds per request."""
        return float(np.mean(self.compute)) if self.compute else 0.0


class _GpuModel:
    """UtilityModel of one worker's GPU copies (lookups bound once: the scan calls them per copy)."""

    def __init__(self, sim: Simulator, w: int) -> None:
        self.sim = sim
        self.w = w
        self.rate = sim.comp_pop.rate
        self.reload_cost_s = sim.ncost[w // sim.gpn].__getitem__
        self.kind = sim.prep.kind.__getitem__

    def pinned(self, key: int) -> bool:
        return key in self.sim.pinned[self.w]


class _HostModel:
    def __init__(self, sim: Simulator, n: int) -> None:
        self.sim = sim
        self.n = n
        self.rate = sim.comp_pop.rate
        self.kind = sim.prep.kind.__getitem__

    def reload_cost_s(self, key: int) -> float:
        sim = self.sim
        p = sim.prep
        if key in sim.ssd[self.n].sizes:
            return p.ssd_cost[key]
        return p.peer_cost[key] if sim.held_elsewhere(self.n, key) else p.remote_cost[key]

    def pinned(self, key: int) -> bool:
        return key in self.sim.node_pinned[self.n]


class _SsdModel(_HostModel):
    def reload_cost_s(self, key: int) -> float:
        p = self.sim.prep
        return p.peer_cost[key] if self.sim.held_elsewhere(self.n, key) else p.remote_cost[key]


class Simulator:
    """One system on one prepared workload."""

    def __init__(self, prep: PreparedWorkload, spec: SystemSpec, settings: PolicySettings | None = None, seed: int = 0) -> None:
        self.prep = prep
        self.spec = spec
        self.settings = settings or PolicySettings()
        self.seed = seed
        cl = prep.cluster
        self.nodes = cl.nodes
        self.gpn = cl.gpus_per_node
        self.W = cl.gpus
        st = self.settings
        utility = spec.eviction == "utility"
        self.comp_pop: DecayedCounter[int] = DecayedCounter(st.half_life_s)
        self.pipe_pop: DecayedCounter[int] = DecayedCounter(st.half_life_s)
        self.pipe_work: DecayedCounter[int] = DecayedCounter(st.half_life_s)
        self.pinned: list[set[int]] = [set() for _ in range(self.W)]
        self.pinned_bytes = [0] * self.W
        self.node_pinned: list[set[int]] = [set() for _ in range(self.nodes)]
        self.ncost: list[list[float]] = [self._initial_costs() for _ in range(self.nodes)]
        """Per node and component: load seconds to a GPU there from the best tier (no jitter)."""
        self.min_cost = list(self.ncost[0])
        """Per component, the least of its node costs (no non-holder anywhere loads it faster)."""
        host_b = cl.host_bytes(prep.catalog_bytes)
        ssd_b = cl.ssd_bytes(prep.catalog_bytes)
        self.host_capacity, self.ssd_capacity = host_b, ssd_b

        def policy(model: _GpuModel | _HostModel, horizon: float) -> EvictionPolicy[int]:
            return UtilityEviction(model, horizon) if utility else LRUEviction()

        self.gpu: list[BoundedCache[int]] = [
            BoundedCache(prep.gpu_bytes, policy(_GpuModel(self, w), st.horizon_gpu_s)) for w in range(self.W)
        ]
        self.host: list[BoundedCache[int]] = [
            BoundedCache(host_b, policy(_HostModel(self, n), st.horizon_host_s)) for n in range(self.nodes)
        ]
        self.ssd: list[BoundedCache[int]] = [
            BoundedCache(ssd_b, policy(_SsdModel(self, n), st.horizon_ssd_s)) for n in range(self.nodes)
        ]
        self.host_ready: list[dict[int, float]] = [{} for _ in range(self.nodes)]
        self.ssd_ready: list[dict[int, float]] = [{} for _ in range(self.nodes)]
        self.gpu_holders: dict[int, set[int]] = {}
        self.node_holding: dict[int, set[int]] = {}
        """Nodes whose HOST or SSD tier holds each component."""
        self.queue: list[deque[int]] = [deque() for _ in range(self.W)]
        self.running = [False] * self.W
        self.outstanding = [0] * self.W
        self.est_free = [0.0] * self.W
        self.rr = 0
        # Ray Serve model sets and pipeline holders.
        self.models: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(self.W)]
        self.pipe_holders: dict[int, set[int]] = {}
        # diffmesh plan state.
        self.band: dict[int, Band] = {}
        self.fused: set[int] = set()
        self.needed_of: list[tuple[int, ...]] = []
        self.compute_factor: list[float] = []
        self._set_fused(set())
        self.replicas: dict[int, list[int]] = {}
        self.node_min = [0.0] * self.nodes
        """Per node, the earliest expected-free time of its workers (valid where not ``dirty``)."""
        self.dirty: set[int] = set(range(self.nodes))
        self.peer = spec.peer
        self.track_cost = utility or spec.routing == "ect"
        self.track_pop = spec.bands or utility or spec.fusion
        self.pop_keys = [(*cs, prep.overlay_of[p]) if p in prep.overlay_of else cs for p, cs in enumerate(prep.comps)]
        """Components whose popularity a request of each pipeline counts (its overlay too)."""
        self.buckets = [time_bucket(x, self.settings.bucket_s) for x in prep.trace_time] if spec.bandit else []
        self.admission = ColdAdmission()
        self.bandit: BanditPrefetcher[int] = BanditPrefetcher(seed=seed)
        self.prefetched: dict[tuple[int, int], tuple[int, int]] = {}
        self.bucket = -1
        self.ticks = 0
        self.hot_set: set[int] = set()
        self.warm: list[int] = []
        # Metrics.
        n = len(prep.req_pipe)
        # Python lists while running (cheaper to write than numpy items), arrays in the result.
        self.latency = [0.0] * n
        self.wait = [0.0] * n
        self.qlen = [0] * n
        self.est_service = [0.0] * n
        self.est_load_s = [0.0] * n
        """The load part of ``est_service`` (what the router expected on the worker it chose)."""
        self.waiting = 0
        self.queued: set[int] = set()
        """Workers with a non-empty queue."""
        self.run_end = [0.0] * self.W
        """When each worker's running service ends."""
        self.steals = 0
        self.scale_outs = 0
        self.misses = 0
        self.remote_bytes = 0
        self.peer_fetches = 0
        self.peer_bytes = 0
        self.ssd_bytes = 0
        self.gpu_loads = 0
        self.busy = 0.0
        self.b_start: list[float] = []
        self.b_end: list[float] = []
        self.heap: list[tuple[float, int, int, int]] = []
        self.seq = 0

    # ---- tiers -------------------------------------------------------------------------

    def _initial_costs(self) -> list[float]:
        p = self.prep
        costs = list(p.remote_cost)
        for o, pipe in p.overlay_pipe.items():
            costs[o] = sum(p.remote_cost[lo] for lo in p.loras[pipe]) + p.host_cost[o]
        return costs

    def held_elsewhere(self, n: int, c: int) -> bool:
        """Whether a node other than ``n`` holds ``c`` in HOST or SSD (and this system may copy from peers)."""
        if not self.peer:
            return False
        holders = self.node_holding.get(c)
        if not holders:
            return False
        return len(holders) > 1 or n not in holders

    def node_cost(self, n: int, c: int) -> float:
        """Load seconds of component ``c`` to a GPU of node ``n`` from its best tier (no jitter).

        HOST, else SSD, else a PEER copy (systems with a global view), else build the
        fused overlay from its LoRAs, else REMOTE. The cached :attr:`ncost` holds this value.
        """
        p = self.prep
        if c in self.host[n].sizes:
            return p.host_cost[c]
        if c in self.ssd[n].sizes:
            return p.ssd_cost[c]
        if self.held_elsewhere(n, c):
            return p.peer_cost[c]
        if c in p.overlay_pipe:
            nc = self.ncost[n]
            return sum(nc[lo] for lo in p.loras[p.overlay_pipe[c]]) + p.host_cost[c]
        return p.remote_cost[c]

    def _cost_changed(self, c: int, at: int) -> None:
        """Refresh the cached costs of ``c`` (and of overlays built from it) after node ``at``'s tiers changed.

        Other nodes' costs depend on node ``at`` only through the peer tier, and only
        when fewer than two other nodes hold a copy (with two or more, every node still
        has a peer either way).
        """
        if not self.track_cost:
            return
        p = self.prep
        ncost = self.ncost
        holders = self.node_holding.get(c)
        n_hold = len(holders) if holders else 0
        peer_ok = self.peer and n_hold > 0
        others_hold = n_hold - (1 if holders and at in holders else 0)
        nodes: range | tuple[int] = range(self.nodes) if self.peer and others_hold < 2 else (at,)
        for n in nodes:
            if c in self.host[n].sizes:
                x = p.host_cost[c]
            elif c in self.ssd[n].sizes:
                x = p.ssd_cost[c]
            elif peer_ok and (n_hold > 1 or n not in holders):  # type: ignore[operator]
                x = p.peer_cost[c]
            elif c in p.overlay_pipe:
                x = self.node_cost(n, c)
            else:
                x = p.remote_cost[c]
            ncost[n][c] = x
        self.min_cost[c] = min(nc[c] for nc in ncost)
        for o in p.overlays_of_lora.get(c, ()):
            for n in nodes:
                ncost[n][o] = self.node_cost(n, o)
            self.min_cost[o] = min(nc[o] for nc in ncost)

    def _gpu_drop(self, w: int, victims: list[int] | None) -> None:
        if not victims:
            return
        for v in victims:
            hs = self.gpu_holders.get(v)
            if hs is not None:
                hs.discard(w)

    def _admit(
        self, cache: BoundedCache[int], ready: dict[int, float], c: int, t: float, at: float, cold: bool, n: int, is_host: bool
    ) -> bool:
        nbytes = self.prep.nbytes[c]
        if c in cache.sizes:
            cache.access(c, t)
            return True
        if cold and self.spec.admission and nbytes > cache.free:
            victims = cache.plan_insert(nbytes, t, ())
            score = self.comp_pop.count(c, t)
            if not self.admission.admit(
                score, nbytes, cache.free, None if victims is None else [self.comp_pop.count(v, t) for v in victims]
            ):
                return False
            evicted = cache.insert(c, nbytes, t, victims=victims)
        else:
            evicted = cache.insert(c, nbytes, t)
        if evicted is None:
            return False
        self.node_holding.setdefault(c, set()).add(n)
        other = self.ssd[n] if is_host else self.host[n]
        for v in evicted:
            ready.pop(v, None)
            if v not in other.sizes:
                self.node_holding[v].discard(n)
            if is_host and self.prefetched:
                rec = self.prefetched.pop((n, v), None)
                if rec is not None:
                    self.bandit.reward(rec[0], rec[1], False)
            self._cost_changed(v, n)
        ready[c] = at
        self._cost_changed(c, n)
        return True

    def _peer_ready(self, n: int, c: int) -> float:
        """Earliest time another node's copy of ``c`` is complete (``inf``: no peer holds it)."""
        best = INF
        for m in self.node_holding.get(c, ()):
            if m == n:
                continue
            r = self.host_ready[m].get(c, 0.0) if c in self.host[m].sizes else self.ssd_ready[m].get(c, 0.0)
            if r < best:
                best = r
        return best

    def _fetch_to_node(self, n: int, c: int, t: float, i: int, cold: bool) -> float:
        """Bring ``c`` to node ``n``'s tiers if needed; returns seconds until a GPU there can load it."""
        p = self.prep
        host, ssd = self.host[n], self.ssd[n]
        if c in host.sizes:
            host.access(c, t)
            if self.prefetched:
                rec = self.prefetched.pop((n, c), None)
                if rec is not None:
                    self.bandit.reward(rec[0], rec[1], True)
            return max(p.host_cost[c], self.host_ready[n].get(c, 0.0) - t)
        nbytes = p.nbytes[c]
        if c in ssd.sizes:
            ssd.access(c, t)
            cost = max(p.ssd_cost[c], self.ssd_ready[n].get(c, 0.0) - t)
            self.ssd_bytes += nbytes
            self._admit(host, self.host_ready[n], c, t, t + cost, cold, n, True)
            return cost
        if self.peer:
            ready = self._peer_ready(n, c)
            if ready < INF:
                cost = max(p.peer_cost[c], ready - t)
                self.peer_fetches += 1
                self.peer_bytes += nbytes
                if self._admit(ssd, self.ssd_ready[n], c, t, t + cost, cold, n, False):
                    self.ssd_bytes += nbytes
                self._admit(host, self.host_ready[n], c, t, t + cost, cold, n, True)
                return cost
        if c in p.overlay_pipe:
            pipe = p.overlay_pipe[c]
            cost = sum(self._fetch_to_node(n, lo, t, i, cold) for lo in p.loras[pipe]) + p.host_cost[c]
            self.ssd_bytes += nbytes
            self._admit(ssd, self.ssd_ready[n], c, t, t + cost, False, n, False)
            self._admit(host, self.host_ready[n], c, t, t + cost, False, n, True)
            return cost
        cost = p.remote_cost[c] * jitter_factor(p.cal, p.kind[c], c, i)
        self.misses += 1
        self.remote_bytes += nbytes
        if self._admit(ssd, self.ssd_ready[n], c, t, t + cost, cold, n, False):
            self.ssd_bytes += nbytes
        self._admit(host, self.host_ready[n], c, t, t + cost, cold, n, True)
        return cost

    def _needed(self, p: int) -> tuple[int, ...]:
        return self.needed_of[p]

    def _set_fused(self, fused: set[int]) -> None:
        """Record the fusion plan: which components each pipeline needs and its compute factor."""
        prep = self.prep
        self.fused = fused
        self.needed_of = [
            fc if (j in fused and fc is not None) else cs
            for j, (cs, fc) in enumerate(zip(prep.comps, prep.fused_comps, strict=True))
        ]
        self.compute_factor = [
            1.0 if (not lo or j in fused) else 1.0 + UNFUSED_LORA_OVERHEAD * len(lo) for j, lo in enumerate(prep.loras)
        ]

    def _load(self, w: int, p: int, t: float, i: int) -> float:
        """Make pipeline ``p`` resident on worker ``w``; returns the load seconds."""
        gpu = self.gpu[w]
        sizes = gpu.sizes
        needed = self.needed_of[p]
        on_access = gpu.policy.on_access
        act = self.prep.act[i]
        if all(c in sizes for c in needed):
            # Warm: every copy is resident (the common case).
            for c in needed:
                on_access(c, t)
            if act > gpu.capacity - gpu.used:
                self._gpu_drop(w, gpu.make_room(act, t, self.pinned[w].union(needed) if self.pinned[w] else needed))
            return 0.0
        n = w // self.gpn
        protected: set[int] | tuple[int, ...] = needed
        if self.pinned[w]:
            protected = self.pinned[w].union(needed)
        cold = self.band.get(p, Band.COLD) is Band.COLD
        nb = self.prep.nbytes
        costs = []
        for c in needed:
            if c in sizes:
                on_access(c, t)
                costs.append(0.0)
                continue
            cost = self._fetch_to_node(n, c, t, i, cold)
            costs.append(cost)
            self.gpu_loads += 1
            evicted = gpu.insert(c, nb[c], t, protected)
            if evicted is not None:
                self._gpu_drop(w, evicted)
                self.gpu_holders.setdefault(c, set()).add(w)
        if act > gpu.capacity - gpu.used:
            self._gpu_drop(w, gpu.make_room(act, t, protected))
        if len(costs) == 1:
            return costs[0]
        if self.spec.asymmetric:
            return costs[0] + max(costs[1:])
        return sum(costs)

    def _est_load(self, w: int, needed: tuple[int, ...]) -> float:
        """Expected seconds to make ``needed`` resident on worker ``w`` (base first, then the rest)."""
        sizes = self.gpu[w].sizes
        nc = self.ncost[w // self.gpn]
        base = needed[0]
        return (0.0 if base in sizes else nc[base]) + adapters_load_s(sizes, nc, needed, self.spec.asymmetric)

    # ---- routing -----------------------------------------------------------------------

    def _least_loaded(self) -> int:
        out = self.outstanding
        W = self.W
        m = min(out)
        start = self.rr
        self.rr = (self.rr + 1) % W
        for k in range(W):
            w = (start + k) % W
            if out[w] == m:
                return w
        return start

    def _route_rayserve(self, p: int) -> int:
        out = self.outstanding
        holders = self.pipe_holders.get(p)
        if holders:
            ok = [w for w in holders if out[w] < self.spec.max_ongoing]
            if ok:
                return min(ok, key=lambda w: (out[w], w))
        models = self.models
        start = self.rr
        self.rr = (self.rr + 1) % self.W
        W = self.W
        return min(((start + k) % W for k in range(W)), key=lambda w: (len(models[w]), out[w]))

    def _route_modelmesh(self, p: int) -> int:
        out = self.outstanding
        needed = self.prep.comps[p]
        holders = self.gpu_holders.get(needed[0], ())
        best = -1
        for w in holders:
            sizes = self.gpu[w].sizes
            if all(c in sizes for c in needed[1:]) and (best < 0 or out[w] < out[best] or (out[w] == out[best] and w < best)):
                best = w
        g = self._least_loaded()
        if best < 0:
            return g
        if out[best] == 0 or out[best] <= out[g] + 1:
            return best
        return g

    def _fits(self, w: int, needed: tuple[int, ...], need: int) -> bool:
        """Whether weights + activations (``need`` bytes) fit beside the copies pinned on ``w`` for other pipelines."""
        free = self.prep.gpu_bytes - self.pinned_bytes[w]
        if need <= free:
            return True
        pins = self.pinned[w]
        nb = self.prep.nbytes
        return need <= free + sum(nb[c] for c in needed if c in pins)

    def _route_ect(self, i: int, p: int, t: float) -> int:
        """The worker with the lowest expected completion time (ties: lowest id) among those that fit.

        Every worker is eligible; the copies the HOT plan pins count as used memory, so
        tail traffic cannot displace head traffic. The search is exact but skips workers
        by lower bounds: holders of the base in order of their wait (a holder's ECT is at
        least its wait), then per node only while ``earliest wait on the node + base load
        from the node's best tier`` can still beat the best found (every non-holder there
        pays at least that). :meth:`_route_ect_exhaustive` scores all workers and must
        choose the same. Both use the ECT of :mod:`diffmesh.policy.routing`, which the
        router scores with too: the adapters' part of the load is
        :func:`~diffmesh.policy.routing.adapters_load_s`; the compute term, equal for
        every worker here, is left out of the comparison.
        """
        prep = self.prep
        needed = self._needed(p)
        weights = prep.fused_weights[p] if needed is not prep.comps[p] else prep.weights[p]
        need = weights + prep.act[i]
        base = needed[0]
        asym = self.spec.asymmetric
        est_free = self.est_free
        gpus = self.gpu
        gpn = self.gpn
        ncost = self.ncost
        pinned_bytes = self.pinned_bytes
        roomy = prep.gpu_bytes - need
        """Pinned bytes up to this leave room without looking at which copies are pinned."""
        others = len(needed) > 1
        best = INF
        best_w = -1
        holders = self.gpu_holders.get(base)
        if holders:
            # The least-busy holder first: its ECT bounds the others, most of which are then
            # dismissed on their wait alone.
            first = min(holders, key=est_free.__getitem__)
            for w in (first, *holders) if len(holders) > 1 else holders:
                wait = est_free[w] - t
                if wait < 0.0:
                    wait = 0.0
                if wait > best or (w == first and best_w == first):
                    continue
                if pinned_bytes[w] > roomy and not self._fits(w, needed, need):
                    continue
                v = wait + adapters_load_s(gpus[w].sizes, ncost[w // gpn], needed, asym) if others else wait
                if v < best or (v == best and w < best_w):
                    best, best_w = v, w
        if self.min_cost[base] > best:
            return self._routed(i, p, t, best_w, needed)
        node_min = self._node_mins()
        for n in range(self.nodes):
            nc = ncost[n]
            bc = nc[base]
            wait = node_min[n] - t
            if (wait if wait > 0.0 else 0.0) + bc > best:
                continue
            for w in range(n * gpn, n * gpn + gpn):
                sizes = gpus[w].sizes
                if base in sizes:
                    continue
                wait = est_free[w] - t
                if wait < 0.0:
                    wait = 0.0
                v = wait + bc
                if v > best:
                    continue
                if pinned_bytes[w] > roomy and not self._fits(w, needed, need):
                    continue
                if others:
                    v += adapters_load_s(sizes, nc, needed, asym)
                if v < best or (v == best and w < best_w):
                    best, best_w = v, w
        return self._routed(i, p, t, best_w, needed)

    def _route_ect_exhaustive(self, i: int, p: int, t: float) -> int:
        """Reference for :meth:`_route_ect`: every worker scored with the policy module's functions."""
        prep = self.prep
        needed = self._needed(p)
        weights = prep.fused_weights[p] if needed is not prep.comps[p] else prep.weights[p]
        base = needed[0]
        nb = prep.nbytes
        rows = []
        for w in range(self.W):
            sizes = self.gpu[w].sizes
            nc = self.ncost[w // self.gpn]
            load = pipeline_load_s(
                0.0 if base in sizes else nc[base], [nc[c] for c in needed[1:] if c not in sizes], self.spec.asymmetric
            )
            free = prep.gpu_bytes - self.pinned_bytes[w] + sum(nb[c] for c in needed if c in self.pinned[w])
            rows.append((w, max(0.0, self.est_free[w] - t), load, free))
        best = choose_worker(rows, weights, prep.act[i], self._compute(i, p))
        return self._routed(i, p, t, -1 if best is None else best[0], needed)

    def _routed(self, i: int, p: int, t: float, w: int, needed: tuple[int, ...]) -> int:
        """Book the request on ``w`` (-1: nothing fits, take the least-pinned worker)."""
        est_free = self.est_free
        if w < 0:
            # Nothing fits beside the pinned copies: the lowest ECT anywhere (the run sub-batches).
            w = min(range(self.W), key=lambda x: (max(0.0, est_free[x] - t) + self._est_load(x, needed), x))
        load = self._est_load(w, needed)
        self.est_load_s[i] = load
        service = load + self._compute(i, p)
        est_free[w] = (est_free[w] if est_free[w] > t else t) + service
        self.dirty.add(w // self.gpn)
        self.est_service[i] = service
        return w

    def _node_mins(self) -> list[float]:
        """Per node, the earliest expected-free time of its workers; recomputed only for changed nodes."""
        mins = self.node_min
        dirty = self.dirty
        if dirty:
            est_free = self.est_free
            gpn = self.gpn
            for n in dirty:
                mins[n] = min(est_free[n * gpn : n * gpn + gpn])
            dirty.clear()
        return mins

    def _compute(self, i: int, p: int) -> float:
        """Denoising seconds of request ``i``: unfused LoRAs add their per-step overhead."""
        return self.prep.compute[i] * self.compute_factor[p]

    # ---- diffmesh plan -----------------------------------------------------------------

    def _tick(self, t: float) -> None:
        st = self.settings
        prep = self.prep
        ranked = [(k, c) for k, c in self.pipe_pop.ranked(t) if c >= st.min_count]
        if self.spec.fusion:
            fused = {
                int(k) for k in plan_fusion(((str(k), c) for k, c in ranked), lambda s: bool(prep.loras[int(s)]), st.fusion_top_k)
            }
            if fused != self.fused:
                self._set_fused(fused)
        if not self.spec.bands:
            return
        self.band = assign_bands([k for k, _ in ranked], st.thresholds, self.hot_set)
        self.warm = [k for k, _ in ranked if self.band[k] is Band.WARM]
        hot = [k for k, _ in ranked if self.band[k] is Band.HOT]
        self.ticks += 1
        if set(hot) == self.hot_set and self.ticks % st.replan_every:
            return
        self.hot_set = set(hot)
        # The coordinator's HOT placement (policy.planner.plan_hot) over the simulated workers:
        # each pipeline as the components it needs now (its overlay instead of LoRAs when fused).
        demands = [
            PipelineDemand(str(k), 0.0, tuple(str(c) for c in self._needed(k)), work=self.pipe_work.count(k, t)) for k in hot
        ]
        sizes = {c: prep.nbytes[int(c)] for d in demands for c in d.component_ids}
        workers = [PlanWorker(str(w // self.gpn), str(w), prep.gpu_bytes) for w in range(self.W)]
        previous = {str(k): [(str(w // self.gpn), str(w)) for w in ws] for k, ws in self.replicas.items()}
        plan = plan_hot(
            demands,
            sum(self.pipe_work.count(k, t) for k, _ in ranked),
            workers,
            sizes,
            lambda cid: tuple(str(n) for n in sorted(self.node_holding.get(int(cid), ()))),
            previous,
            PlannerSettings(pin_budget_fraction=st.pin_budget_fraction),
        )
        self.replicas = {int(k): [int(w) for _, w in ws] for k, ws in plan.items() if ws}
        pinned: list[set[int]] = [set() for _ in range(self.W)]
        for k, ws in self.replicas.items():
            for w in ws:
                pinned[w].update(self._needed(k))
        self.pinned = pinned
        self.pinned_bytes = [sum(prep.nbytes[c] for c in s) for s in pinned]
        self.node_pinned = [set().union(*pinned[n * self.gpn : (n + 1) * self.gpn]) for n in range(self.nodes)]
        self.dirty.update(range(self.nodes))
        for w in range(self.W):
            if pinned[w] and not self.running[w]:
                self._warm_up(w, t)

    def _warm_up(self, w: int, t: float, extra: tuple[int, ...] = ()) -> None:
        """Load a worker's newly pinned copies (and ``extra``) while it is idle: ready before traffic."""
        gpu = self.gpu[w]
        missing = [c for c in (*sorted(self.pinned[w]), *extra) if c not in gpu.sizes]
        if not missing:
            return
        n = w // self.gpn
        protected = self.pinned[w].union(extra)
        total = 0.0
        for c in missing:
            total += self._fetch_to_node(n, c, t, 0, False)
            self.gpu_loads += 1
            evicted = gpu.insert(c, self.prep.nbytes[c], t, protected)
            if evicted is not None:
                self._gpu_drop(w, evicted)
                self.gpu_holders.setdefault(c, set()).add(w)
        self.busy += total
        self.b_start.append(t)
        self.b_end.append(t + total)
        self.running[w] = True
        self.est_free[w] = max(self.est_free[w], t + total)
        self.dirty.add(n)
        self.seq += 1
        self.run_end[w] = t + total
        heapq.heappush(self.heap, (t + total, self.seq, w, -1))

    def _home_node(self, p: int) -> int:
        needed = self._needed(p)
        best, best_bytes = -1, 0
        for n in range(self.nodes):
            held = sum(self.prep.nbytes[c] for c in needed if c in self.host[n].sizes or c in self.ssd[n].sizes)
            if held > best_bytes:
                best, best_bytes = n, held
        return best if best >= 0 else needed[0] % self.nodes

    def _prefetch(self, bucket: int, t: float, i: int) -> None:
        if not self.warm:
            return
        for p in self.bandit.select(bucket, self.warm, self.settings.prefetch_per_bucket):
            n = self._home_node(p)
            for c in self._needed(p):
                # Promote SSD copies only: a speculative copy never costs REMOTE traffic.
                if c in self.host[n].sizes or c not in self.ssd[n].sizes:
                    continue
                self._fetch_to_node(n, c, t, i, False)
                if c in self.host[n].sizes:
                    self.prefetched[(n, c)] = (bucket, p)

    # ---- event loop --------------------------------------------------------------------

    def _start(self, w: int, i: int, t: float) -> None:
        p = self.prep.req_pipe[i]
        load = self._load(w, p, t, i)
        service = load + self._compute(i, p)
        self.busy += service
        self.b_start.append(t)
        self.b_end.append(t + service)
        self.wait[i] = t - self.prep.arrival[i]
        if self.spec.routing == "ect":
            self.est_free[w] += service - self.est_service[i]
            self.dirty.add(w // self.gpn)
        self.running[w] = True
        self.seq += 1
        self.run_end[w] = t + service
        heapq.heappush(self.heap, (t + service, self.seq, w, i))

    def _finish(self, t: float, w: int, i: int) -> None:
        if i >= 0:
            self.latency[i] = t - self.prep.arrival[i]
            self.outstanding[w] -= 1
        self.running[w] = False
        q = self.queue[w]
        if q:
            self.waiting -= 1
            j = q.popleft()
            if not q:
                self.queued.discard(w)
            self._start(w, j, t)
        elif self.queued and self.spec.steal:
            self._steal(w, t)

    def _steal(self, w: int, t: float) -> None:
        """Idle worker ``w`` takes the queued request that finishes soonest by moving (late binding).

        A request queued on worker ``v`` expects to start when ``v`` has finished its
        running request and those ahead of it; it moves to ``w`` when loading what it
        misses on ``w`` now completes it earlier than waiting on ``v`` would (the largest
        gain first; ties: the earlier queue position, then the lower worker id).
        """
        prep = self.prep
        est_service = self.est_service
        est_load = self.est_load_s
        best_gain = 0.0
        best: tuple[int, int] | None = None
        for v in sorted(self.queued):
            start = self.run_end[v]
            for j in self.queue[v]:
                # Staying costs the wait plus the load the router expected on v; moving costs
                # the load on w, at least 0, so it is only estimated when it could pay.
                gain = (start - t) + est_load[j]
                if gain > best_gain:
                    needed = self.needed_of[prep.req_pipe[j]]
                    gain -= self._est_load(w, needed)
                if gain > best_gain:
                    if not self.pinned_bytes[w] or self._fits(w, needed, self._need_bytes(j, prep.req_pipe[j])):
                        best_gain, best = gain, (v, j)
                start += est_service[j]
        if best is None:
            return
        v, j = best
        q = self.queue[v]
        q.remove(j)
        if not q:
            self.queued.discard(v)
        self.waiting -= 1
        self.outstanding[v] -= 1
        self.outstanding[w] += 1
        self.est_free[v] -= est_service[j]
        p = prep.req_pipe[j]
        est_load[j] = self._est_load(w, self.needed_of[p])
        est_service[j] = est_load[j] + self._compute(j, p)
        self.est_free[w] = t + est_service[j]
        self.dirty.add(v // self.gpn)
        self.dirty.add(w // self.gpn)
        self.steals += 1
        self._start(w, j, t)

    def _scale_out(self, i: int, p: int, t: float) -> None:
        """A request of a HOT/WARM pipeline had to queue: warm one more idle GPU for the next ones.

        Demand has outgrown the pipeline's warm copies, and idle GPUs cost nothing: the
        idle worker where the pipeline loads fastest (from HOST, SSD or a peer, never
        REMOTE: a component no node holds is left to on-demand loading) starts loading it
        now, so the next request of the burst finds a warm, free worker.
        """
        needed = self.needed_of[p]
        if any(not self.node_holding.get(c) for c in needed):
            return
        need = self._need_bytes(i, p)
        best, best_w = INF, -1
        running, queue, gpus, ncost, gpn = self.running, self.queue, self.gpu, self.ncost, self.gpn
        base = needed[0]
        asym = self.spec.asymmetric
        for x in range(self.W):
            if running[x] or queue[x]:
                continue
            sizes = gpus[x].sizes
            nc = ncost[x // gpn]
            load = 0.0 if base in sizes else nc[base]
            if load >= best:
                continue
            if self.pinned_bytes[x] and not self._fits(x, needed, need):
                continue
            load += adapters_load_s(sizes, nc, needed, asym)
            if load < best:
                best, best_w = load, x
        if best_w >= 0 and best > 0.0:
            self.scale_outs += 1
            self._warm_up(best_w, t, needed)

    def _need_bytes(self, i: int, p: int) -> int:
        """Device bytes request ``i`` of pipeline ``p`` needs: weights + activations."""
        prep = self.prep
        needed = self.needed_of[p]
        return (prep.fused_weights[p] if needed is not prep.comps[p] else prep.weights[p]) + prep.act[i]

    def _arrive(self, i: int, t: float) -> None:
        prep = self.prep
        p = prep.req_pipe[i]
        self.qlen[i] = self.waiting
        if self.track_pop:
            self.pipe_pop.add(p, t)
            self.pipe_work.add(p, t, prep.compute[i])
            self.comp_pop.add_many(self.pop_keys[p], t)
        if self.buckets:
            b = self.buckets[i]
            if b != self.bucket:
                self.bucket = b
                self._prefetch(b, t, i)
        routing = self.spec.routing
        if routing == "ect":
            w = self._route_ect_exhaustive(i, p, t) if self.spec.exhaustive else self._route_ect(i, p, t)
        elif routing == "rayserve":
            w = self._route_rayserve(p)
            self._rayserve_touch(w, p)
        elif routing == "modelmesh":
            w = self._route_modelmesh(p)
        else:
            w = self._least_loaded()
        self.outstanding[w] += 1
        if self.running[w]:
            self.queue[w].append(i)
            self.queued.add(w)
            self.waiting += 1
            if self.spec.scale_out and self.band.get(p, Band.COLD) is not Band.COLD:
                self._scale_out(i, p, t)
        else:
            self._start(w, i, t)

    def _rayserve_touch(self, w: int, p: int) -> None:
        models = self.models[w]
        if p in models:
            models.move_to_end(p)
            return
        models[p] = None
        self.pipe_holders.setdefault(p, set()).add(w)
        if len(models) > self.spec.max_models:
            old, _ = models.popitem(last=False)
            self.pipe_holders[old].discard(w)
            keep = {c for q in models for c in self.prep.comps[q]}
            for c in self.prep.comps[old]:
                if c not in keep and self.gpu[w].remove(c):
                    self._gpu_drop(w, [c])

    def run(self) -> SimResult:
        """Simulate every request; returns the outcomes.

        The cyclic garbage collector is paused meanwhile: the loop allocates many small
        tuples but creates no reference cycles, and the collector's passes over the
        growing heap cost more than the simulation itself on long traces.
        """
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if was_enabled:
                gc.enable()

    def _run(self) -> SimResult:
        began = time.perf_counter()
        cpu = time.process_time()
        prep = self.prep
        arrival = prep.arrival
        heap = self.heap
        planned = self.spec.bands or self.spec.fusion
        interval = self.settings.plan_interval_s
        next_tick = arrival[0] if planned and arrival else INF
        for i, t in enumerate(arrival):
            while True:
                ht = heap[0][0] if heap else INF
                if next_tick <= t and next_tick <= ht:
                    self._tick(next_tick)
                    next_tick += interval
                elif ht <= t:
                    ft, _, w, j = heapq.heappop(heap)
                    self._finish(ft, w, j)
                else:
                    break
            self._arrive(i, t)
        end = arrival[-1] if arrival else 0.0
        while heap:
            ft, _, w, j = heapq.heappop(heap)
            end = ft
            self._finish(ft, w, j)
        span = end - (arrival[0] if arrival else 0.0)
        return SimResult(
            name=self.spec.name,
            latency_s=np.asarray(self.latency, dtype=np.float64),
            queue_wait_s=np.asarray(self.wait, dtype=np.float64),
            queue_len=np.asarray(self.qlen, dtype=np.int32),
            misses=self.misses,
            remote_bytes=self.remote_bytes,
            ssd_bytes=self.ssd_bytes,
            gpu_loads=self.gpu_loads,
            busy_s=self.busy,
            span_s=span,
            gpus=self.W,
            wall_s=time.perf_counter() - began,
            busy_start=np.asarray(self.b_start),
            busy_end=np.asarray(self.b_end),
            arrival_s=np.asarray(arrival),
            window_s=3600.0 / prep.compression,
            cpu_s=time.process_time() - cpu,
            peer_fetches=self.peer_fetches,
            peer_bytes=self.peer_bytes,
            steals=self.steals,
        )
