"""Build diffusers modules and pipelines from HOST-tier handles, zero-copy.

Each module is constructed on the meta device from its inline JSON config (or taken ready
from a :class:`~diffmesh_worker.skeletons.SkeletonPool` of spares built ahead), then given the
shared-memory tensor views with ``load_state_dict(sd, assign=True, strict=True)``: on a CPU
device with fp32 weights the parameters *are* the shared HOST copy (no bytes copied); on
CUDA they are copied once to the device in fp16. The tokenizer comes from the inline
tokenizer files and the scheduler from its config. Model files are never read from disk.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffmesh.errors import DataLoss, FailedPrecondition
from diffmesh.v1 import common_pb2, instance_manager_pb2
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    SchedulerMixin,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers import schedulers as diffusers_schedulers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffmesh_worker.shm_mapping import SegmentMapper, file_state_dict
from diffmesh_worker.skeletons import SkeletonPool, build_skeleton

# model_index.json class names this worker knows how to build (never import arbitrary names).
UNET_CLASSES = {"UNet2DConditionModel"}
VAE_CLASSES = {"AutoencoderKL"}
TEXT_ENCODER_CLASSES = {"CLIPTextModel"}
TOKENIZER_CLASSES = {"CLIPTokenizer", "CLIPTokenizerFast"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)


@dataclass(frozen=True)
class DevicePlacement:
    """Where built modules live and in which floating-point dtype."""

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def for_device(cls, device: str) -> DevicePlacement:
        """CUDA → fp16 (weights copied to the device); CPU → fp32 (zero-copy when stored fp32)."""
        dev = torch.device(device)
        return cls(dev, torch.float16 if dev.type == "cuda" else torch.float32)

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on this device and dtype; the same object (no copy) when it already is."""
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        if tensor.device == self.device and tensor.dtype == dtype:
            return tensor
        return tensor.to(device=self.device, dtype=dtype)


@dataclass
class BuiltBase:
    """A base model's modules built on the device, plus the LoRA adapters loaded into them."""

    component_id: str
    family: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_cls: type[SchedulerMixin]
    scheduler_config: dict[str, Any]
    bytes: int
    # Pipeline object that owns the LoRA adapter bookkeeping for these modules.
    adapter_host: Any
    # lora component id → peft adapter name, in load order (oldest first).
    adapters: dict[str, str] = field(default_factory=dict)
    # For a FUSED overlay: the base whose VAE, text encoder and UNet tensors it shares ("" for a BASE).
    base_id: str = ""

    def new_scheduler(self) -> SchedulerMixin:
        """A fresh scheduler (schedulers keep per-run state, so one per request)."""
        return self.scheduler_cls.from_config(self.scheduler_config)


@dataclass
class BuiltControlNet:
    """A ControlNet module built on the device."""

    component_id: str
    family: str
    model: ControlNetModel
    bytes: int


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def configs_of(handle: instance_manager_pb2.HostHandle) -> dict[str, bytes]:
    """The handle's inline config files by relative path."""
    return {c.relpath: bytes(c.content) for c in handle.configs}


def _json(configs: dict[str, bytes], relpath: str, component_id: str) -> dict[str, Any]:
    raw = configs.get(relpath)
    if raw is None:
        raise DataLoss(f"component {component_id!r}: config {relpath!r} missing from its handle")
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataLoss(f"component {component_id!r}: config {relpath!r} is not valid JSON") from exc
    if not isinstance(value, dict):
        raise DataLoss(f"component {component_id!r}: config {relpath!r} is not a JSON object")
    return value


def subfolder_state_dict(
    mapper: SegmentMapper, handle: instance_manager_pb2.HostHandle, subfolder: str
) -> dict[str, torch.Tensor]:
    """Zero-copy tensors of every safetensors file directly under ``subfolder`` ("" = top level)."""
    prefix = f"{subfolder}/" if subfolder else ""
    state: dict[str, torch.Tensor] = {}
    found = False
    for shm_file in handle.files:
        rel = shm_file.relpath
        inside = rel.startswith(prefix) and "/" not in rel[len(prefix) :] if prefix else "/" not in rel
        if not inside:
            continue
        found = True
        state.update(file_state_dict(mapper, shm_file, f"component {handle.component_id!r}"))
    if not found:
        raise DataLoss(f"component {handle.component_id!r}: no safetensors file under {subfolder or '.'!r}")
    return state


