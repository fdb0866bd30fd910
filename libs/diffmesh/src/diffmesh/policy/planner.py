"""The planner: one pass of the policy plane, from popularity and the live mesh to a decision.

The coordinator runs :func:`plan` every ``PLAN_SECONDS`` and publishes the result as a
versioned ``diffmesh.v1.Plan``; the simulator calls :func:`plan_hot` for the same HOT
replica placement. Steps, each a policy of this package:

1. bands of the ranked pipelines (:func:`~diffmesh.policy.popularity.assign_bands`, with
   hysteresis against the previous HOT set);
2. fusion targets: the top-K pipelines with LoRAs, whatever their band
   (:func:`~diffmesh.policy.fusion_plan.plan_fusion`); each gets a FUSED overlay, and a HOT
   one's replicas hold base + overlay instead of base + LoRAs
   (:func:`~diffmesh.policy.fusion_plan.overlay_bytes`);
3. HOT replicas over the live workers (:func:`~diffmesh.policy.replicas.plan_hot_replicas`),
   each worker pinning at most ``pin_budget_fraction`` of its device memory, previous
   replicas kept (persistence);
4. per node: pins (the components of the HOT replicas on its workers), the fusion targets
   it derives (:func:`place_fusions`), and the WARM prefetch picks placed on it (the picks come from the
   caller's bandit, :class:`~diffmesh.policy.prefetch.BanditPrefetcher`; a pick goes to the
   node whose tiers hold most of its bytes, and stays there while that node lives);
5. COLD admission: components of HOT and WARM pipelines are always admitted, others only
   after ``cold_min_uses`` uses;
6. scaling advice (:func:`~diffmesh.policy.scaling.advise_scaling`).

Pure: no I/O, no clock, no protobuf; the same inputs give the same decision.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from diffmesh.policy.fusion_plan import DEFAULT_TOP_K, overlay_bytes, plan_fusion
from diffmesh.policy.popularity import Band, BandThresholds, assign_bands
from diffmesh.policy.replicas import HotPipeline, ReplicaSettings, WorkerSlot, plan_hot_replicas
from diffmesh.policy.scaling import advise_scaling
from diffmesh.tiers import Tier

WorkerKey = tuple[str, str]
"""``(node_id, worker_id)``: worker ids are unique only within their node."""


@dataclass(frozen=True)
class PipelineDemand:
    """A ranked pipeline: its decayed popularity and what it is made of."""

    key: str
    count: float
    """Decayed request count (ranks the pipeline; rate = count x decay constant)."""
    component_ids: tuple[str, ...]
    """Every component it uses: base first, then LoRAs, then ControlNets."""
    lora_ids: tuple[str, ...] = ()
    work: float | None = None
    """Decayed work that sizes its replica share; None: ``count``."""

    @property
    def base_id(self) -> str:
        """The base model's id."""
        return self.component_ids[0]

    @property
    def demand(self) -> float:
        """``work``, or ``count`` when no work is given."""
        return self.count if self.work is None else self.work


@dataclass(frozen=True)
class PlanWorker:
    """A live worker the plan may place replicas on."""

    node_id: str
    worker_id: str
    device_memory_bytes: int
    load: float = 0.0
    """Requests waiting or running on it."""

    @property
    def key(self) -> WorkerKey:
        """``(node_id, worker_id)``."""
        return (self.node_id, self.worker_id)


@dataclass(frozen=True)
class PlannerSettings:
    """The planner's knobs (the coordinator's settings)."""

    thresholds: BandThresholds = field(default_factory=BandThresholds)
    pin_budget_fraction: float = 0.5
    """Share of a worker's device memory the HOT replicas may pin (the rest: activations, COLD work)."""
    fusion_top_k: int = DEFAULT_TOP_K
    """Fuse the top this many pipelines with LoRAs; 0: no fusion."""
    cold_min_uses: int = 2
    scale_out_load: float = 2.0
    """Requests waiting or running per live worker above which the mesh should grow."""
    replicas: ReplicaSettings = field(default_factory=ReplicaSettings)


