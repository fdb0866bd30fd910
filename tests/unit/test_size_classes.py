"""size_classes: exact weighted 1-D k-means over component sizes (hand-computed cases)."""

from __future__ import annotations

import math

import pytest
from diffmesh_instance_manager.size_classes import BLOCK_GRANULARITY, SizeClass, request_share_weights, round_up, size_classes

MiB = 1024 * 1024


def test_two_obvious_clusters_round_up_to_2_mib() -> None:
    classes = size_classes([1 * MiB, 2 * MiB, 3 * MiB, 10 * MiB, 11 * MiB, 12 * MiB], k=2)
    assert classes == [
        SizeClass(block_size=4 * MiB, weight=0.5, members=3, mean_size=2 * MiB),
        SizeClass(block_size=12 * MiB, weight=0.5, members=3, mean_size=11 * MiB),
    ]


def test_weights_move_the_split() -> None:
    # Points 0, 5, 10 (granularity 1). Weights (1, 1, 10): {0,5} | {10} costs 12.5 vs 22.7
    # for {0} | {5,10}; weights (10, 1, 1) mirror it.
    heavy_right = size_classes([0, 5, 10], [1, 1, 10], k=2, granularity=1)
    assert [(c.block_size, c.members) for c in heavy_right] == [(5, 2), (10, 1)]
    assert heavy_right[1].weight == pytest.approx(10 / 12)
    assert heavy_right[0].mean_size == pytest.approx(2.5)
    heavy_left = size_classes([0, 5, 10], [10, 1, 1], k=2, granularity=1)
    assert [(c.block_size, c.members) for c in heavy_left] == [(1, 1), (10, 2)]
    assert heavy_left[1].mean_size == pytest.approx(7.5)


def test_optimum_beats_a_greedy_split() -> None:
    # Sizes 1,2,3,4,100,101 with k=3: the optimum isolates {100,101} and splits 1..4 in two.
    classes = size_classes([1, 2, 3, 4, 100, 101], k=3, granularity=1)
    assert [c.block_size for c in classes] == [2, 4, 101]
    assert [c.members for c in classes] == [2, 2, 2]


def test_sd15_like_catalog_gives_five_classes_that_hold_every_member() -> None:
    lora = 3 * MiB + 12345
    unet = 1_719_125_304
    sizes = [lora] * 40 + [unet] * 8 + [160 * MiB, 330 * MiB, 335 * MiB, 1_300_000_000]
    weights = [0.02] * 40 + [0.02] * 8 + [0.01, 0.01, 0.01, 0.01]
    classes = size_classes(sizes, weights)
    assert len(classes) == 5
    assert math.isclose(sum(c.weight for c in classes), 1.0)
    assert sum(c.members for c in classes) == len(sizes)
    assert [c.block_size for c in classes] == sorted(c.block_size for c in classes)
    for c in classes:
        assert c.block_size % BLOCK_GRANULARITY == 0
    for s in sizes:
        assert any(c.block_size >= s for c in classes)
    assert classes[0].block_size == round_up(lora)
    assert classes[-1].block_size == round_up(unet)


def test_fewer_distinct_sizes_than_k_and_merged_rounding() -> None:
    assert [c.block_size for c in size_classes([7 * MiB] * 5, k=5)] == [8 * MiB]
    # 1 MiB and 1.5 MiB both round to 2 MiB: one class with both members.
    classes = size_classes([MiB, 3 * MiB // 2, 9 * MiB], k=3)
    assert [(c.block_size, c.members) for c in classes] == [(2 * MiB, 2), (10 * MiB, 1)]
    assert classes[0].weight == pytest.approx(2 / 3)


def test_deterministic_and_order_independent() -> None:
    sizes = [5 * MiB, 900 * MiB, 3 * MiB, 40 * MiB, 41 * MiB, 3 * MiB, 1700 * MiB]
    weights = [3.0, 1.0, 5.0, 2.0, 2.0, 1.0, 4.0]
    a = size_classes(sizes, weights, k=4)
    b = size_classes(list(reversed(sizes)), list(reversed(weights)), k=4)
    assert a == b


def test_all_zero_weights_mean_equal_weights() -> None:
    assert size_classes([MiB, 50 * MiB], [0.0, 0.0], k=2) == size_classes([MiB, 50 * MiB], k=2)


@pytest.mark.parametrize(
    ("sizes", "weights", "k", "message"),
    [
        ([], None, 5, "no component sizes"),
        ([1, 2], [1.0], 5, "2 sizes but 1 weights"),
        ([-1], None, 5, "size must be >= 0"),
        ([1], [float("nan")], 5, "finite"),
        ([1], [-1.0], 5, "finite"),
        ([1], None, 0, "k must be >= 1"),
    ],
)
def test_bad_input(sizes: list[int], weights: list[float] | None, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        size_classes(sizes, weights, k=k)


def test_request_share_weights_blend_the_share_with_an_even_prior() -> None:
    # Shares 3/4, 1/4, 0 of 4 requests; 10 % spread evenly over the three components.
    assert request_share_weights([3, 1, 0]) == pytest.approx([0.9 * 0.75 + 0.1 / 3, 0.9 * 0.25 + 0.1 / 3, 0.1 / 3])
    assert sum(request_share_weights([5, 0, 2, 9])) == pytest.approx(1.0)
    assert request_share_weights([0, 0]) == [0.5, 0.5]  # nothing recorded yet: equal
    assert request_share_weights([]) == []
    assert request_share_weights([1, 0], prior=0.0) == [1.0, 0.0]
    for bad, prior in (([-1.0], 0.1), ([math.inf], 0.1), ([1.0], 1.5)):
        with pytest.raises(ValueError):
            request_share_weights(bad, prior=prior)


def test_request_shares_move_pool_capacity_to_the_hot_class() -> None:
    from diffmesh_instance_manager.pool import plan_slabs

    sizes = [1000, 1000, 3_200_300]
    equal = size_classes(sizes, None, k=2)
    hot = size_classes(sizes, request_share_weights([0, 0, 50]), k=2)
    assert [c.block_size for c in equal] == [c.block_size for c in hot] == [2 * MiB, 4 * MiB]
    assert plan_slabs(24 * MiB, equal) == [6, 3]
    assert plan_slabs(24 * MiB, hot) == [2, 5]
