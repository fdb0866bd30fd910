"""Deterministic component sizes and model families within the paper's ranges.

The trace names components by anonymised id only, so each id is hashed (BLAKE2b) to a
number in [0, 1) that picks the family of a base model and places the size inside its
kind's range: base 1-20 GB (by family: SD1.5 1-4, SDXL 5-8, SD3 8-12, FLUX 12-20),
LoRA 0.1-1 GB and ControlNet 0.5-10 GB (log-uniform). The same id always gets the same
size, whatever the seed or the file it came from.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

GB = 1_000_000_000


@dataclass(frozen=True)
class Family:
    """A base-model family: catalog mix, size range, native resolution, costs."""

    name: str
    mix: float
    """Share of base models in this family (used when hashing ids to families)."""
    size_gb: tuple[float, float]
    native_side: int
    activation_gb_per_image: float
    """Device memory one image's denoising activations take at the native resolution."""
    step_weight: float
    """Relative cost of one denoising step (SD1.5 = 1)."""


FAMILIES: dict[str, Family] = {
    "sd15": Family("sd15", 0.45, (1.0, 4.0), 512, 0.4, 1.0),
    "sdxl": Family("sdxl", 0.40, (5.0, 8.0), 1024, 1.3, 2.2),
    "sd3": Family("sd3", 0.05, (8.0, 12.0), 1024, 1.5, 2.6),
    "flux": Family("flux", 0.10, (12.0, 20.0), 1024, 1.8, 4.0),
}

LORA_GB = (0.1, 1.0)
CONTROLNET_GB = (0.5, 10.0)


def unit_hash(text: str, salt: str = "") -> float:
    """A deterministic number in [0, 1) for ``text``."""
    digest = hashlib.blake2b(f"{salt}:{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def base_family(cid: str) -> str:
    """Family of a base model id, drawn by hash from the families' mix."""
    u = unit_hash(cid, "family")
    acc = 0.0
    total = sum(f.mix for f in FAMILIES.values())
    for name, fam in FAMILIES.items():
        acc += fam.mix / total
        if u < acc:
            return name
    return next(reversed(FAMILIES))


def _uniform(u: float, lo: float, hi: float) -> float:
    return lo + (hi - lo) * u


def _log_uniform(u: float, lo: float, hi: float) -> float:
    return math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u)


def base_bytes(cid: str, family: str | None = None) -> int:
    """Bytes of a base model: uniform inside its family's range."""
    fam = FAMILIES[family or base_family(cid)]
    return int(_uniform(unit_hash(cid, "size"), *fam.size_gb) * GB)


def lora_bytes(cid: str) -> int:
    """Bytes of a LoRA adapter: log-uniform in 0.1-1 GB."""
    return int(_log_uniform(unit_hash(cid, "size"), *LORA_GB) * GB)


def controlnet_bytes(cid: str) -> int:
    """Bytes of a ControlNet: log-uniform in 0.5-10 GB."""
    return int(_log_uniform(unit_hash(cid, "size"), *CONTROLNET_GB) * GB)
