"""The planner: bands, HOT replicas with pin budgets and fusion, node directives, prefetch, admission, scaling."""

from __future__ import annotations

from collections.abc import Sequence

from diffmesh.policy.fusion_plan import overlay_bytes
from diffmesh.policy.planner import PipelineDemand, PlanInputs, PlannerSettings, PlanWorker, extra_bytes, plan
from diffmesh.policy.popularity import Band, BandThresholds
from diffmesh.tiers import Tier

GB = 10**9
SIZES = {"B": 4 * GB, "L1": GB // 10, "L2": GB // 10, "C": GB, "W": 2 * GB, "X": GB, "Y": GB, "Z": GB}


def demands() -> list[PipelineDemand]:
    return [
        PipelineDemand("B|L1@1.00|", 50.0, ("B", "L1"), ("L1",)),
        PipelineDemand("W||", 10.0, ("W",)),
        PipelineDemand("B|L2@0.50|C", 5.0, ("B", "L2", "C"), ("L2",)),
        *(PipelineDemand(f"{c}||", 1.0, (c,)) for c in ("X", "Y", "Z")),
    ]


def workers(n_nodes: int = 2, per_node: int = 2, memory: int = 24 * GB) -> list[PlanWorker]:
    return [PlanWorker(f"n{i}", f"w{j}", memory) for i in range(n_nodes) for j in range(per_node)]


def fused(key: str) -> str:
    return f"fused:{key}"


def inputs(**overrides: object) -> PlanInputs:
    values: dict[str, object] = {
        "pipelines": demands(),
        "component_bytes": SIZES,
        "workers": workers(),
        "nodes": ["n0", "n1"],
        "fused_id_of": fused,
    }
    values.update(overrides)
    return PlanInputs(**values)  # type: ignore[arg-type]


def test_bands_fusion_replicas_and_pins() -> None:
    decision = plan(inputs())
    # 6 ranked: 1 HOT (ceil 0.3), WARM up to ceil(1.8) = 2
    assert [(p.key, p.band) for p in decision.pipelines] == [("B|L1@1.00|", Band.HOT), ("W||", Band.WARM)]
    (hot,) = decision.hot
    assert hot.key == "B|L1@1.00|"
    assert hot.fused_id == "fused:B|L1@1.00|"
    assert hot.share == 50 / 68
    assert len(hot.replicas) == 3  # round(50/68 x 4)
    assert decision.fused_keys == ("B|L1@1.00|", "B|L2@0.50|C")
    pinned = {n.node_id: n.pinned_ids for n in decision.nodes}
    hosts = {node for node, _ in hot.replicas}
    for node in ("n0", "n1"):
        expected = ("B", "L1", "fused:B|L1@1.00|") if node in hosts else ()
        assert pinned[node] == expected
    # Every fusion target gets its nodes: the HOT one its replicas' nodes; the COLD one, whose base no
    # node holds, the node with the fewest fusions (a tie here: the first node).
    assert [(f.key, f.fused_id, f.node_ids) for f in decision.fusions] == [
        ("B|L1@1.00|", "fused:B|L1@1.00|", ("n0", "n1")),
        ("B|L2@0.50|C", "fused:B|L2@0.50|C", ("n0",)),
    ]
    assert hosts == {"n0", "n1"}
    assert {n.node_id: n.fuse_pipeline_keys for n in decision.nodes} == {
        "n0": ("B|L1@1.00|", "B|L2@0.50|C"),
        "n1": ("B|L1@1.00|",),
    }
    assert decision.admitted_ids == ("B", "L1", "W", "fused:B|L1@1.00|", "fused:B|L2@0.50|C")
    assert decision.cold_min_uses == 2


def warm_with_loras() -> list[PipelineDemand]:
    """One HOT pipeline without LoRAs, a WARM one with LoRAs, four COLD ones."""
    return [
        PipelineDemand("W||", 50.0, ("W",)),
        PipelineDemand("B|L1@1.00|", 10.0, ("B", "L1"), ("L1",)),
        *(PipelineDemand(f"{c}||", 1.0, (c,)) for c in ("C", "X", "Y", "Z")),
    ]


def test_a_warm_pipeline_with_loras_is_fused_on_the_node_holding_its_base() -> None:
    decision = plan(inputs(pipelines=warm_with_loras(), holdings={"n1": {"B": Tier.SSD}}))
    assert [(p.key, p.band) for p in decision.pipelines] == [("W||", Band.HOT), ("B|L1@1.00|", Band.WARM)]
    assert decision.hot[0].fused_id == ""  # no LoRAs: nothing to fuse
    assert [(f.key, f.fused_id, f.node_ids) for f in decision.fusions] == [("B|L1@1.00|", "fused:B|L1@1.00|", ("n1",))]
    assert {n.node_id: n.fuse_pipeline_keys for n in decision.nodes} == {"n0": (), "n1": ("B|L1@1.00|",)}
    assert "fused:B|L1@1.00|" in decision.admitted_ids
    assert all("fused:B|L1@1.00|" not in n.pinned_ids for n in decision.nodes)  # only HOT replicas pin

    # the base shows up on n0 as well: the target stays on n1, the plan does not change
    both = {"n0": {"B": Tier.HOST}, "n1": {"B": Tier.SSD}}
    again = plan(inputs(pipelines=warm_with_loras(), holdings=both, previous=decision))
    assert again.signature() == decision.signature()
    # without a previous plan every node holding the base derives it; with none holding it, the first node
    assert plan(inputs(pipelines=warm_with_loras(), holdings=both)).fusions[0].node_ids == ("n0", "n1")
    assert plan(inputs(pipelines=warm_with_loras())).fusions[0].node_ids == ("n0",)
    # n1 left: its target moves to a live node
    alone = plan(inputs(pipelines=warm_with_loras(), nodes=["n0"], workers=workers(1), previous=decision))
    assert alone.fusions[0].node_ids == ("n0",)


def test_no_fusion_without_top_k() -> None:
    decision = plan(inputs(pipelines=warm_with_loras()), PlannerSettings(fusion_top_k=0))
    assert decision.fusions == () and all(not n.fuse_pipeline_keys for n in decision.nodes)


def test_pin_budget_limits_replicas() -> None:
    # 4 GB base + overlay per replica; a 9 GB worker at 0.5 pins 4.5 GB: one replica fits per worker.
    decision = plan(inputs(workers=workers(memory=9 * GB)))
    assert len(decision.hot[0].replicas) == 3
    decision = plan(inputs(workers=workers(memory=8 * GB)))  # 4 GB budget: nothing fits
    assert decision.hot[0].replicas == ()
    assert all(not n.pinned_ids for n in decision.nodes)


def test_extra_bytes_counts_the_overlay_instead_of_the_loras() -> None:
    p = PipelineDemand("B|L2@0.50|C", 5.0, ("B", "L2", "C"), ("L2",))
    assert extra_bytes(p, SIZES, fused=False) == GB // 10 + GB
    assert extra_bytes(p, SIZES, fused=True) == overlay_bytes(4 * GB) + GB


def test_previous_replicas_persist_and_departed_workers_are_dropped() -> None:
    first = plan(inputs())
    again = plan(inputs(previous=first))
    assert again.signature() == first.signature()
    gone = first.hot[0].replicas[0]
    fewer = [w for w in workers() if w.key != gone]
    after = plan(inputs(workers=fewer, previous=first))
    assert gone not in after.hot[0].replicas
    assert set(first.hot[0].replicas) - {gone} <= set(after.hot[0].replicas)


def test_hysteresis_keeps_the_previous_hot_pipeline() -> None:
    settings = PlannerSettings(thresholds=BandThresholds(hysteresis=1.0))
    first = plan(inputs(), settings)
    swapped = [demands()[1], demands()[0], *demands()[2:]]  # W||'s count now ranks first
    after = plan(inputs(pipelines=swapped, previous=first), settings)
    assert {h.key for h in after.hot} == {"W||", "B|L1@1.00|"}


def test_pipelines_naming_unknown_components_are_not_planned() -> None:
    sizes = {k: v for k, v in SIZES.items() if k != "L1"}
    decision = plan(inputs(component_bytes=sizes))
    assert "B|L1@1.00|" not in {p.key for p in decision.pipelines}
    assert decision.hot[0].key == "W||"


def test_prefetch_picks_go_to_the_node_holding_their_bytes_and_stay() -> None:
    offered: list[Sequence[str]] = []

    def choose(warm: Sequence[str]) -> Sequence[str]:
        offered.append(list(warm))
        return list(warm)

    holdings = {"n1": {"W": Tier.SSD}}
    decision = plan(inputs(holdings=holdings, choose_prefetch=choose))
    assert offered == [["W||"]]
    assert decision.prefetch_homes == (("W||", "n1"),)
    assert {n.node_id: n.prefetch_ids for n in decision.nodes} == {"n0": (), "n1": ("W",)}
    # the copy now sits on n0 as well, in HOST: the pick stays where it was
    moved = plan(inputs(holdings={"n0": {"W": Tier.HOST}}, choose_prefetch=choose, previous=decision))
    assert moved.prefetch_homes == (("W||", "n1"),)


def test_scaling_advice_follows_load_and_holdings() -> None:
    busy = [PlanWorker(w.node_id, w.worker_id, w.device_memory_bytes, load=3.0) for w in workers()]
    decision = plan(inputs(workers=busy, holdings={"n1": {"B": Tier.HOST}}))
    assert decision.scale_out
    assert decision.load_per_worker == 3.0
    assert decision.preferred_nodes == ("n1", "n0")
    idle = plan(inputs())
    assert not idle.scale_out
    assert plan(inputs(pipelines=[])).preferred_nodes == ()


def test_signature_ignores_measurements() -> None:
    first = plan(inputs())
    scaled = [PipelineDemand(p.key, p.count * 1.01, p.component_ids, p.lora_ids) for p in demands()]
    assert plan(inputs(pipelines=scaled, previous=first)).signature() == first.signature()
