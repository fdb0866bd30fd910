"""COLD admission."""

from __future__ import annotations

from diffmesh.policy.admission import ColdAdmission


def test_admits_when_room() -> None:
    assert ColdAdmission().admit(0.0, 10, 10, [])


def test_admits_only_over_weaker_victims_when_full() -> None:
    rule = ColdAdmission()
    assert rule.admit(2.0, 10, 0, [1.0, 1.5])
    assert not rule.admit(1.2, 10, 0, [1.0, 1.5])
    assert not rule.admit(5.0, 10, 0, None)
    assert not ColdAdmission(min_ratio=2.0).admit(2.0, 10, 0, [1.5])