def build_module(
    cls: type[torch.nn.Module],
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    placement: DevicePlacement,
    what: str,
    skeletons: SkeletonPool | None = None,
) -> torch.nn.Module:
    """Builds ``cls`` from ``config`` with parameters on the meta device, then assigns ``state`` to it.

    The meta skeleton comes from ``skeletons`` (usually built ahead, off the request path)
    or, without a pool, is built here. Buffers that are not in the state dict (e.g. CLIP's
    ``position_ids``) are real in either case.
    """
    module = skeletons.take(cls, config) if skeletons is not None else build_skeleton(cls, config)
    placed = {name: placement.place(t) for name, t in state.items()}
    try:
        module.load_state_dict(placed, strict=True, assign=True)
    except RuntimeError as exc:
        raise DataLoss(f"{what}: weights do not match its config: {str(exc)[:300]}") from exc
    leftover = [n for n, p in module.named_parameters() if p.is_meta]
    if leftover:
        raise DataLoss(f"{what}: parameters without weights: {leftover[:5]}")
    # Moves buffers the constructor created; assigned parameters are already in place.
    module.to(placement.device)
    module.eval()
    module.requires_grad_(False)
    return module


def _model_index(configs: dict[str, bytes], component_id: str) -> dict[str, Any]:
    index = _json(configs, "model_index.json", component_id)
    for key, allowed in (
        ("unet", UNET_CLASSES),
        ("vae", VAE_CLASSES),
        ("text_encoder", TEXT_ENCODER_CLASSES),
        ("tokenizer", TOKENIZER_CLASSES),
    ):
        entry = index.get(key)
        name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        if name not in allowed:
            raise FailedPrecondition(
                f"component {component_id!r}: {key} class {name!r} is not supported (expected one of {sorted(allowed)})"
            )
    return index