@dataclass(frozen=True)
class HotPlacement:
    """A HOT pipeline and the workers that keep it built."""

    key: str
    share: float
    component_ids: tuple[str, ...]
    replicas: tuple[WorkerKey, ...]
    fused_id: str = ""
    """Id of its FUSED overlay; empty: not fused."""


@dataclass(frozen=True)
class FusionPlacement:
    """A fusion target: a top-K pipeline with LoRAs and the nodes that derive its FUSED overlay."""

    key: str
    fused_id: str
    node_ids: tuple[str, ...]


@dataclass(frozen=True)
class BandedPipeline:
    """A HOT or WARM pipeline as the plan saw it."""

    key: str
    band: Band
    count: float
    component_ids: tuple[str, ...]


@dataclass(frozen=True)
class NodePlan:
    """What one node keeps, fetches and derives because of the plan."""

    node_id: str
    pinned_ids: tuple[str, ...] = ()
    prefetch_ids: tuple[str, ...] = ()
    fuse_pipeline_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlanDecision:
    """Everything one planning pass decided; :meth:`signature` tells decisions apart."""

    hot: tuple[HotPlacement, ...] = ()
    pipelines: tuple[BandedPipeline, ...] = ()
    """HOT and WARM pipelines, most popular first; any other is COLD."""
    nodes: tuple[NodePlan, ...] = ()
    admitted_ids: tuple[str, ...] = ()
    cold_min_uses: int = 0
    scale_out: bool = False
    preferred_nodes: tuple[str, ...] = ()
    load_per_worker: float = 0.0
    fused_keys: tuple[str, ...] = ()
    """Every fusion target (top-K with LoRAs), most popular first."""
    prefetch_homes: tuple[tuple[str, str], ...] = ()
    """``(pipeline key, node id)`` of each WARM prefetch pick."""
    fusions: tuple[FusionPlacement, ...] = ()
    """The fusion targets of ``fused_keys`` with the nodes that derive them."""

    def signature(self) -> tuple[object, ...]:
        """The decision without its measurements (counts, shares, load): equal signatures, same plan."""
        return (
            tuple((h.key, h.component_ids, h.replicas, h.fused_id) for h in self.hot),
            tuple((p.key, p.band, p.component_ids) for p in self.pipelines),
            self.nodes,
            self.admitted_ids,
            self.cold_min_uses,
            self.scale_out,
            self.preferred_nodes,
            self.fusions,
        )

    def replicas(self) -> dict[str, tuple[WorkerKey, ...]]:
        """Workers per HOT pipeline key."""
        return {h.key: h.replicas for h in self.hot}


@dataclass(frozen=True)
class PlanInputs:
    """What one planning pass reads."""

    pipelines: Sequence[PipelineDemand]
    """Ranked pipelines, most popular first (only those worth ranking)."""
    component_bytes: Mapping[str, int]
    """Catalog sizes; a pipeline naming a component not in it is not planned."""
    workers: Sequence[PlanWorker]
    """Live workers, in a stable order (it breaks placement ties)."""
    nodes: Sequence[str] = ()
    """Live nodes, in a stable order; nodes of ``workers`` are added when missing."""
    holdings: Mapping[str, Mapping[str, Tier]] = field(default_factory=dict)
    """Per node, the best of its SSD/HOST tiers holding each component."""
    previous: PlanDecision | None = None
    choose_prefetch: Callable[[Sequence[str]], Sequence[str]] | None = None
    """Given the WARM pipeline keys (most popular first), the ones to prefetch now (the bandit)."""
    fused_id_of: Callable[[str], str] = str
    """The FUSED overlay id of a pipeline key."""


def extra_bytes(p: PipelineDemand, component_bytes: Mapping[str, int], fused: bool) -> int:
    """Bytes a replica of ``p`` pins beside its base: the LoRAs (or the fused overlay instead) and ControlNets."""
    rest = p.component_ids[1:]
    if not fused:
        return sum(component_bytes.get(c, 0) for c in rest)
    loras = set(p.lora_ids)
    return overlay_bytes(component_bytes.get(p.base_id, 0)) + sum(component_bytes.get(c, 0) for c in rest if c not in loras)


