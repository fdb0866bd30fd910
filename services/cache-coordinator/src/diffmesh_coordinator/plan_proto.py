"""The planner's decision as a ``diffmesh.v1.Plan``, and back (for the next pass after a failover)."""

from __future__ import annotations

from diffmesh.pipeline_key import parse_key
from diffmesh.policy.planner import BandedPipeline, FusionPlacement, HotPlacement, NodePlan, PlanDecision
from diffmesh.policy.popularity import Band
from diffmesh.policy_mode import PolicyMode, to_proto
from diffmesh.v1 import common_pb2, plan_pb2

_BANDS = {Band.HOT: plan_pb2.BAND_HOT, Band.WARM: plan_pb2.BAND_WARM, Band.COLD: plan_pb2.BAND_COLD}
_FROM_BANDS = {v: k for k, v in _BANDS.items()}


def pipeline_spec(pipeline_key: str) -> common_pb2.PipelineSpec:
    """The PipelineSpec a canonical key names (ControlNets without images); ValueError for a malformed key."""
    base, loras, controlnets = parse_key(pipeline_key)
    return common_pb2.PipelineSpec(
        base_id=base,
        loras=[common_pb2.LoraRef(id=lid, scale=scale) for lid, scale in loras],
        controlnets=[common_pb2.ControlNetRef(id=cid) for cid in controlnets],
    )


def fusion_spec(pipeline_key: str) -> common_pb2.PipelineSpec:
    """What a fusion target fuses: the base and LoRAs of ``pipeline_key`` (its ControlNets are not fused)."""
    spec = pipeline_spec(pipeline_key)
    spec.ClearField("controlnets")
    return spec


def plan_message(
    decision: PlanDecision | None, mode: PolicyMode, version: int, created_unix: float, decay_per_s: float
) -> plan_pb2.Plan:
    """The Plan of ``decision`` (empty under :attr:`PolicyMode.LRU` or without a decision).

    ``decay_per_s`` is the popularity's decay constant: a decayed count times it is a rate.
    """
    plan = plan_pb2.Plan(version=version, created_unix=created_unix, mode=to_proto(mode))  # type: ignore[arg-type]
    if decision is None or mode is PolicyMode.LRU:
        return plan
    for h in decision.hot:
        entry = plan.hot.add(pipeline_key=h.key, share=h.share, fused_id=h.fused_id)
        entry.pipeline.CopyFrom(pipeline_spec(h.key))
        for node_id, worker_id in h.replicas:
            entry.replicas.add(node_id=node_id, worker_id=worker_id)
    for f in decision.fusions:
        target = plan.fusions.add(pipeline_key=f.key, fused_id=f.fused_id, node_ids=f.node_ids)
        target.pipeline.CopyFrom(fusion_spec(f.key))
    for p in decision.pipelines:
        plan.pipelines.add(
            pipeline_key=p.key, band=_BANDS[p.band], rate_per_s=p.count * decay_per_s, component_ids=p.component_ids
        )
    for n in decision.nodes:
        plan.nodes.add(
            node_id=n.node_id, pinned_ids=n.pinned_ids, prefetch_ids=n.prefetch_ids, fuse_pipeline_keys=n.fuse_pipeline_keys
        )
    plan.admission.admitted_ids.extend(decision.admitted_ids)
    plan.admission.cold_min_uses = decision.cold_min_uses
    plan.scaling.scale_out = decision.scale_out
    plan.scaling.preferred_nodes.extend(decision.preferred_nodes)
    plan.scaling.load_per_worker = decision.load_per_worker
    return plan


def plan_signature(plan: plan_pb2.Plan) -> bytes:
    """The plan without version, time and measurements (rates, shares, load): equal bytes, same decisions."""
    bare = plan_pb2.Plan()
    bare.CopyFrom(plan)
    bare.version = 0
    bare.created_unix = 0.0
    for h in bare.hot:
        h.share = 0.0
    for p in bare.pipelines:
        p.rate_per_s = 0.0
    bare.scaling.load_per_worker = 0.0
    return bare.SerializeToString(deterministic=True)


def decision_of(plan: plan_pb2.Plan, decay_per_s: float) -> PlanDecision:
    """What the planner needs of a stored plan for its next pass (replicas, HOT set, bands, nodes, fusion nodes).

    The WARM prefetch picks' nodes are not in a Plan; they are chosen afresh.
    """
    return PlanDecision(
        hot=tuple(
            HotPlacement(
                h.pipeline_key,
                h.share,
                (),
                tuple((r.node_id, r.worker_id) for r in h.replicas),
                h.fused_id,
            )
            for h in plan.hot
        ),
        pipelines=tuple(
            BandedPipeline(p.pipeline_key, _FROM_BANDS.get(p.band, Band.COLD), p.rate_per_s / decay_per_s, tuple(p.component_ids))
            for p in plan.pipelines
        ),
        nodes=tuple(
            NodePlan(n.node_id, tuple(n.pinned_ids), tuple(n.prefetch_ids), tuple(n.fuse_pipeline_keys)) for n in plan.nodes
        ),
        admitted_ids=tuple(plan.admission.admitted_ids),
        cold_min_uses=plan.admission.cold_min_uses,
        scale_out=plan.scaling.scale_out,
        preferred_nodes=tuple(plan.scaling.preferred_nodes),
        load_per_worker=plan.scaling.load_per_worker,
        fused_keys=tuple(f.pipeline_key for f in plan.fusions),
        fusions=tuple(FusionPlacement(f.pipeline_key, f.fused_id, tuple(f.node_ids)) for f in plan.fusions),
    )
