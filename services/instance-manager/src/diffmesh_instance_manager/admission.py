"""COLD admission into the HOST tier: which copies loaded on a miss the cache keeps.

The coordinator's plan carries an admission rule (``AdmissionRule`` of plan.proto).
Components of HOT and WARM pipelines (``admitted_ids``) are always kept. Any other
component is COLD: a copy of it loaded into HOST for an ``Acquire`` is kept only once the
component has been requested on this node ``cold_min_uses`` times, and when the tier is
full only if its decayed request rate beats every copy it would displace (the shared
:class:`diffmesh.policy.admission.ColdAdmission`). A copy that is not kept is
*transient*: it still lives in shared memory for the worker that asked for it, but it is
freed as soon as its last lease ends, so tail traffic does not push the head out of HOST.

Without a rule (no plan yet, no coordinator, or ``DIFFMESH_POLICY=lru``) every copy is
kept, as before the policy plane. Event-loop confined.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from diffmesh.policy.admission import ColdAdmission

from diffmesh_instance_manager.eviction import Popularity

Room = Callable[[int], tuple[bool, list[str] | None]]
"""``room(nbytes) -> (fits, victims)``: whether ``nbytes`` fit the tier without evicting, else the
copies that would be evicted to make room (None: room cannot be made)."""


@dataclass(frozen=True)
class AdmissionRule:
    """The plan's admission rule (plan.proto ``AdmissionRule``)."""

    admitted_ids: frozenset[str]
    cold_min_uses: int


class HostAdmission:
    """Decides whether a HOST copy loaded on a miss is cached or transient, and counts refusals."""

    def __init__(self, popularity: Popularity, policy: ColdAdmission | None = None) -> None:
        self.popularity = popularity
        self.policy = policy or ColdAdmission()
        self.rule: AdmissionRule | None = None
        self.uses: Counter[str] = Counter()
        self.refused = 0

    def set_rule(self, admitted_ids: Iterable[str], cold_min_uses: int) -> None:
        """Installs the plan's rule (replacing the last one)."""
        self.rule = AdmissionRule(frozenset(admitted_ids), cold_min_uses)

    def clear_rule(self) -> None:
        """Back to keeping every copy."""
        self.rule = None

    def record_use(self, component_id: str) -> None:
        """One request for ``component_id`` on this node (an Acquire naming it)."""
        self.uses[component_id] += 1

    def may_keep(self, component_id: str) -> bool:
        """Whether the rule lets a copy of ``component_id`` stay cached (ignoring room): admitted, or used often enough."""
        rule = self.rule
        if rule is None or rule.cold_min_uses <= 1 or component_id in rule.admitted_ids:
            return True
        return self.uses[component_id] >= rule.cold_min_uses

    def keeps(self, component_id: str, nbytes: int, room: Room, now: float) -> bool:
        """Whether a copy of ``component_id`` (``nbytes``) just loaded on a miss is cached; a refusal is counted."""
        rule = self.rule
        if rule is None or rule.cold_min_uses <= 1 or component_id in rule.admitted_ids:
            return True
        keep = self.may_keep(component_id)
        if keep:
            fits, victims = room(nbytes)
            if not fits:
                victim_scores = None if victims is None else [self.popularity.rate(v, now) for v in victims]
                keep = self.policy.admit(self.popularity.rate(component_id, now), nbytes, 0, victim_scores)
        if not keep:
            self.refused += 1
        return keep