def plan_hot(
    hot: Sequence[PipelineDemand],
    total_demand: float,
    workers: Sequence[PlanWorker],
    component_bytes: Mapping[str, int],
    holders: Callable[[str], tuple[str, ...]],
    previous: Mapping[str, Sequence[WorkerKey]],
    settings: PlannerSettings,
    fused: Callable[[str], bool] = lambda _: False,
) -> dict[str, list[WorkerKey]]:
    """Workers per HOT pipeline (an empty list when it fits nowhere).

    ``total_demand`` is the demand of every ranked pipeline (the shares' denominator);
    ``holders(component_id)`` names the nodes whose tiers hold a component, in node order.
    """
    total = total_demand or 1.0
    pipelines = [
        HotPipeline(
            p.key,
            p.demand / total,
            p.base_id,
            component_bytes.get(p.base_id, 0),
            extra_bytes(p, component_bytes, fused(p.key)),
            holders(p.base_id),
        )
        for p in hot
    ]
    slot_of = {w.key: f"{w.node_id}/{w.worker_id}" for w in workers}
    worker_of = {slot: key for key, slot in slot_of.items()}
    slots = [WorkerSlot(slot_of[w.key], w.node_id, int(w.device_memory_bytes * settings.pin_budget_fraction)) for w in workers]
    before = {key: [slot_of[w] for w in ws if w in slot_of] for key, ws in previous.items()}
    placed = plan_hot_replicas(pipelines, slots, before, settings.replicas)
    return {key: [worker_of[s] for s in slots_] for key, slots_ in placed.items()}


def _home_node(
    p: PipelineDemand, nodes: Sequence[str], holdings: Mapping[str, Mapping[str, Tier]], sizes: Mapping[str, int]
) -> str:
    best, best_bytes = "", 0
    for n in nodes:
        held = holdings.get(n, {})
        nbytes = sum(sizes.get(c, 0) for c in p.component_ids if c in held)
        if nbytes > best_bytes:
            best, best_bytes = n, nbytes
    return best or nodes[zlib.crc32(p.base_id.encode()) % len(nodes)]


def place_fusions(
    targets: Sequence[PipelineDemand],
    nodes: Sequence[str],
    hot: Sequence[HotPlacement],
    holders: Callable[[str], tuple[str, ...]],
    previous: Sequence[FusionPlacement],
    fused_id_of: Callable[[str], str],
) -> tuple[FusionPlacement, ...]:
    """The nodes that derive each fusion target's overlay (``targets`` most popular first).

    A HOT target with replicas: the nodes of its replicas. Any other: the live nodes the
    previous plan gave it (so a plan does not move with every residency report), else the
    nodes whose SSD/HOST tiers hold its base, else the node with the fewest fusions so far
    (ties: node order). No live node: no fusion.
    """
    order = {n: i for i, n in enumerate(nodes)}
    if not order:
        return ()
    replica_nodes = {h.key: {n for n, _ in h.replicas} for h in hot}
    before = {f.key: f.node_ids for f in previous}
    assigned = dict.fromkeys(nodes, 0)
    placed: list[FusionPlacement] = []
    for p in targets:
        chosen = tuple(n for n in nodes if n in replica_nodes.get(p.key, ()))
        if not chosen:
            chosen = tuple(n for n in before.get(p.key, ()) if n in order)
        if not chosen:
            chosen = holders(p.base_id)
        if not chosen:
            chosen = (min(nodes, key=lambda n: (assigned[n], order[n])),)
        for n in chosen:
            assigned[n] += 1
        placed.append(FusionPlacement(p.key, fused_id_of(p.key), chosen))
    return tuple(placed)


