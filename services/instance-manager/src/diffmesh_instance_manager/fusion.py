"""Fused overlays: a base UNet's weights with LoRAs merged in, for only the tensors they touch.

:func:`fuse` computes, in fp32, ``W' = W + Σ scale · (alpha / r) · B @ A`` over the given
LoRAs for every UNet weight some LoRA adapts, and returns just those tensors (cast back to
the base's dtype): the *overlay*. Every other tensor is shared with the base, so a worker
builds the fused UNet from the base's HOST views with the overlay's tensors swapped in,
and never writes into the shared base copy. :func:`save_overlay` writes the overlay as a
safetensors file whose ``__metadata__`` names the base and the LoRA set
(:func:`overlay_metadata`): the derived component's artifact.

LoRA files are diffusers-format (``StableDiffusionPipeline.save_lora_weights``): keys
``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (peft names) or ``lora.down.weight`` /
``lora.up.weight`` (diffusers names), optional ``unet.<module>.alpha`` tensors, and the
peft ``LoraConfig`` in ``__metadata__["lora_adapter_metadata"]`` (``unet.lora_alpha``,
``unet.r``, ``unet.alpha_pattern``, ``unet.use_rslora``…). Without alpha in either place,
alpha = r (scaling 1), exactly as diffusers does. ``scale`` matches diffusers'
``set_adapters(weights=…)`` times ``fuse_lora(lora_scale=…)``. Text-encoder LoRAs, DoRA and
LoRA biases are refused (``Unimplemented``): the overlay would silently differ from
diffusers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffmesh.errors import InvalidArgument, Unimplemented

#: ``__metadata__`` keys of an overlay file.
META_BASE = "diffmesh.overlay.base"
META_LORAS = "diffmesh.overlay.loras"
META_KIND = "diffmesh.kind"

_PREFIX = "unet."
_DOWN = (".lora_A.weight", ".lora.down.weight")
_UP = (".lora_B.weight", ".lora.up.weight")


@dataclass(frozen=True)
class LoraInput:
    """One LoRA to fuse: its tensors, its safetensors ``__metadata__``, its scale and (optionally) its id."""

    state_dict: Mapping[str, torch.Tensor]
    metadata: Mapping[str, str]
    scale: float
    lora_id: str = ""


@dataclass(frozen=True)
class _Pair:
    module: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None


def _config(metadata: Mapping[str, str], what: str) -> dict[str, Any]:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidArgument("lora", f"{what}: lora_adapter_metadata is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("lora", f"{what}: lora_adapter_metadata must be a JSON object")
    return {k[len(_PREFIX) :]: v for k, v in doc.items() if k.startswith(_PREFIX)}


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any | None:
    # peft's get_pattern_key: the first pattern matching a dotted suffix of the module name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _pairs(lora: Mapping[str, torch.Tensor], what: str) -> list[_Pair]:
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, tensor in lora.items():
        if not key.startswith(_PREFIX):
            raise Unimplemented(f"{what}: tensor {key!r} is not a UNet LoRA weight (only unet.* LoRAs can be fused)")
        name = key[len(_PREFIX) :]
        if name.endswith(_DOWN):
            downs[name[: name.rindex(".lora")]] = tensor
        elif name.endswith(_UP):
            ups[name[: name.rindex(".lora")]] = tensor
        elif name.endswith(".alpha"):
            alphas[name[: -len(".alpha")]] = float(tensor.float().reshape(-1)[0])
        else:
            raise Unimplemented(f"{what}: tensor {key!r} is not a plain LoRA A/B weight (DoRA, biases and others are not fused)")
    if downs.keys() != ups.keys():
        missing = sorted(downs.keys() ^ ups.keys())[:3]
        raise InvalidArgument("lora", f"{what}: LoRA modules without both A and B weights: {missing}")
    return [_Pair(m, downs[m], ups[m], alphas.get(m)) for m in sorted(downs)]


def _delta(pair: _Pair, weight_shape: torch.Size, what: str) -> tuple[torch.Tensor, int]:
    down = pair.down.to(torch.float32)
    up = pair.up.to(torch.float32)
    r = down.shape[0]
    if up.dim() < 2 or up.shape[1] != r or any(d != 1 for d in up.shape[2:]):
        raise InvalidArgument("lora", f"{what}: {pair.module}: A {list(down.shape)} and B {list(up.shape)} do not compose")
    delta = up.reshape(up.shape[0], r) @ down.reshape(r, -1)
    if delta.numel() != math.prod(weight_shape) or up.shape[0] != weight_shape[0]:
        raise InvalidArgument(
            "lora", f"{what}: {pair.module}: B @ A has shape {list(delta.shape)}, the base weight {list(weight_shape)}"
        )
    return delta.reshape(weight_shape), r


def fuse(
    base: Mapping[str, torch.Tensor],
    loras: Sequence[LoraInput | tuple[Mapping[str, torch.Tensor], Mapping[str, str], float]],
) -> dict[str, torch.Tensor]:
    """The overlay: every base weight the LoRAs touch, merged in fp32 and cast back to its dtype.

    ``base`` maps UNet parameter names (``down_blocks.0…to_q.weight``) to tensors, e.g.
    ``torch.frombuffer`` views of the HOST copy (never written). ``loras`` are
    :class:`LoraInput` or ``(state dict, metadata, scale)`` tuples. The returned tensors
    are new, contiguous CPU tensors. Raises ``InvalidArgument`` for a LoRA that names a
    module the base lacks, mismatched shapes or a non-finite scale, and ``Unimplemented``
    for LoRA kinds that cannot be fused faithfully.
    """
    acc: dict[str, torch.Tensor] = {}
    for n, item in enumerate(loras):
        spec = item if isinstance(item, LoraInput) else LoraInput(item[0], item[1], item[2])
        what = f"LoRA {spec.lora_id or n}"
        if not math.isfinite(spec.scale):
            raise InvalidArgument("scale", f"{what}: scale {spec.scale} is not finite")
        cfg = _config(spec.metadata, what)
        if cfg.get("use_dora"):
            raise Unimplemented(f"{what}: DoRA adapters are not fused")
        if cfg.get("lora_bias"):
            raise Unimplemented(f"{what}: LoRA biases are not fused")
        for pair in _pairs(spec.state_dict, what):
            target = f"{pair.module}.weight"
            weight = base.get(target)
            if weight is None:
                raise InvalidArgument("lora", f"{what}: module {pair.module!r} has no weight {target!r} in the base UNet")
            delta, r = _delta(pair, weight.shape, what)
            alpha = pair.alpha
            if alpha is None:
                alpha = _pattern_value(cfg.get("alpha_pattern") or {}, pair.module)
            if alpha is None:
                alpha = cfg.get("lora_alpha", r)
            factor = float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)
            if target not in acc:
                acc[target] = weight.detach().to(device="cpu", dtype=torch.float32, copy=True)
            acc[target].add_(delta, alpha=spec.scale * factor)
    return {name: w.to(base[name].dtype).contiguous() for name, w in acc.items()}


def apply_overlay(base: Mapping[str, torch.Tensor], overlay: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fused state dict: ``base`` with the overlay's tensors swapped in (nothing is copied or written)."""
    unknown = overlay.keys() - base.keys()
    if unknown:
        raise InvalidArgument("overlay", f"tensors not in the base: {sorted(unknown)[:3]}")
    return {**base, **overlay}


