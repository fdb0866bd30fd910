"""Reading a FUSED overlay (written by the instance manager's ``Fuse``) and running it instead of runtime LoRAs.

The instance manager's ``Fuse`` stores only the UNet weights the LoRAs change (merged in
fp32); every other tensor is the base's. :func:`fused_unet` builds a second UNet whose
parameters are the built base UNet's own tensors (shared, same storage — on the device
they are not uploaded again) except the overlay's, which are NEW tensors placed on the
device. Nothing is written into the base's tensors or into the shared HOST copies.
:func:`build_fused` wraps that UNet with the base's other modules into a
:class:`~diffmesh_worker.assemble.BuiltBase` of its own (own adapter bookkeeping, so runtime
LoRAs can still be added on top of the overlay).
"""

from __future__ import annotations

from typing import Any

import torch
from diffmesh.errors import DataLoss, FailedPrecondition
from diffmesh.v1 import common_pb2, instance_manager_pb2
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from diffmesh_worker.assemble import BuiltBase, DevicePlacement, build_module
from diffmesh_worker.shm_mapping import SegmentMapper, file_state_dict
from diffmesh_worker.skeletons import SkeletonPool


def base_unet_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's own weights by their plain names (peft adapter layers, if loaded, are left out)."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in unet.state_dict().items():
        if ".lora_" in name or "lora_magnitude_vector" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    return state


def fused_unet(
    mapper: SegmentMapper,
    base: BuiltBase,
    fused: instance_manager_pb2.HostHandle,
    placement: DevicePlacement,
    skeletons: SkeletonPool | None = None,
) -> Any:
    """A UNet for ``fused`` (a FUSED handle of ``base``): the base's tensors with the overlay's swapped in as new tensors."""
    cid = fused.component_id
    if fused.kind != common_pb2.COMPONENT_KIND_FUSED:
        raise FailedPrecondition(f"component {cid!r} is not a FUSED overlay")
    if fused.base_id != base.component_id:
        raise FailedPrecondition(f"overlay {cid!r} applies to {fused.base_id!r}, not to {base.component_id!r}")
    if len(fused.files) != 1:
        raise DataLoss(f"overlay {cid!r}: expected one safetensors file, got {len(fused.files)}")
    overlay = file_state_dict(mapper, fused.files[0], f"component {cid!r}")
    state = base_unet_state(base.unet)
    unknown = sorted(overlay.keys() - state.keys())
    if unknown:
        raise DataLoss(f"overlay {cid!r}: tensors not in the base UNet: {unknown[:3]}")
    for name, tensor in overlay.items():
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise DataLoss(f"overlay {cid!r}: {name} has shape {list(tensor.shape)}, the base {list(state[name].shape)}")
    # Overlay tensors are views of the overlay's own read-only HOST mapping (or device copies of them): never the base's.
    merged = {**state, **{name: placement.place(t) for name, t in overlay.items()}}
    config = dict(base.unet.config)
    return build_module(UNet2DConditionModel, config, merged, placement, f"{cid}/unet", skeletons)


def build_fused(
    mapper: SegmentMapper,
    base: BuiltBase,
    fused: instance_manager_pb2.HostHandle,
    placement: DevicePlacement,
    skeletons: SkeletonPool | None = None,
) -> BuiltBase:
    """A FUSED overlay ready to denoise: :func:`fused_unet` plus the base's VAE, text encoder and tokenizer.

    Only the overlay's tensors are new on the device, so ``bytes`` counts just those.
    """
    if fused.family != base.family:
        raise FailedPrecondition(f"overlay {fused.component_id!r} is family {fused.family!r}, its base {base.family!r}")
    unet = fused_unet(mapper, base, fused, placement, skeletons)
    host: Any = StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=base.new_scheduler(),  # type: ignore[arg-type]
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    host.set_progress_bar_config(disable=True)
    shared = {p.data_ptr() for p in base.unet.parameters()}
    own = sum(p.numel() * p.element_size() for p in unet.parameters() if p.data_ptr() not in shared)
    return BuiltBase(
        component_id=fused.component_id,
        family=fused.family,
        unet=unet,
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        scheduler_cls=base.scheduler_cls,
        scheduler_config=dict(base.scheduler_config),
        bytes=own,
        adapter_host=host,
        base_id=base.component_id,
    )
