"""Scaling advice: where to add capacity when the cluster must grow.

A new worker starts fastest on a node whose HOST or SSD tier already holds what it will
serve. Nodes are ranked by the reload seconds their tiers save for the needed components
(HOST saves more than SSD), then by lower load, then by id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from diffmesh.tiers import Tier

TIER_SAVING: Mapping[Tier, float] = {Tier.HOST: 1.0, Tier.SSD: 0.8}
"""Share of a component's REMOTE load time that a copy in the tier saves (HOST→GPU is a
memory copy; SSD→GPU still reads the disk, about 8x faster than the network)."""


@dataclass(frozen=True)
class NodeAdvice:
    """One candidate node with the seconds of loading its tiers save."""

    node_id: str
    saved_s: float
    load: float


def advise_scaling(
    needed: Mapping[str, float],
    holdings: Mapping[str, Mapping[str, Tier]],
    load: Mapping[str, float] | None = None,
) -> list[NodeAdvice]:
    """Nodes ranked best first for adding a worker.

    ``needed`` maps component id → its REMOTE load seconds; ``holdings`` maps node id →
    {component id → best tier on that node (:attr:`Tier.HOST` / :attr:`Tier.SSD`)}; ``load`` is each node's
    busy fraction (0 when absent).
    """
    load = load or {}
    advice = []
    for node, held in holdings.items():
        saved = sum(cost * TIER_SAVING.get(held.get(cid, Tier.UNSPECIFIED), 0.0) for cid, cost in needed.items())
        advice.append(NodeAdvice(node, saved, load.get(node, 0.0)))
    advice.sort(key=lambda a: (-a.saved_s, a.load, a.node_id))
    return advice
