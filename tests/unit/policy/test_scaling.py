"""Scaling advice."""

from __future__ import annotations

import pytest
from diffmesh.policy.scaling import advise_scaling
from diffmesh.tiers import Tier


def test_prefers_nodes_whose_tiers_hold_the_components() -> None:
    needed = {"base": 20.0, "lora": 4.0}
    holdings = {"n1": {"base": Tier.SSD}, "n2": {"base": Tier.HOST, "lora": Tier.HOST}, "n3": {}}
    advice = advise_scaling(needed, holdings, load={"n2": 0.9})
    assert [a.node_id for a in advice] == ["n2", "n1", "n3"]
    assert advice[0].saved_s == pytest.approx(24.0)
    assert advice[1].saved_s == pytest.approx(16.0)


def test_ties_go_to_the_less_loaded_node() -> None:
    advice = advise_scaling({"x": 1.0}, {"a": {}, "b": {}}, load={"a": 0.5, "b": 0.1})
    assert [a.node_id for a in advice] == ["b", "a"]
