"""Top-K fusion planner."""

from __future__ import annotations

from diffmesh.policy.fusion_plan import overlay_bytes, plan_fusion


def test_top_k_pipelines_with_loras_only() -> None:
    ranked = [("base", 9.0), ("base+l1", 5.0), ("base2", 4.0), ("base+l2", 3.0), ("base+l3", 1.0), ("dead+l4", 0.0)]
    has = lambda k: "+" in k  # noqa: E731
    assert plan_fusion(ranked, has, k=2) == ["base+l1", "base+l2"]
    assert plan_fusion(ranked, has, k=10) == ["base+l1", "base+l2", "base+l3"]
    assert plan_fusion(ranked, has, k=0) == []


def test_overlay_is_a_fraction_of_the_base() -> None:
    assert overlay_bytes(1000, 0.12) == 120
    assert overlay_bytes(1) == 1
