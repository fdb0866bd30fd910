"""Expected-completion-time routing with the device-memory constraint."""

from __future__ import annotations

from diffmesh.policy.routing import (
    WorkerEstimate,
    activation_bytes,
    best_tier_cost,
    choose_worker,
    expected_completion_s,
    fits,
    pipeline_load_s,
    rank_candidates,
)
from diffmesh.tiers import Tier

GB = 10**9


def test_activation_bytes_scale_with_pixels_and_images() -> None:
    assert activation_bytes(4, 512, 512, GB, 512) == 4 * GB
    assert activation_bytes(1, 1024, 1024, GB, 512) == 4 * GB
    assert fits(24 * GB, 20 * GB, 4 * GB)
    assert not fits(24 * GB, 20 * GB, 4 * GB + 1)


def test_best_tier_and_load_time() -> None:
    costs = {Tier.HOST: 1.0, Tier.SSD: 3.0, Tier.REMOTE: 20.0}
    assert best_tier_cost(costs, [Tier.SSD, Tier.HOST]) == (Tier.HOST, 1.0)
    assert best_tier_cost(costs, [Tier.GPU]) == (Tier.GPU, 0.0)
    assert best_tier_cost(costs, []) == (Tier.REMOTE, 20.0)
    assert pipeline_load_s(5.0, [1.0, 2.0], asymmetric=True) == 7.0
    assert pipeline_load_s(5.0, [1.0, 2.0], asymmetric=False) == 8.0
    assert expected_completion_s(2.0, 3.0, 4.0) == 9.0


def test_choose_worker_minimises_ect_over_workers_that_fit() -> None:
    rows = [
        ("busy-warm", 10.0, 0.0, 24 * GB),  # ECT 16
        ("idle-cold", 0.0, 22.0, 24 * GB),  # ECT 28
        ("idle-host", 0.0, 2.0, 24 * GB),  # ECT 8 but ...
        ("pinned", 0.0, 0.0, 6 * GB),  # does not fit 5 GB weights + 2 GB activations
    ]
    assert choose_worker(rows, 5 * GB, 2 * GB, 6.0) == ("idle-host", 8.0)
    assert choose_worker(rows[3:], 5 * GB, 2 * GB, 6.0) is None


def test_rank_candidates() -> None:
    cands = [WorkerEstimate("b", 1.0, 0.0, 24 * GB), WorkerEstimate("a", 0.0, 1.0, 24 * GB), WorkerEstimate("c", 0.0, 0.0, GB)]
    assert [c.worker_id for c in rank_candidates(cands, 2 * GB, 0, 1.0)] == ["a", "b"]
