"""COLD admission into the instance manager's HOST tier (the plan's AdmissionRule over the shared ColdAdmission)."""

from __future__ import annotations

from diffmesh_instance_manager.admission import HostAdmission
from diffmesh_instance_manager.eviction import Popularity


def _fits(nbytes: int) -> tuple[bool, list[str] | None]:
    return True, []


def test_without_a_rule_every_copy_is_kept() -> None:
    adm = HostAdmission(Popularity())
    adm.record_use("x")
    assert adm.keeps("x", 10, _fits, 0.0) and adm.refused == 0


def test_cold_copies_are_kept_once_used_often_enough_and_admitted_ones_always() -> None:
    adm = HostAdmission(Popularity())
    adm.set_rule(["hot"], cold_min_uses=2)
    adm.record_use("hot")
    adm.record_use("cold")
    assert adm.keeps("hot", 10, _fits, 0.0)
    assert not adm.keeps("cold", 10, _fits, 0.0) and not adm.may_keep("cold")
    adm.record_use("cold")
    assert adm.keeps("cold", 10, _fits, 0.0) and adm.may_keep("cold")
    assert adm.refused == 1


def test_cold_min_uses_of_one_or_zero_keeps_everything() -> None:
    for uses in (0, 1):
        adm = HostAdmission(Popularity())
        adm.set_rule([], cold_min_uses=uses)
        adm.record_use("x")
        assert adm.keeps("x", 10, lambda n: (False, None), 0.0) and adm.refused == 0


def test_in_a_full_tier_a_cold_copy_must_beat_every_copy_it_would_displace() -> None:
    pop = Popularity(half_life_s=60)
    for t in (1.0, 2.0, 3.0):
        pop.record("warm-resident", t)
        pop.record("busy-cold", t)
    pop.record("busy-cold", 4.0)
    pop.record("rare-cold", 4.0)
    adm = HostAdmission(pop)
    adm.set_rule([], cold_min_uses=2)
    for cid in ("busy-cold", "rare-cold"):
        adm.record_use(cid)
        adm.record_use(cid)

    def full(nbytes: int) -> tuple[bool, list[str] | None]:
        return False, ["warm-resident"]

    assert adm.keeps("busy-cold", 10, full, 5.0)  # more requests than the copy it displaces
    assert not adm.keeps("rare-cold", 10, full, 5.0)
    assert not adm.keeps("busy-cold", 10, lambda n: (False, None), 5.0)  # room cannot be made at all
    assert adm.refused == 2
    adm.clear_rule()
    assert adm.keeps("rare-cold", 10, full, 5.0)
