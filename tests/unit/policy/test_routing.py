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


def test_hops_chain_into_end_to_end_rates() -> None:
    from diffmesh.policy.routing import Bandwidths, Source, component_load_s

    bw = Bandwidths.from_hops(host_bps=10 * GB, ssd_bps=2 * GB, peer_bps=1 * GB, remote_bps=0.25 * GB)
    # HOST: one hop; SSD: SSD→HOST then HOST→device; PEER and REMOTE land on SSD first.
    assert component_load_s(10 * GB, Source.HOST, bw) == 1.0
    assert abs(component_load_s(10 * GB, Source.SSD, bw) - (1.0 + 5.0)) < 1e-9
    assert abs(component_load_s(10 * GB, Source.PEER, bw) - (1.0 + 5.0 + 10.0)) < 1e-9
    assert abs(component_load_s(10 * GB, Source.REMOTE, bw) - (1.0 + 5.0 + 40.0)) < 1e-9
    assert component_load_s(10 * GB, Source.GPU, bw) == 0.0


def test_source_of_prefers_the_worker_then_its_node_then_a_peer() -> None:
    from diffmesh.policy.routing import Source, source_of

    assert source_of(Tier.GPU, True) is Source.GPU
    assert source_of(Tier.HOST, True) is Source.HOST
    assert source_of(Tier.SSD, False) is Source.SSD
    assert source_of(None, True) is Source.PEER
    assert source_of(None, False) is Source.REMOTE


def test_adapters_load_is_pipeline_load_without_the_base() -> None:
    from diffmesh.policy.routing import adapters_load_s

    costs = [9.0, 1.0, 3.0, 2.0]
    needed = (0, 1, 2, 3)
    assert adapters_load_s({2}, costs, needed, asymmetric=True) == pipeline_load_s(0.0, [1.0, 2.0], True) == 2.0
    assert adapters_load_s(set(), costs, needed, asymmetric=False) == pipeline_load_s(0.0, [1.0, 3.0, 2.0], False) == 6.0
    assert adapters_load_s({1, 2, 3}, costs, needed, asymmetric=True) == 0.0


def test_the_formula_scores_arrays_like_floats() -> None:
    import numpy as np

    wait = np.array([0.0, 2.0, 5.0])
    load = np.array([4.0, 0.0, 0.0])
    compute = np.array([1.0, 1.0, 0.5])
    ect = expected_completion_s(wait, load, compute)
    rows = zip(wait.tolist(), load.tolist(), compute.tolist(), strict=True)
    assert ect.tolist() == [expected_completion_s(w, ld, c) for w, ld, c in rows]
    free = np.array([8 * GB, 2 * GB, 24 * GB], dtype=np.int64)
    assert fits(free, 5 * GB, 2 * GB).tolist() == [True, False, True]


def test_band_groups() -> None:
    import numpy as np
    from diffmesh.policy.popularity import Band
    from diffmesh.policy.routing import band_groups

    pool = np.array([True, True, False, False])
    replica = np.array([True, False, False, False])
    # HOT: one group; the pipeline's replicas first on equal ECT.
    group, pref = band_groups(Band.HOT, pool, replica)
    assert group.tolist() == [0, 0, 0, 0] and pref.tolist() == [0, 1, 1, 1]
    # COLD: one group too (pins keep the head safe); off the HOT pool only on equal ECT.
    group, pref = band_groups(Band.COLD, pool, replica)
    assert group.tolist() == [0, 0, 0, 0] and pref.tolist() == [1, 1, 0, 0]
    # WARM: plain ECT.
    group, pref = band_groups(Band.WARM, pool, replica)
    assert group.tolist() == [0, 0, 0, 0] and pref.tolist() == [0, 0, 0, 0]
