"""The replay's model set: random-weight SD1.5-architecture bases and LoRAs, sized by real width and rank.

Every base is a :func:`diffmesh.demo.models.build_pipeline` with UNet channels ``(width,
2 x width)`` (default 32, the demo models' width) and its own seed; all bases share one
architecture, so any LoRA fits any base (as every SD1.5 LoRA fits every SD1.5 base). A
LoRA's size is set by its rank: the rank is solved from the UNet's targeted layers so that
a LoRA has ``1 / lora_ratio`` (default 1/5) of a base's bytes, i.e. a base takes about 5x a
LoRA's time to come from a bandwidth-capped store. Nothing is padded: every byte is a
weight the worker loads.

Files live under one folder per ``(width, lora_ratio)`` and are reused across runs (a
``manifest.json`` records sizes and digests; missing models are added):

    base/<id>/               save_pretrained folders
    lora/<id>.safetensors    diffusers-format LoRAs
    manifest.json            what is there, with the rank used
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffmesh.artifacts import artifact_bytes, artifact_sha256
from diffmesh.file_lock import exclusive

GENERATOR = "diffmesh-replay/1"
BASE_SEED = 7000
LORA_SEED = 8000
FAMILY = "sd15"
MANIFEST = "manifest.json"
LOCK = ".replay-models.lock"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ModelFile:
    """One written model."""

    id: str
    kind: str  # "BASE" | "LORA"
    relpath: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ModelSet:
    """The models of one replay, with the sizes that matter for calibration."""

    root: Path
    width: int
    lora_rank: int
    lora_ratio: float
    bases: list[ModelFile]
    loras: list[ModelFile]

    @property
    def base_bytes(self) -> int:
        """Bytes of the largest base."""
        return max(m.bytes for m in self.bases)

    @property
    def lora_bytes(self) -> int:
        """Bytes of the largest LoRA (0 without LoRAs)."""
        return max((m.bytes for m in self.loras), default=0)

    @property
    def catalog_bytes(self) -> int:
        """Bytes of every model."""
        return sum(m.bytes for m in [*self.bases, *self.loras])

    def catalog(self, url: str, requests: dict[str, int] | None = None) -> dict[str, Any]:
        """The catalog manifest with every model at ``url``/<relpath> (folders end with ``/``)."""
        components = []
        for m in [*self.bases, *self.loras]:
            labels = {"generator": GENERATOR, "unet_width": str(self.width)}
            if m.kind == "LORA":
                labels["rank"] = str(self.lora_rank)
            if requests is not None:
                labels["replay_requests"] = str(requests.get(m.id, 0))
            components.append(
                {
                    "id": m.id,
                    "kind": m.kind,
                    "family": FAMILY,
                    "uri": f"{url.rstrip('/')}/{m.relpath}" + ("/" if m.kind == "BASE" else ""),
                    "bytes": m.bytes,
                    "sha256": m.sha256,
                    "format": "DIFFUSERS_FOLDER" if m.kind == "BASE" else "SAFETENSORS",
                    "labels": labels,
                }
            )
        return {"components": components}


def lora_bytes_per_rank(unet: Any, targets: Sequence[str]) -> int:
    """fp32 bytes one unit of rank adds to a LoRA over ``unet``'s linear layers named ``*.<target>``."""
    import torch

    total = 0
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += module.in_features + module.out_features
    return 4 * total


def rank_for_ratio(base_bytes: int, per_rank_bytes: int, ratio: float) -> int:
    """The LoRA rank whose bytes are closest to ``base_bytes / ratio`` (at least 1)."""
    if per_rank_bytes <= 0 or ratio <= 0:
        raise ValueError("per_rank_bytes and ratio must be positive")
    return max(1, round(base_bytes / ratio / per_rank_bytes))


def set_folder(models_root: Path, width: int, lora_ratio: float) -> Path:
    """The folder of the model set for ``width`` and ``lora_ratio`` under ``models_root``."""
    return Path(models_root) / f"width{width}-lora1of{lora_ratio:g}"


