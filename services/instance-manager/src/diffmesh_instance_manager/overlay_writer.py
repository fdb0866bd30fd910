"""Writing a fused overlay from HOST copies (blocking; imports torch, so it is imported lazily).

The base UNet and the LoRAs are read as ``torch.frombuffer`` views of their HOST blocks
(never written); :func:`diffmesh_instance_manager.lora_merge.fuse` merges, in fp32, only
the tensors the LoRAs touch, and :func:`write_overlay` writes the overlay atomically as a
safetensors file whose ``__metadata__`` names the base and the LoRA set
(:mod:`.overlay_file`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffmesh.errors import FailedPrecondition
from diffmesh.safetensors_header import SafetensorsHeaderError, torch_dtype

from diffmesh_instance_manager.host import ComponentPlan, PlannedFile
from diffmesh_instance_manager.lora_merge import LoraInput, fuse
from diffmesh_instance_manager.overlay_file import overlay_metadata, save_overlay

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class HostCopy:
    """A HOST-resident component: its plan and a view of its whole block."""

    component_id: str
    plan: ComponentPlan
    view: memoryview


def _tensors(copy: HostCopy, planned: PlannedFile) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    data = planned.offset + planned.header.data_offset
    for t in planned.header.tensors:
        try:
            dtype = torch_dtype(t.dtype)
        except SafetensorsHeaderError:
            what = f"component {copy.component_id!r}: tensor {t.name!r}"
            raise FailedPrecondition(f"{what} has dtype {t.dtype}, which is not fused") from None
        count = t.nbytes // dtype.itemsize
        if count == 0:
            out[t.name] = torch.empty(t.shape, dtype=dtype)
            continue
        flat = torch.frombuffer(copy.view, dtype=dtype, count=count, offset=data + t.begin)
        out[t.name] = flat.reshape(t.shape)
    return out


def _file(copy: HostCopy, relpath: str) -> PlannedFile:
    for f in copy.plan.files:
        if f.relpath == relpath:
            return f
    raise FailedPrecondition(f"component {copy.component_id!r} has no {relpath or 'safetensors file'!r} to fuse")


def write_overlay(base: HostCopy, loras: Sequence[tuple[HostCopy, float]], dest: Path) -> int:
    """Fuses ``loras`` into ``base``'s UNet and writes the overlay atomically to ``dest``; returns the tensors written."""
    import warnings

    with warnings.catch_warnings():
        # frombuffer over a writable shared-memory view warns about writability; nothing writes to it.
        warnings.simplefilter("ignore", UserWarning)
        base_tensors = _tensors(base, _file(base, UNET_FILE))
        inputs = []
        for copy, scale in loras:
            planned = _file(copy, "")
            inputs.append(LoraInput(_tensors(copy, planned), planned.header.metadata, scale, copy.component_id))
    overlay = fuse(base_tensors, inputs)
    del base_tensors, inputs
    if not overlay:
        raise FailedPrecondition(f"the LoRAs touch no tensor of {base.component_id!r}'s UNet; nothing to fuse")
    meta = overlay_metadata(base.component_id, [(c.component_id, s) for c, s in loras])
    tmp = dest.with_name(f".{uuid.uuid4().hex}.tmp")
    try:
        save_overlay(tmp, overlay, meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.rename(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return len(overlay)