def plan(inputs: PlanInputs, settings: PlannerSettings | None = None) -> PlanDecision:
    """One planning pass (see the module docstring)."""
    settings = settings or PlannerSettings()
    sizes = inputs.component_bytes
    ranked = [p for p in inputs.pipelines if p.component_ids and all(c in sizes for c in p.component_ids)]
    nodes = list(dict.fromkeys([*inputs.nodes, *(w.node_id for w in inputs.workers)]))
    previous = inputs.previous or PlanDecision()
    by_key = {p.key: p for p in ranked}

    bands = assign_bands([p.key for p in ranked], settings.thresholds, {h.key for h in previous.hot})
    fused_keys = tuple(plan_fusion(((p.key, p.count) for p in ranked), lambda k: bool(by_key[k].lora_ids), settings.fusion_top_k))
    fused = set(fused_keys)
    hot = [p for p in ranked if bands[p.key] is Band.HOT]
    warm = [p for p in ranked if bands[p.key] is Band.WARM]

    holdings = inputs.holdings

    def holders(cid: str) -> tuple[str, ...]:
        return tuple(n for n in nodes if cid in holdings.get(n, {}))

    placed = plan_hot(
        hot,
        sum(p.demand for p in ranked),
        inputs.workers,
        sizes,
        holders,
        previous.replicas(),
        settings,
        lambda k: k in fused,
    )
    total = sum(p.demand for p in ranked) or 1.0
    hot_plan = tuple(
        HotPlacement(
            p.key,
            p.demand / total,
            p.component_ids,
            tuple(placed.get(p.key, ())),
            inputs.fused_id_of(p.key) if p.key in fused else "",
        )
        for p in hot
    )

    pinned: dict[str, set[str]] = {n: set() for n in nodes}
    for h in hot_plan:
        for node_id, _ in h.replicas:
            pinned[node_id].update(h.component_ids)
            if h.fused_id:
                pinned[node_id].add(h.fused_id)
    fusions = place_fusions([by_key[k] for k in fused_keys], nodes, hot_plan, holders, previous.fusions, inputs.fused_id_of)
    fuse_keys: dict[str, set[str]] = {n: set() for n in nodes}
    for f in fusions:
        for node_id in f.node_ids:
            fuse_keys[node_id].add(f.key)

    prefetch: dict[str, set[str]] = {n: set() for n in nodes}
    homes: list[tuple[str, str]] = []
    if inputs.choose_prefetch is not None and warm and nodes:
        before = dict(previous.prefetch_homes)
        warm_keys = {p.key for p in warm}
        for key in inputs.choose_prefetch([p.key for p in warm]):
            if key not in warm_keys:
                continue
            p = by_key[key]
            home = before.get(key, "")
            if home not in pinned:
                home = _home_node(p, nodes, holdings, sizes)
            homes.append((key, home))
            prefetch[home].update(c for c in p.component_ids if c not in pinned[home])

    node_plans = tuple(
        NodePlan(n, tuple(sorted(pinned[n])), tuple(sorted(prefetch[n])), tuple(sorted(fuse_keys[n]))) for n in nodes
    )
    admitted = {c for p in (*hot, *warm) for c in p.component_ids} | {f.fused_id for f in fusions if f.fused_id}
    admitted |= {h.fused_id for h in hot_plan if h.fused_id}

    workers = inputs.workers
    load_per_worker = sum(w.load for w in workers) / len(workers) if workers else 0.0
    needed = {c: float(sizes.get(c, 0)) for p in hot for c in p.component_ids}
    node_holdings = {n: dict(holdings.get(n, {})) for n in nodes}
    preferred = tuple(a.node_id for a in advise_scaling(needed, node_holdings)) if hot else ()

    return PlanDecision(
        hot=hot_plan,
        pipelines=tuple(
            BandedPipeline(p.key, bands[p.key], p.count, p.component_ids) for p in ranked if bands[p.key] is not Band.COLD
        ),
        nodes=node_plans,
        admitted_ids=tuple(sorted(admitted)),
        cold_min_uses=settings.cold_min_uses,
        scale_out=load_per_worker > settings.scale_out_load,
        preferred_nodes=preferred,
        load_per_worker=load_per_worker,
        fused_keys=fused_keys,
        prefetch_homes=tuple(homes),
        fusions=fusions,
    )
