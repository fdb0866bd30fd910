"""LoRA adapters as diffusers/peft runtime adapters — never fused into the shared weights.

A LORA handle is one safetensors file in diffusers LoRA format (``unet.…lora_A.weight``,
optionally ``text_encoder.…``). Its ``__metadata__`` holds the peft ``LoraConfig`` under
``lora_adapter_metadata``; diffusers only reads that from a *file*, so when loading from the
in-memory shared-memory views the metadata is passed explicitly — otherwise ``lora_alpha``
silently falls back to the rank and the adapter's strength changes.

peft wraps the targeted layers and allocates the small A/B matrices itself; the base layers
keep pointing at the (read-only) HOST copy. Per request, ``set_adapters`` selects the
requested adapters and weights; a request without LoRAs disables them.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from diffmesh.errors import DataLoss, FailedPrecondition
from diffmesh.v1 import common_pb2, instance_manager_pb2
from diffusers import StableDiffusionPipeline

from diffmesh_worker.assemble import BuiltBase, DevicePlacement
from diffmesh_worker.shm_mapping import SegmentMapper, file_state_dict

METADATA_KEY = "lora_adapter_metadata"
PREFIXES = ("unet", "text_encoder")


def adapter_name(component_id: str) -> str:
    """A peft-safe adapter name for a catalog id (peft names may not contain dots)."""
    slug = re.sub(r"[^A-Za-z0-9_]", "_", component_id)[:48]
    return f"lora_{slug}_{hashlib.sha1(component_id.encode()).hexdigest()[:8]}"


def lora_metadata(handle: instance_manager_pb2.HostHandle) -> dict[str, Any] | None:
    """The adapter config stored in the file's ``__metadata__`` (keys prefixed ``unet.`` / ``text_encoder.``)."""
    for shm_file in handle.files:
        raw = shm_file.metadata.get(METADATA_KEY)
        if raw:
            try:
                meta = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataLoss(f"LoRA {handle.component_id!r}: {METADATA_KEY} is not valid JSON") from exc
            if not isinstance(meta, dict):
                raise DataLoss(f"LoRA {handle.component_id!r}: {METADATA_KEY} is not a JSON object")
            return meta
    return None


def lora_state_dict(mapper: SegmentMapper, handle: instance_manager_pb2.HostHandle) -> dict[str, torch.Tensor]:
    """The LoRA's tensors as zero-copy views of the HOST copy."""
    if handle.kind != common_pb2.COMPONENT_KIND_LORA:
        raise FailedPrecondition(f"component {handle.component_id!r} is not a LORA")
    state: dict[str, torch.Tensor] = {}
    for shm_file in handle.files:
        state.update(file_state_dict(mapper, shm_file, f"LoRA {handle.component_id!r}"))
    if not state:
        raise DataLoss(f"LoRA {handle.component_id!r} has no tensors")
    if not all("lora" in key for key in state):
        raise DataLoss(f"LoRA {handle.component_id!r} is not in diffusers LoRA format")
    return state


def _split(meta: dict[str, Any] | None, prefix: str) -> dict[str, Any] | None:
    if meta is None:
        return None
    part = {k: v for k, v in meta.items() if k.startswith(f"{prefix}.")}
    return part or None


def load_adapter(
    base: BuiltBase,
    component_id: str,
    state: dict[str, torch.Tensor],
    metadata: dict[str, Any] | None,
    placement: DevicePlacement,
) -> str:
    """Loads a LoRA into ``base``'s UNet (and text encoder) as a named peft adapter; returns its name."""
    name = adapter_name(component_id)
    if component_id in base.adapters:
        return base.adapters[component_id]
    placed = {k: placement.place(v) for k, v in state.items()}
    host = base.adapter_host
    targets = [p for p in PREFIXES if any(k.startswith(f"{p}.") for k in placed)]
    if not targets:
        raise DataLoss(f"LoRA {component_id!r} has neither unet nor text_encoder weights")
    try:
        with warnings.catch_warnings():
            # Several adapters per model is the point here, not a mistake.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            _load(host, base, name, placed, metadata, targets)
    except (ValueError, KeyError, RuntimeError) as exc:
        # A half-loaded adapter would linger in peft's config: remove whatever got in.
        _delete(host, name)
        raise FailedPrecondition(f"LoRA {component_id!r} does not fit base {base.component_id!r}: {str(exc)[:300]}") from exc
    base.adapters[component_id] = name
    return name


def _load(
    host: Any, base: BuiltBase, name: str, placed: dict[str, torch.Tensor], metadata: dict[str, Any] | None, targets: list[str]
) -> None:
    if "unet" in targets:
        StableDiffusionPipeline.load_lora_into_unet(
            placed, None, base.unet, adapter_name=name, _pipeline=host, metadata=_split(metadata, "unet")
        )
    # A FUSED overlay shares its base's text encoder: the adapter may be in it already.
    if "text_encoder" in targets and name not in getattr(base.text_encoder, "peft_config", {}):
        StableDiffusionPipeline.load_lora_into_text_encoder(
            placed, None, base.text_encoder, adapter_name=name, _pipeline=host, metadata=_split(metadata, "text_encoder")
        )


def _delete(host: Any, name: str, text_encoder: bool = True) -> None:
    with warnings.catch_warnings():
        # peft warns when the deleted adapter was active; the next request activates its own.
        warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
        for module in (host.unet, host.text_encoder) if text_encoder else (host.unet,):
            if name in getattr(module, "peft_config", {}):
                module.delete_adapters(name)


def unload_adapter(base: BuiltBase, component_id: str, text_encoder: bool = True) -> None:
    """Removes one LoRA's adapter from ``base`` (when the LoRA leaves the device cache).

    ``text_encoder=False`` keeps its text-encoder part: a FUSED overlay shares its base's
    text encoder, so an overlay leaving alone must not take the base's adapter with it.
    """
    name = base.adapters.pop(component_id, None)
    if name is not None:
        _delete(base.adapter_host, name, text_encoder)


def activate(base: BuiltBase, loras: Sequence[tuple[str, float]]) -> None:
    """Makes exactly ``loras`` (component id, scale) active on ``base``; none → adapters disabled."""
    host = base.adapter_host
    if not base.adapters:
        return
    if not loras:
        host.disable_lora()
        return
    host.enable_lora()
    names = [base.adapters[cid] for cid, _ in loras]
    host.set_adapters(names, adapter_weights=[float(scale) for _, scale in loras])
