"""Locality ranking (placement v1): hand-computed scores and tie-breaks."""

from __future__ import annotations

from diffmesh.policy.locality import Copy, WorkerCandidate, rank_workers
from diffmesh.tiers import Tier


def _ids(ranked: list) -> list[str]:
    return [r.candidate.worker_id for r in ranked]


def test_gpu_beats_host_beats_ssd_weighted_by_bytes() -> None:
    components = {"base": 1000, "lora": 100}
    w1, w2, w3 = WorkerCandidate("w1", "n1"), WorkerCandidate("w2", "n1"), WorkerCandidate("w3", "n2")
    copies = [
        Copy("base", "n1", Tier.GPU, "w2"),
        Copy("base", "n1", Tier.HOST),
        Copy("lora", "n2", Tier.SSD),
        Copy("lora", "n2", Tier.HOST),
    ]
    ranked = rank_workers(components, [w1, w2, w3], copies)
    # w2: base on its GPU 4*1000; w1: base in its node's HOST 2*1000; w3: lora in HOST (best of SSD/HOST) 2*100.
    assert _ids(ranked) == ["w2", "w1", "w3"]
    assert [r.score for r in ranked] == [4000, 2000, 200]
    assert ranked[0].tiers == {"base": Tier.GPU, "lora": Tier.REMOTE}
    assert ranked[2].tiers == {"base": Tier.REMOTE, "lora": Tier.HOST}


def test_gpu_copy_of_another_worker_and_other_nodes_count_nothing() -> None:
    components = {"base": 500}
    copies = [Copy("base", "n1", Tier.GPU, "w2"), Copy("base", "n2", Tier.HOST), Copy("base", "", Tier.REMOTE)]
    ranked = rank_workers(components, [WorkerCandidate("w1", "n1"), WorkerCandidate("w2", "n1")], copies)
    assert _ids(ranked) == ["w2", "w1"]
    assert [r.score for r in ranked] == [2000, 0]


def test_each_component_counts_once_at_its_best_tier() -> None:
    copies = [Copy("base", "n1", Tier.SSD), Copy("base", "n1", Tier.HOST), Copy("base", "n1", Tier.GPU, "w1")]
    (only,) = rank_workers({"base": 10}, [WorkerCandidate("w1", "n1")], copies)
    assert only.score == 40
    assert only.tiers["base"] == Tier.GPU


def test_locality_beats_queue_length() -> None:
    busy_near = WorkerCandidate("w-near", "n1", queue_length=5)
    idle_far = WorkerCandidate("w-far", "n2", queue_length=0)
    ranked = rank_workers({"base": 1}, [idle_far, busy_near], [Copy("base", "n1", Tier.SSD)])
    assert _ids(ranked) == ["w-near", "w-far"]


def test_ties_go_to_the_shorter_queue_then_the_smaller_id() -> None:
    candidates = [
        WorkerCandidate("c", "n1", queue_length=1),
        WorkerCandidate("b", "n2", queue_length=3),
        WorkerCandidate("a", "n2", queue_length=1),
        WorkerCandidate("a", "n1", queue_length=1),
    ]
    ranked = rank_workers({"base": 100}, candidates, [])
    assert [(r.candidate.worker_id, r.candidate.node_id) for r in ranked] == [("a", "n1"), ("a", "n2"), ("c", "n1"), ("b", "n2")]
    assert {r.score for r in ranked} == {0}


def test_result_does_not_depend_on_input_order() -> None:
    candidates = [WorkerCandidate(f"w{i}", f"n{i % 2}", queue_length=i % 3) for i in range(6)]
    copies = [Copy("base", "n0", Tier.HOST), Copy("lora", "n1", Tier.SSD), Copy("lora", "n1", Tier.GPU, "w3")]
    components = {"base": 300, "lora": 30}
    forward = rank_workers(components, candidates, copies)
    backward = rank_workers(dict(reversed(components.items())), list(reversed(candidates)), list(reversed(copies)))
    assert _ids(forward) == _ids(backward)
    # n0 workers (w0, w2, w4): base HOST = 600; w3: lora GPU = 120; w1, w5: lora SSD = 30.
    assert _ids(forward) == ["w0", "w4", "w2", "w3", "w1", "w5"]


def test_ignores_copies_of_other_components_and_counts_sizeless_records() -> None:
    copies = [Copy("other", "n1", Tier.GPU, "w1"), Copy("lora", "n1", Tier.HOST)]
    (only,) = rank_workers({"lora": 0}, [WorkerCandidate("w1", "n1")], copies)
    assert only.score == 2
    assert set(only.tiers) == {"lora"}


def test_no_candidates_gives_an_empty_ranking() -> None:
    assert rank_workers({"base": 1}, [], [Copy("base", "n1", Tier.HOST)]) == []
