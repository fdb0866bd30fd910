"""LoRA merging: a base UNet's weights with LoRAs merged in, for only the tensors they touch.

:func:`fuse` computes, in fp32, ``W' = W + Σ scale · (alpha / r) · B @ A`` over the given
LoRAs for every UNet weight some LoRA adapts, and returns just those tensors (cast back to
the base's dtype): the *overlay*. Every other tensor is shared with the base, so a worker
builds the fused UNet from the base's HOST views with the overlay's tensors swapped in
(:func:`apply_overlay`), and never writes into the shared base copy. Pure tensor
arithmetic: the overlay's file format is :mod:`.overlay_file`, deriving one from HOST
copies :mod:`.overlay_writer`.

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
from typing import Any

import torch
from diffmesh.errors import InvalidArgument, Unimplemented

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
