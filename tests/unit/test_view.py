"""The view replica's apply logic (:class:`diffmesh.view.View`): snapshots, residency, loads, plans, live sets."""

from __future__ import annotations

from diffmesh.policy.popularity import Band
from diffmesh.policy_mode import PolicyMode
from diffmesh.tiers import Tier
from diffmesh.v1 import common_pb2, plan_pb2
from diffmesh.view import ChangeKind, View, ViewChange

GPU, HOST, SSD = common_pb2.TIER_GPU, common_pb2.TIER_HOST, common_pb2.TIER_SSD


def live(*nodes: tuple[str, tuple[str, ...]], memory: int = 1000) -> plan_pb2.LiveSet:
    out = plan_pb2.LiveSet()
    for node_id, workers in nodes:
        n = out.nodes.add(node_id=node_id, instance_manager_address=f"{node_id}:1")
        for w in workers:
            n.workers.add(worker_id=w, address=f"{node_id}-{w}:2", device_memory_bytes=memory)
    return out


def residency(node: str, worker: str, *copies: tuple[str, int, bool, int], full: bool = False) -> plan_pb2.ResidencyChange:
    change = plan_pb2.ResidencyChange(node_id=node, worker_id=worker, full_snapshot=full)
    for cid, tier, present, nbytes in copies:
        change.copies.add(component_id=cid, tier=tier, present=present, bytes=nbytes)  # type: ignore[arg-type]
    return change


def load(node: str, worker: str, queue: int, measured: float, free: int = 500) -> plan_pb2.WorkerLoad:
    return plan_pb2.WorkerLoad(
        worker=plan_pb2.WorkerRef(node_id=node, worker_id=worker),
        queue_length=queue,
        running=1,
        device_memory_free_bytes=free,
        device_memory_total_bytes=1000,
        max_queue=2,
        measured_unix=measured,
    )


def plan(version: int, *, replicas: tuple[tuple[str, str], ...] = (), fused: str = "") -> plan_pb2.Plan:
    p = plan_pb2.Plan(version=version, mode=plan_pb2.POLICY_MODE_DIFFMESH)
    hot = p.hot.add(
        pipeline_key="base|lora@1.00|",
        pipeline=common_pb2.PipelineSpec(base_id="base", loras=[common_pb2.LoraRef(id="lora", scale=1.0)]),
        share=0.5,
        fused_id=fused,
    )
    for node, worker in replicas:
        hot.replicas.add(node_id=node, worker_id=worker)
    p.pipelines.add(pipeline_key="base|lora@1.00|", band=plan_pb2.BAND_HOT, rate_per_s=2.0)
    p.pipelines.add(pipeline_key="base||", band=plan_pb2.BAND_WARM, rate_per_s=0.5)
    return p


def snapshot_event(event_id: str = "1-0") -> plan_pb2.ViewEvent:
    snap = plan_pb2.ViewSnapshot(live=live(("n1", ("w1", "w2")), ("n2", ("w1",))), plan=plan(3, replicas=(("n1", "w2"),)))
    snap.residency.append(residency("n1", "", ("base", HOST, True, 100), ("lora", SSD, True, 10), full=True))
    snap.residency.append(residency("n1", "w2", ("base", GPU, True, 100), full=True))
    snap.loads.append(load("n1", "w1", 1, 10.0))
    return plan_pb2.ViewEvent(event_id=event_id, snapshot=snap)


def test_snapshot_builds_every_index() -> None:
    view = View()
    assert not view.synced
    assert view.apply(snapshot_event()) is ChangeKind.SNAPSHOT
    assert view.synced and view.last_event_id == "1-0"
    assert view.worker_keys == (("n1", "w1"), ("n2", "w1"), ("n1", "w2"))  # by worker id, then node id
    assert view.workers[("n1", "w2")].address == "n1-w2:2"
    assert view.nodes["n2"].instance_manager_address == "n2:1"
    assert dict(view.copies("base")) == {("n1", "", Tier.HOST): 100, ("n1", "w2", Tier.GPU): 100}
    assert view.reporter_bytes("n1", "w2") == 100
    assert view.loads[("n1", "w1")].queue_length == 1
    assert view.plan.version == 3 and view.plan.mode is PolicyMode.DIFFMESH
    assert view.plan.band("base|lora@1.00|") is Band.HOT
    assert view.plan.band("base||") is Band.WARM
    assert view.plan.band("other||") is Band.COLD
    assert view.plan.hot_pool == frozenset({("n1", "w2")})
    assert view.plan.pinned[("n1", "w2")] == frozenset({"base", "lora"})