def write_model_set(
    models_root: Path,
    base_ids: Sequence[str],
    lora_ids: Sequence[str],
    *,
    width: int = 32,
    lora_ratio: float = 5.0,
    progress: Progress | None = None,
) -> ModelSet:
    """Writes the models that are missing (base slot *i* has seed ``BASE_SEED + i``) and returns the set."""
    say = progress or (lambda _line: None)
    root = set_folder(models_root, width, lora_ratio).resolve()
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root / LOCK):
        manifest = _read_manifest(root, width, lora_ratio)
        known: dict[str, ModelFile] = {m["id"]: ModelFile(**m) for m in manifest.get("components", [])}
        known = {k: m for k, m in known.items() if _intact(root, m)}
        rank = int(manifest.get("lora_rank", 0))
        missing_bases = [(i, b) for i, b in enumerate(base_ids) if b not in known]
        missing_loras = [(j, lo) for j, lo in enumerate(lora_ids) if lo not in known]
        if missing_bases or missing_loras or not rank:
            say(f"writing {len(missing_bases)} base(s) and {len(missing_loras)} LoRA(s) under {root}")
            rank = _write(root, width, lora_ratio, rank, missing_bases, missing_loras, base_ids, known, say)
            tmp = root / (MANIFEST + ".tmp")
            payload = {
                "generator": GENERATOR,
                "width": width,
                "lora_ratio": lora_ratio,
                "lora_rank": rank,
                "components": [m.__dict__ for m in sorted(known.values(), key=lambda m: m.id)],
            }
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
            os.replace(tmp, root / MANIFEST)
        else:
            say(f"models in {root} are up to date")
    return ModelSet(
        root=root,
        width=width,
        lora_rank=rank,
        lora_ratio=lora_ratio,
        bases=[known[b] for b in base_ids],
        loras=[known[lo] for lo in lora_ids],
    )


def _read_manifest(root: Path, width: int, lora_ratio: float) -> dict[str, Any]:
    try:
        data = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or (data.get("generator"), data.get("width"), data.get("lora_ratio")) != (
        GENERATOR,
        width,
        lora_ratio,
    ):
        return {}
    return data


def _intact(root: Path, m: ModelFile) -> bool:
    path = root / m.relpath
    try:
        return path.exists() and artifact_bytes(path) == m.bytes
    except OSError:
        return False


def _write(
    root: Path,
    width: int,
    lora_ratio: float,
    rank: int,
    missing_bases: list[tuple[int, str]],
    missing_loras: list[tuple[int, str]],
    base_ids: Sequence[str],
    known: dict[str, ModelFile],
    say: Progress,
) -> int:
    """Writes the missing models into ``known``; returns the LoRA rank (solved when ``rank`` is 0)."""
    import shutil

    import torch

    from diffmesh.demo.models import LORA_TARGETS, build_pipeline, build_unet, quiet_progress_bars, write_lora

    with torch.no_grad(), quiet_progress_bars():
        for slot, bid in missing_bases:
            rel = f"base/{bid}"
            target = root / rel
            shutil.rmtree(target, ignore_errors=True)
            build_pipeline(BASE_SEED + slot, width).save_pretrained(str(target), safe_serialization=True)
            known[bid] = ModelFile(bid, "BASE", rel, artifact_bytes(target), artifact_sha256(target))
            say(f"  base {bid}: {known[bid].bytes:,} B")
    if not missing_loras and rank:
        return rank
    # LoRAs are shaped after the first base's UNet (every base shares its architecture).
    reference = build_unet(BASE_SEED, width)
    if not rank:
        base_bytes = known[base_ids[0]].bytes if base_ids and base_ids[0] in known else 0
        rank = rank_for_ratio(base_bytes, lora_bytes_per_rank(reference, LORA_TARGETS), lora_ratio)
        say(f"  LoRA rank {rank}: about 1/{lora_ratio:g} of a base's {base_bytes:,} B")
    for slot, lid in missing_loras:
        rel = f"lora/{lid}.safetensors"
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        write_lora(reference, LORA_SEED + slot, target, rank)
        known[lid] = ModelFile(lid, "LORA", rel, artifact_bytes(target), artifact_sha256(target))
        say(f"  lora {lid}: {known[lid].bytes:,} B")
    return rank