def scheduler_class(config: dict[str, Any], component_id: str) -> type[SchedulerMixin]:
    """The diffusers scheduler class named by a scheduler config."""
    name = config.get("_class_name")
    cls = getattr(diffusers_schedulers, str(name), None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise FailedPrecondition(f"component {component_id!r}: unknown scheduler class {name!r}")
    return cls


def build_tokenizer(configs: dict[str, bytes], component_id: str, max_positions: int) -> CLIPTokenizer:
    """The tokenizer from the inline ``tokenizer/*`` files (written to a private temp dir)."""
    files = {
        rel.split("/", 1)[1]: content for rel, content in configs.items() if rel.startswith("tokenizer/") and rel.count("/") == 1
    }
    if not files:
        raise DataLoss(f"component {component_id!r}: no tokenizer files in its handle")
    with tempfile.TemporaryDirectory(prefix="diffmesh-tok-") as tmp:
        for name, content in files.items():
            if name in TOKENIZER_FILES:
                (Path(tmp) / name).write_bytes(content)
        tokenizer = CLIPTokenizer.from_pretrained(tmp, local_files_only=True)
    # A tokenizer without a saved limit reports 1e30 and would overflow CLIP's positions.
    if not tokenizer.model_max_length or tokenizer.model_max_length > max_positions:
        tokenizer.model_max_length = max_positions
    return tokenizer


def build_base(
    mapper: SegmentMapper,
    handle: instance_manager_pb2.HostHandle,
    placement: DevicePlacement,
    skeletons: SkeletonPool | None = None,
) -> BuiltBase:
    """Builds UNet, VAE, text encoder, tokenizer and scheduler of a BASE handle (skeletons from ``skeletons``)."""
    cid = handle.component_id
    if handle.kind != common_pb2.COMPONENT_KIND_BASE:
        raise FailedPrecondition(f"component {cid!r} is not a BASE model")
    configs = configs_of(handle)
    _model_index(configs, cid)
    unet_cfg = _json(configs, "unet/config.json", cid)
    vae_cfg = _json(configs, "vae/config.json", cid)
    te_raw = _json(configs, "text_encoder/config.json", cid)
    te_cfg = CLIPTextConfig.from_dict(te_raw)
    sched_cfg = _json(configs, "scheduler/scheduler_config.json", cid)

    unet = build_module(
        UNet2DConditionModel, unet_cfg, subfolder_state_dict(mapper, handle, "unet"), placement, f"{cid}/unet", skeletons
    )
    vae = build_module(AutoencoderKL, vae_cfg, subfolder_state_dict(mapper, handle, "vae"), placement, f"{cid}/vae", skeletons)
    te_state = subfolder_state_dict(mapper, handle, "text_encoder")
    text_encoder = build_module(CLIPTextModel, te_raw, te_state, placement, f"{cid}/text_encoder", skeletons)
    tokenizer = build_tokenizer(configs, cid, int(te_cfg.max_position_embeddings))
    sched_cls = scheduler_class(sched_cfg, cid)
    scheduler = sched_cls.from_config(sched_cfg)
    host: Any = StableDiffusionPipeline(
        vae=vae,  # type: ignore[arg-type]
        text_encoder=text_encoder,  # type: ignore[arg-type]
        tokenizer=tokenizer,
        unet=unet,  # type: ignore[arg-type]
        scheduler=scheduler,
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    host.set_progress_bar_config(disable=True)
    return BuiltBase(
        component_id=cid,
        family=handle.family,
        unet=unet,  # type: ignore[arg-type]
        vae=vae,  # type: ignore[arg-type]
        text_encoder=text_encoder,  # type: ignore[arg-type]
        tokenizer=tokenizer,
        scheduler_cls=sched_cls,
        scheduler_config=dict(sched_cfg),
        bytes=sum(module_bytes(m) for m in (unet, vae, text_encoder)),
        adapter_host=host,
    )


def build_controlnet(
    mapper: SegmentMapper,
    handle: instance_manager_pb2.HostHandle,
    placement: DevicePlacement,
    skeletons: SkeletonPool | None = None,
) -> BuiltControlNet:
    """Builds a ControlNet module from a CONTROLNET handle (a diffusers folder; skeleton from ``skeletons``)."""
    cid = handle.component_id
    if handle.kind != common_pb2.COMPONENT_KIND_CONTROLNET:
        raise FailedPrecondition(f"component {cid!r} is not a CONTROLNET")
    configs = configs_of(handle)
    cfg = _json(configs, "config.json", cid)
    model = build_module(ControlNetModel, cfg, subfolder_state_dict(mapper, handle, ""), placement, cid, skeletons)
    return BuiltControlNet(cid, handle.family, model, module_bytes(model))  # type: ignore[arg-type]


TASK_PIPELINES: dict[tuple[int, bool], Any] = {
    (common_pb2.TASK_TXT2IMG, False): StableDiffusionPipeline,
    (common_pb2.TASK_TXT2IMG, True): StableDiffusionControlNetPipeline,
    (common_pb2.TASK_IMG2IMG, False): StableDiffusionImg2ImgPipeline,
    (common_pb2.TASK_IMG2IMG, True): StableDiffusionControlNetImg2ImgPipeline,
    (common_pb2.TASK_INPAINT, False): StableDiffusionInpaintPipeline,
    (common_pb2.TASK_INPAINT, True): StableDiffusionControlNetInpaintPipeline,
}


def make_pipeline(base: BuiltBase, controlnets: Iterable[BuiltControlNet], task: int) -> Any:
    """A pipeline for ``task`` sharing ``base``'s modules (and the ControlNets'); cheap to create.

    The modules — and the LoRA adapters injected into them — are the same objects for every
    pipeline, so nothing is copied; only the scheduler is new (it holds per-run state).
    """
    cns = [c.model for c in controlnets]
    task = task or common_pb2.TASK_TXT2IMG
    cls = TASK_PIPELINES[(task, bool(cns))]
    kwargs: dict[str, Any] = dict(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        scheduler=base.new_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if cns:
        kwargs["controlnet"] = cns[0] if len(cns) == 1 else cns
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
