"""Forward decay arithmetic shared by DecayedCounter and the coordinator's Redis counters."""

from __future__ import annotations

import math

import pytest
from diffmesh.policy.popularity import REBASE_EXPONENT, DecayedCounter, decay_rate, forward_growth


def test_growth_factor_and_rebase() -> None:
    lam = decay_rate(100.0)
    assert lam == pytest.approx(math.log(2) / 100)
    g = forward_growth(lam, 200.0, 100.0)
    assert g.factor == pytest.approx(2.0) and g.ref == 100.0 and g.shrink is None
    far = 100.0 + (REBASE_EXPONENT + 1) / lam
    rebased = forward_growth(lam, far, 100.0)
    assert rebased.factor == 1.0 and rebased.ref == far
    assert rebased.shrink == pytest.approx(math.exp(-(REBASE_EXPONENT + 1)))
    with pytest.raises(ValueError):
        decay_rate(0.0)


def test_decayed_counter_survives_a_rebase() -> None:
    counter: DecayedCounter[str] = DecayedCounter(1.0)
    counter.add("a", 0.0, 1.0)
    t = 2 * REBASE_EXPONENT / math.log(2)  # far past the rebase point
    counter.add("b", t, 3.0)
    assert counter.count("b", t) == pytest.approx(3.0)
    assert counter.count("a", t) == pytest.approx(0.0, abs=1e-100)
