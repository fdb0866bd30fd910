"""The trace's base models and LoRAs mapped onto demo models by popularity rank.

The trace names models by anonymised id only; the replay runs random-weight demo models.
Among the first N requests of the trace (``diffmesh.trace.loader`` order, i.e. arrival
order), bases and LoRAs are ranked by the number of requests that use them (ties: first
use). The base of rank *i* becomes demo base *i* (``replay-base-00`` is the most popular),
likewise for LoRAs, up to a cap (``max_bases``, ``max_loras``). Ranks beyond the cap (the
long tail) are spread round-robin over the last quarter of the slots (at least one), so
the tail stays a tail: no single demo model absorbs all of it and the head keeps its own
models. Two LoRAs of one request that land on the same demo LoRA are applied once (the
first one's scale).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from diffmesh.trace.model import Workload

BASE_PREFIX = "replay-base-"
LORA_PREFIX = "replay-lora-"
DEFAULT_MAX_BASES = 12
DEFAULT_MAX_LORAS = 40


def tail_slots(cap: int) -> int:
    """How many of the last slots receive the ranks beyond ``cap``: a quarter, at least one."""
    return max(1, cap // 4)


def slot_for_rank(rank: int, cap: int) -> int:
    """The demo slot of popularity rank ``rank`` (0 = most popular) when ``cap`` slots exist."""
    if cap < 1:
        raise ValueError(f"cap must be at least 1, got {cap}")
    if rank < cap:
        return rank
    tail = tail_slots(cap)
    return cap - tail + (rank - cap) % tail


def ranked(counts: Counter[int], first_use: dict[int, int]) -> list[int]:
    """Keys by count (descending), ties by first use."""
    return sorted(counts, key=lambda k: (-counts[k], first_use[k]))


@dataclass(frozen=True)
class CatalogMap:
    """Which demo model stands for which trace component.

    ``base_slot``/``lora_slot`` map a ``Workload.components`` index to a demo slot;
    ``base_ids``/``lora_ids`` are the demo ids of the slots, most popular first.
    """

    base_ids: list[str]
    lora_ids: list[str]
    base_slot: dict[int, int]
    lora_slot: dict[int, int]
    trace_bases: int
    """Distinct trace bases among the requests mapped."""
    trace_loras: int
    """Distinct trace LoRAs among the requests mapped."""
    requests_per_base: list[int] = field(default_factory=list)
    """Requests per demo base slot (after the tail is folded in)."""
    requests_per_lora: list[int] = field(default_factory=list)
    """Requests per demo LoRA slot."""

    def base_id(self, component: int) -> str:
        """Demo id of a trace base (a ``Workload.components`` index)."""
        return self.base_ids[self.base_slot[component]]

    def lora_ids_of(self, components: tuple[int, ...], scales: tuple[float, ...]) -> tuple[tuple[str, float], ...]:
        """Demo (id, scale) pairs of a trace LoRA set, duplicates after mapping applied once."""
        out: dict[str, float] = {}
        for comp, scale in zip(components, scales, strict=True):
            out.setdefault(self.lora_ids[self.lora_slot[comp]], float(scale))
        return tuple(out.items())


def map_catalog(
    workload: Workload, requests: int, max_bases: int = DEFAULT_MAX_BASES, max_loras: int = DEFAULT_MAX_LORAS
) -> CatalogMap:
    """The demo catalog for the first ``requests`` requests of ``workload`` (see the module docstring)."""
    if max_bases < 1 or max_loras < 1:
        raise ValueError("max_bases and max_loras must be at least 1")
    n = min(requests, len(workload))
    base_counts: Counter[int] = Counter()
    lora_counts: Counter[int] = Counter()
    base_first: dict[int, int] = {}
    lora_first: dict[int, int] = {}
    for i in range(n):
        pipe = workload.pipelines[int(workload.pipeline[i])]
        base_counts[pipe.base] += 1
        base_first.setdefault(pipe.base, i)
        for lora in dict.fromkeys(pipe.loras):
            lora_counts[lora] += 1
            lora_first.setdefault(lora, i)
    bases = ranked(base_counts, base_first)
    loras = ranked(lora_counts, lora_first)
    n_bases = max(1, min(max_bases, len(bases)))
    n_loras = min(max_loras, len(loras))
    base_slot = {comp: slot_for_rank(rank, n_bases) for rank, comp in enumerate(bases)}
    lora_slot = {comp: slot_for_rank(rank, n_loras) for rank, comp in enumerate(loras)} if n_loras else {}
    per_base = [0] * n_bases
    for comp, count in base_counts.items():
        per_base[base_slot[comp]] += count
    per_lora = [0] * n_loras
    for comp, count in lora_counts.items():
        per_lora[lora_slot[comp]] += count
    width = 2
    return CatalogMap(
        base_ids=[f"{BASE_PREFIX}{i:0{width}d}" for i in range(n_bases)],
        lora_ids=[f"{LORA_PREFIX}{i:0{width}d}" for i in range(n_loras)],
        base_slot=base_slot,
        lora_slot=lora_slot,
        trace_bases=len(bases),
        trace_loras=len(loras),
        requests_per_base=per_base,
        requests_per_lora=per_lora,
    )