def overlay_metadata(base_id: str, loras: Sequence[tuple[str, float]]) -> dict[str, str]:
    """``__metadata__`` of an overlay file: the base id and the ``[(lora id, scale)…]`` set, as strings."""
    return {
        "format": "pt",
        META_KIND: "FUSED",
        META_BASE: base_id,
        META_LORAS: json.dumps([{"id": i, "scale": s} for i, s in loras], sort_keys=True),
    }


def save_overlay(path: Path, overlay: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Writes the overlay as a safetensors file with ``metadata`` as ``__metadata__``, byte for byte reproducibly.

    The same tensors and metadata always give the same bytes (tensors by name, header keys
    sorted, the header padded with spaces to 8 bytes as the format recommends), so an
    overlay derived again — after eviction, or on another node — can be checked against
    its catalog sha256. (``safetensors.save_file`` orders ``__metadata__`` by a per-process
    hash, so two runs give different bytes.)
    """
    from diffmesh.safetensors_header import TORCH_DTYPE_NAMES

    names = {getattr(torch, attr): name for name, attr in TORCH_DTYPE_NAMES.items() if hasattr(torch, attr)}
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(overlay):
        tensor = overlay[name].detach().to("cpu").contiguous()
        if tensor.dtype not in names:
            raise InvalidArgument("overlay", f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for data in blobs:
            f.write(data)
