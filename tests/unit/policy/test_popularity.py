"""Decayed counters and popularity bands, against hand-computed values."""

from __future__ import annotations

import math

import pytest
from diffmesh.policy.popularity import Band, BandThresholds, DecayedCounter, assign_bands, band_sizes


def test_count_halves_every_half_life_and_adds_one_per_request() -> None:
    c: DecayedCounter[str] = DecayedCounter(half_life_s=10.0)
    c.add("a", 0.0)
    c.add("a", 0.0)
    assert c.count("a", 0.0) == pytest.approx(2.0)
    assert c.count("a", 10.0) == pytest.approx(1.0)
    assert c.add("a", 20.0) == pytest.approx(1.5)  # 2 * 1/4 + 1
    assert c.count("missing", 5.0) == 0.0


def test_rate_is_count_over_mean_lifetime() -> None:
    c: DecayedCounter[str] = DecayedCounter(half_life_s=100.0)
    c.add("a", 0.0, amount=10.0)
    assert c.rate("a", 0.0) == pytest.approx(10.0 * math.log(2) / 100.0)


def test_ranked_orders_by_decayed_count() -> None:
    c: DecayedCounter[str] = DecayedCounter(half_life_s=10.0)
    c.add("old", 0.0, amount=3.0)  # 0.75 at t=20
    c.add("new", 20.0)  # 1.0 at t=20
    assert [k for k, _ in c.ranked(20.0)] == ["new", "old"]
    assert c.prune(20.0, min_count=0.8) == 1
    assert "old" not in c


def test_band_sizes_round_up_and_partition() -> None:
    assert band_sizes(100, BandThresholds()) == (5, 25)
    assert band_sizes(10, BandThresholds()) == (1, 2)  # ceil(0.5)=1 hot, ceil(3.0)-1=2 warm
    assert band_sizes(0, BandThresholds()) == (0, 0)


def test_assign_bands_by_rank() -> None:
    keys = [f"p{i}" for i in range(20)]
    bands = assign_bands(keys)
    assert bands["p0"] is Band.HOT
    assert [bands[f"p{i}"] for i in range(1, 6)] == [Band.WARM] * 5
    assert bands["p6"] is Band.COLD


def test_thresholds_are_validated() -> None:
    with pytest.raises(ValueError):
        BandThresholds(hot_fraction=0.8, warm_fraction=0.5)


def test_hot_keys_are_sticky_within_the_hysteresis() -> None:
    keys = [f"p{i}" for i in range(40)]  # 2 HOT; sticky down to rank ceil(2 * 1.5) = 3
    sticky = BandThresholds(hysteresis=0.5)
    assert assign_bands(keys, sticky, previous_hot={"p2"})["p2"] is Band.HOT
    assert assign_bands(keys, sticky, previous_hot={"p3"})["p3"] is Band.WARM
    assert assign_bands(keys, sticky)["p2"] is Band.WARM
    assert assign_bands(keys, previous_hot={"p2"})["p2"] is Band.WARM  # default: no hysteresis


def test_counts_stay_exact_across_reference_rebasing() -> None:
    # 10,000 half-lives: the scaled representation rebases many times; counts match the
    # closed form (a request every half-life: count -> 2).
    c: DecayedCounter[str] = DecayedCounter(half_life_s=1.0)
    for k in range(10_000):
        c.add("a", float(k))
    assert c.count("a", 9_999.0) == pytest.approx(2.0, rel=1e-9)
    assert c.count("a", 10_001.0) == pytest.approx(0.5, rel=1e-9)


def test_add_many_equals_add() -> None:
    a: DecayedCounter[int] = DecayedCounter(half_life_s=5.0)
    b: DecayedCounter[int] = DecayedCounter(half_life_s=5.0)
    for t in (0.0, 1.0, 7.5):
        a.add_many((1, 2), t)
        b.add(1, t)
        b.add(2, t)
    assert a.count(1, 9.0) == pytest.approx(b.count(1, 9.0))
    assert [k for k, _ in a.ranked(9.0)] == [k for k, _ in b.ranked(9.0)]
    assert [v for _, v in a.ranked(9.0)] == pytest.approx([v for _, v in b.ranked(9.0)])


def test_earlier_time_counts_at_the_last_update() -> None:
    c: DecayedCounter[str] = DecayedCounter(half_life_s=10.0)
    c.add("a", 10.0)
    assert c.add("a", 5.0) == pytest.approx(2.0)
    assert c.count("a", 20.0) == pytest.approx(1.0)
