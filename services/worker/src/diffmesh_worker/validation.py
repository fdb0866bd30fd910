"""Defensive validation of a RunRequest.

The router validates too, but a worker is reachable on its own port, so it trusts nothing:
every field is checked here and turned into a :class:`Job` with decoded images, or an
:class:`~diffmesh.errors.InvalidArgument` naming the field (e.g. ``pipeline.controlnets[0].image``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from diffmesh.errors import InvalidArgument
from diffmesh.pipeline_key import canonical_key
from diffmesh.v1 import common_pb2, worker_pb2
from PIL import Image

from diffmesh_worker.images import decode_image

ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_STEPS = 150
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_IMAGES = 8
MAX_LORAS = 8
MAX_CONTROLNETS = 4
LORA_SCALE_LIMIT = 4.0
CONTROLNET_SCALE_LIMIT = 4.0
MAX_GUIDANCE = 50.0
MAX_PROMPT_CHARS = 10_000
DEFAULT_GUIDANCE = 7.5
DEFAULT_STRENGTH = 0.75
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass
class ControlNetInput:
    """One ControlNet of a job with its decoded conditioning image."""

    id: str
    image: Image.Image
    scale: float


@dataclass
class Job:
    """A validated generation request."""

    request_id: str
    base_id: str
    loras: list[tuple[str, float]]
    controlnets: list[ControlNetInput]
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    num_images: int
    task: int
    strength: float
    init_image: Image.Image | None = None
    mask_image: Image.Image | None = None
    pipeline_key: str = ""
    seeds: list[int] = field(default_factory=list)

    def component_ids(self) -> list[str]:
        """Every component the job needs: base first, then LoRAs, then ControlNets."""
        return [self.base_id, *(lid for lid, _ in self.loras), *(c.id for c in self.controlnets)]


def _check_id(value: str, name: str) -> str:
    if not value:
        raise InvalidArgument(name, "is required")
    if not ID_RE.match(value):
        raise InvalidArgument(name, "must be 1-128 characters of [A-Za-z0-9._:-]")
    return value


def _finite(value: float, name: str, low: float, high: float) -> float:
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidArgument(name, f"must be a finite number within [{low:g}, {high:g}], got {value!r}")
    return float(value)


def image_seeds(seed: int, count: int) -> list[int]:
    """The seed of each image: ``seed + i``, wrapped into int64."""
    return [((seed + i - INT64_MIN) % 2**64) + INT64_MIN for i in range(count)]


def validate(request: worker_pb2.RunRequest) -> Job:
    """Checks every field of ``request``; returns the job or raises InvalidArgument naming the field."""
    pipe = request.pipeline
    params = request.params
    base_id = _check_id(pipe.base_id, "pipeline.base_id")

    steps = params.steps
    if not 1 <= steps <= MAX_STEPS:
        raise InvalidArgument("params.steps", f"must be within 1..{MAX_STEPS}, got {steps}")
    for name in ("width", "height"):
        side = getattr(params, name)
        if not MIN_SIDE <= side <= MAX_SIDE or side % 8:
            raise InvalidArgument(f"params.{name}", f"must be a multiple of 8 within {MIN_SIDE}..{MAX_SIDE}, got {side}")
    num_images = params.num_images or 1
    if not 1 <= num_images <= MAX_IMAGES:
        raise InvalidArgument("params.num_images", f"must be within 1..{MAX_IMAGES} (0 means 1), got {params.num_images}")
    guidance = _finite(params.guidance_scale, "params.guidance_scale", 0.0, MAX_GUIDANCE) or DEFAULT_GUIDANCE
    if len(params.prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument("params.prompt", f"at most {MAX_PROMPT_CHARS} characters")
    if len(params.negative_prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument("params.negative_prompt", f"at most {MAX_PROMPT_CHARS} characters")
    task = params.task or common_pb2.TASK_TXT2IMG
    if task not in (common_pb2.TASK_TXT2IMG, common_pb2.TASK_IMG2IMG, common_pb2.TASK_INPAINT):
        raise InvalidArgument("params.task", f"unknown task {params.task}")
    strength = _finite(params.strength, "params.strength", 0.0, 1.0) or DEFAULT_STRENGTH

    if len(pipe.loras) > MAX_LORAS:
        raise InvalidArgument("pipeline.loras", f"at most {MAX_LORAS} LoRAs, got {len(pipe.loras)}")
    loras: list[tuple[str, float]] = []
    for i, lora in enumerate(pipe.loras):
        lid = _check_id(lora.id, f"pipeline.loras[{i}].id")
        if lid == base_id or any(lid == other for other, _ in loras):
            raise InvalidArgument(f"pipeline.loras[{i}].id", f"{lid!r} is listed twice")
        loras.append((lid, _finite(lora.scale, f"pipeline.loras[{i}].scale", -LORA_SCALE_LIMIT, LORA_SCALE_LIMIT)))

    size = (params.width, params.height)
    if len(pipe.controlnets) > MAX_CONTROLNETS:
        raise InvalidArgument("pipeline.controlnets", f"at most {MAX_CONTROLNETS} ControlNets, got {len(pipe.controlnets)}")
    controlnets: list[ControlNetInput] = []
    for i, cn in enumerate(pipe.controlnets):
        cid = _check_id(cn.id, f"pipeline.controlnets[{i}].id")
        if cid == base_id or cid in {lid for lid, _ in loras} or any(c.id == cid for c in controlnets):
            raise InvalidArgument(f"pipeline.controlnets[{i}].id", f"{cid!r} is listed twice")
        scale = _finite(cn.scale, f"pipeline.controlnets[{i}].scale", 0.0, CONTROLNET_SCALE_LIMIT) or 1.0
        image = decode_image(cn.image, f"pipeline.controlnets[{i}].image", size)
        controlnets.append(ControlNetInput(cid, image, scale))

    init_image = mask_image = None
    if task in (common_pb2.TASK_IMG2IMG, common_pb2.TASK_INPAINT):
        init_image = decode_image(params.init_image, "params.init_image", size)
    if task == common_pb2.TASK_INPAINT:
        mask_image = decode_image(params.mask_image, "params.mask_image", size, mode="L")

    job = Job(
        request_id=request.request_id,
        base_id=base_id,
        loras=loras,
        controlnets=controlnets,
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        steps=steps,
        guidance_scale=guidance,
        seed=params.seed,
        width=params.width,
        height=params.height,
        num_images=num_images,
        task=task,
        strength=strength,
        init_image=init_image,
        mask_image=mask_image,
    )
    job.pipeline_key = canonical_key(base_id, loras, [c.id for c in controlnets])
    job.seeds = image_seeds(params.seed, num_images)
    return job