def test_residency_deltas_and_full_snapshots() -> None:
    view = View()
    view.apply(snapshot_event())
    seen: list[ViewChange] = []
    view.add_listener(seen.append)
    view.apply(plan_pb2.ViewEvent(event_id="2-0", residency=residency("n2", "w1", ("lora", GPU, True, 10))))
    assert ("n2", "w1", Tier.GPU) in view.copies("lora")
    assert seen[-1] == ViewChange(ChangeKind.RESIDENCY, (("n2", "w1"),), ("lora",))
    # A delta that removes one copy leaves the others.
    view.apply(plan_pb2.ViewEvent(event_id="3-0", residency=residency("n1", "", ("lora", SSD, False, 10))))
    assert dict(view.copies("lora")) == {("n2", "w1", Tier.GPU): 10}
    # A full snapshot replaces everything the reporter held.
    view.apply(plan_pb2.ViewEvent(event_id="4-0", residency=residency("n1", "", ("lora", HOST, True, 10), full=True)))
    assert ("n1", "", Tier.HOST) not in view.copies("base")
    assert dict(view.copies("lora")) == {("n2", "w1", Tier.GPU): 10, ("n1", "", Tier.HOST): 10}
    assert set(seen[-1].components) == {"base", "lora"}
    assert view.last_event_id == "4-0" and view.events_applied == 4


def test_loads_keep_the_newest_measurement() -> None:
    view = View()
    view.apply(snapshot_event())
    view.apply(plan_pb2.ViewEvent(event_id="2-0", load=load("n1", "w1", 2, 12.0)))
    view.apply(plan_pb2.ViewEvent(event_id="3-0", load=load("n1", "w1", 0, 11.0)))  # measured earlier: ignored
    assert view.loads[("n1", "w1")].queue_length == 2


def test_a_stale_plan_is_ignored() -> None:
    view = View()
    view.apply(snapshot_event())
    view.apply(plan_pb2.ViewEvent(event_id="2-0", plan=plan(2, replicas=(("n2", "w1"),))))
    assert view.plan.version == 3 and view.plan.hot_pool == frozenset({("n1", "w2")})
    view.apply(plan_pb2.ViewEvent(event_id="3-0", plan=plan(4, replicas=(("n2", "w1"),), fused="fused-x")))
    assert view.plan.version == 4 and view.plan.hot["base|lora@1.00|"].fused_id == "fused-x"
    assert "fused-x" in view.plan.pinned[("n2", "w1")]
    assert view.plan.fused_id("base|lora@1.00|") == "fused-x"


def test_fusion_targets_of_any_band_name_their_overlay() -> None:
    view = View()
    view.apply(snapshot_event())
    assert view.plan.fused_id("base|lora@1.00|") == ""  # HOT but not fused
    p = plan(4)
    p.pipelines.add(pipeline_key="base|warm@0.50|", band=plan_pb2.BAND_WARM, rate_per_s=0.3)
    target = p.fusions.add(pipeline_key="base|warm@0.50|", fused_id="fused-warm", node_ids=["n1"])
    target.pipeline.base_id = "base"
    target.pipeline.loras.add(id="warm", scale=0.5)
    view.apply(plan_pb2.ViewEvent(event_id="2-0", plan=p))
    assert view.plan.band("base|warm@0.50|") is Band.WARM
    assert view.plan.fused_id("base|warm@0.50|") == "fused-warm"
    assert "base|warm@0.50|" not in view.plan.hot and not view.plan.pinned  # fused, neither HOT nor pinned
    assert view.plan.fused_id("base||") == ""


def test_leaving_the_live_set_drops_copies_and_loads() -> None:
    view = View()
    view.apply(snapshot_event())
    before = view.live_version
    view.apply(plan_pb2.ViewEvent(event_id="2-0", live=live(("n2", ("w1",)))))
    assert view.live_version > before
    assert view.worker_keys == (("n2", "w1"),)
    assert view.copies("base") == {}
    assert view.loads == {}
    # A worker that joins gets no phantom copies and its residency is applied.
    view.apply(plan_pb2.ViewEvent(event_id="3-0", live=live(("n2", ("w1", "w9")))))
    view.apply(plan_pb2.ViewEvent(event_id="4-0", residency=residency("n2", "w9", ("base", GPU, True, 100))))
    assert dict(view.copies("base")) == {("n2", "w9", Tier.GPU): 100}


def test_a_new_snapshot_replaces_the_state() -> None:
    view = View()
    view.apply(snapshot_event())
    view.apply(plan_pb2.ViewEvent(event_id="2-0", residency=residency("n2", "w1", ("x", GPU, True, 1))))
    empty = plan_pb2.ViewSnapshot(live=live(("n3", ("w1",))))
    view.apply(plan_pb2.ViewEvent(event_id="9-0", snapshot=empty))
    assert view.worker_keys == (("n3", "w1"),)
    assert view.copies("x") == {} and view.copies("base") == {}
    assert view.plan.version == 0 and view.snapshots_applied == 2


def test_unknown_tiers_and_listener_errors_do_not_break_the_view() -> None:
    view = View()
    view.apply(snapshot_event())

    def broken(change: ViewChange) -> None:
        raise RuntimeError("listener bug")

    view.add_listener(broken)
    change = residency("n1", "w1", ("y", 99, True, 1), ("z", GPU, True, 2))
    view.apply(plan_pb2.ViewEvent(event_id="2-0", residency=change))
    assert view.copies("y") == {} and dict(view.copies("z")) == {("n1", "w1", Tier.GPU): 2}
