"""Fusion planner: which pipelines get pre-fused overlays (base + LoRAs merged at fixed scales).

The top ``k`` (default 50) pipelines *with LoRAs*, by decayed popularity, are fused: a
worker then loads the base plus one overlay (only the tensors the LoRAs change) instead
of applying each adapter at load time. Pipelines without LoRAs gain nothing from fusion.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

DEFAULT_TOP_K = 50
OVERLAY_FRACTION = 0.12
"""Share of a base's bytes an overlay holds: LoRAs touch the attention projections, about
12 % of an SD UNet's parameters."""


def plan_fusion(ranked: Iterable[tuple[str, float]], has_loras: Callable[[str], bool], k: int = DEFAULT_TOP_K) -> list[str]:
    """Keys of the pipelines to fuse: the first ``k`` of ``ranked`` (most popular first) that have LoRAs."""
    chosen: list[str] = []
    if k <= 0:
        return chosen
    for key, count in ranked:
        if count <= 0:
            break
        if has_loras(key):
            chosen.append(key)
            if len(chosen) >= k:
                break
    return chosen


def overlay_bytes(base_bytes: int, fraction: float = OVERLAY_FRACTION) -> int:
    """Bytes of a fused overlay over a base of ``base_bytes``."""
    return max(1, int(base_bytes * fraction))
