"""WARM bandit prefetcher per time-of-day bucket."""

from __future__ import annotations

from diffmesh.policy.prefetch import BanditPrefetcher, time_bucket


def test_time_bucket() -> None:
    assert time_bucket(0.0) == 0
    assert time_bucket(3600.0 * 5 + 10) == 5
    assert time_bucket(86400.0 + 3600.0 * 23) == 23
    assert time_bucket(1800.0, bucket_s=900.0) == 2


def test_rewards_update_the_arm_of_that_bucket_only() -> None:
    b: BanditPrefetcher[str] = BanditPrefetcher(seed=1)
    b.reward(3, "x", True)
    b.reward(3, "x", True)
    b.reward(3, "x", False)
    assert b.posterior(3, "x") == (3.0, 2.0)
    assert b.mean(3, "x") == 0.6
    assert b.posterior(4, "x") == (1.0, 1.0)


def test_learned_arms_win_and_selection_is_deterministic() -> None:
    b: BanditPrefetcher[str] = BanditPrefetcher(seed=7)
    for _ in range(50):
        b.reward(0, "good", True)
        b.reward(0, "bad", False)
    assert b.select(0, ["bad", "good"], 1) == ["good"]
    again: BanditPrefetcher[str] = BanditPrefetcher(seed=7)
    fresh: BanditPrefetcher[str] = BanditPrefetcher(seed=7)
    assert again.select(2, list("abcdef"), 3) == fresh.select(2, list("abcdef"), 3)
    assert b.select(0, [], 3) == []
