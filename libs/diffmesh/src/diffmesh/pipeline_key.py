"""Canonical pipeline keys: the unit of popularity, placement and fusion.

A key names the base, the LoRAs with scales rounded to two decimals and sorted by id,
and the ControlNet ids sorted: ``base|lora_a@0.50,lora_b@1.00|cn_x``. Two requests with
the same components and scales have the same key whatever order they list them in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

SCALE_DECIMALS = 2

FUSED_ID_PREFIX = "fused-"
"""Prefix of the default id of a FUSED overlay (see :func:`fused_id`)."""


def canonical_key(base_id: str, loras: Iterable[tuple[str, float]] = (), controlnets: Iterable[str] = ()) -> str:
    """The canonical key of a pipeline."""
    lora_part = ",".join(f"{lid}@{round(float(scale), SCALE_DECIMALS):.{SCALE_DECIMALS}f}" for lid, scale in sorted(loras))
    cn_part = ",".join(sorted(controlnets))
    return f"{base_id}|{lora_part}|{cn_part}"


def parse_key(key: str) -> tuple[str, list[tuple[str, float]], list[str]]:
    """Inverse of :func:`canonical_key`."""
    base, lora_part, cn_part = key.split("|")
    loras = []
    for item in filter(None, lora_part.split(",")):
        lid, scale = item.rsplit("@", 1)
        loras.append((lid, float(scale)))
    return base, loras, [c for c in cn_part.split(",") if c]


def fused_id(base_id: str, loras: Iterable[tuple[str, float]]) -> str:
    """The default id of the FUSED overlay of ``base_id`` with ``loras`` merged in.

    ``fused-`` and the first 20 hex digits of the sha256 of the canonical key of base and
    LoRAs (ControlNets are not part of an overlay). The instance manager's ``Fuse`` names
    an overlay so when no id is given, and the coordinator's plan names it the same way.
    """
    key = canonical_key(base_id, loras)
    return FUSED_ID_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:20]


def fused_id_of_key(pipeline_key: str) -> str:
    """:func:`fused_id` of a canonical pipeline key; empty when the pipeline has no LoRAs."""
    base, loras, _ = parse_key(pipeline_key)
    return fused_id(base, loras) if loras else ""
