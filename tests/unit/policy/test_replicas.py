"""HOT replica planner: targets ∝ load share, persistence, packing."""

from __future__ import annotations

from diffmesh.policy.replicas import HotPipeline, ReplicaSettings, WorkerSlot, plan_hot_replicas, replica_target

GB = 10**9


def slots(n: int, per_node: int = 2, budget: int = 12 * GB) -> list[WorkerSlot]:
    return [WorkerSlot(f"w{i}", f"n{i // per_node}", budget) for i in range(n)]


def test_targets_are_proportional_to_share() -> None:
    assert replica_target(0.5, 8) == 4
    assert replica_target(0.01, 8) == 1  # at least min_replicas
    assert replica_target(0.9, 8, ReplicaSettings(headroom=2.0)) == 8  # capped at the worker count


def test_plan_shares_the_base_and_prefers_the_same_node() -> None:
    hot = [
        HotPipeline("a", 0.5, "B", 5 * GB),
        HotPipeline("a+lora", 0.25, "B", 5 * GB, extra_bytes=GB),
    ]
    plan = plan_hot_replicas(hot, slots(8))
    assert plan["a"] == ["w0", "w1", "w2", "w3"]
    # The LoRA pipeline reuses workers that already pin base B.
    assert plan["a+lora"] == ["w0", "w1"]


def test_plan_is_persistent() -> None:
    hot = [HotPipeline("a", 0.25, "B", 5 * GB)]
    plan = plan_hot_replicas(hot, slots(8), previous={"a": ["w6", "w7"]})
    assert plan["a"] == ["w6", "w7"]
    # A small drop of the target keeps the replicas (shrink slack 1) ...
    plan = plan_hot_replicas([HotPipeline("a", 0.125, "B", 5 * GB)], slots(8), previous={"a": ["w6", "w7"]})
    assert plan["a"] == ["w6", "w7"]
    # ... a large one shrinks.
    plan = plan_hot_replicas([HotPipeline("a", 0.01, "B", 5 * GB)], slots(8), previous={"a": ["w5", "w6", "w7"]})
    assert plan["a"] == ["w5"]


def test_plan_respects_pin_budget() -> None:
    hot = [HotPipeline("big", 0.5, "X", 20 * GB)]
    assert plan_hot_replicas(hot, slots(4, budget=12 * GB)) == {"big": []}


def test_new_replicas_prefer_nodes_that_hold_the_files() -> None:
    hot = [HotPipeline("a", 0.25, "B", 5 * GB, nodes=("n2",))]
    assert plan_hot_replicas(hot, slots(8)) == {"a": ["w4", "w5"]}
