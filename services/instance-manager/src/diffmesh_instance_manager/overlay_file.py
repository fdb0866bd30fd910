"""The fused overlay's file: a safetensors file whose ``__metadata__`` names the base and the LoRA set.

:func:`overlay_metadata` builds that metadata (:data:`META_BASE`, :data:`META_LORAS`);
:func:`save_overlay` writes the tensors byte for byte reproducibly, so an overlay derived
again can be checked against its catalog sha256.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from diffmesh.errors import InvalidArgument

#: ``__metadata__`` keys of an overlay file.
META_BASE = "diffmesh.overlay.base"
META_LORAS = "diffmesh.overlay.loras"
META_KIND = "diffmesh.kind"


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
