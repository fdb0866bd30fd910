"""Defensive validation of a RunRequest.

The router validates too, but a worker is reachable on its own port, so it trusts nothing:
the shared rules of :mod:`diffmesh.request_validation` check every field, then the request
becomes a :class:`Job` with defaults applied and images decoded to the output size, or an
:class:`~diffmesh.errors.InvalidArgument` names the field (e.g. ``pipeline.controlnets[0].image``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffmesh.pipeline_key import canonical_key
from diffmesh.request_validation import fit_image, validate_generation
from diffmesh.v1 import common_pb2, worker_pb2
from PIL import Image

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


def image_seeds(seed: int, count: int) -> list[int]:
    """The seed of each image: ``seed + i``, wrapped into int64."""
    return [((seed + i - INT64_MIN) % 2**64) + INT64_MIN for i in range(count)]


def validate(request: worker_pb2.RunRequest) -> Job:
    """Checks every field of ``request``; returns the job or raises InvalidArgument naming the field."""
    pipe = request.pipeline
    params = request.params
    images = validate_generation(pipe, params)
    size = (params.width, params.height)
    num_images = params.num_images or 1
    loras = [(lora.id, float(lora.scale)) for lora in pipe.loras]
    controlnets = [
        ControlNetInput(cn.id, fit_image(image, size), float(cn.scale) or 1.0)
        for cn, image in zip(pipe.controlnets, images.controlnets, strict=True)
    ]
    job = Job(
        request_id=request.request_id,
        base_id=pipe.base_id,
        loras=loras,
        controlnets=controlnets,
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        steps=params.steps,
        guidance_scale=float(params.guidance_scale) or DEFAULT_GUIDANCE,
        seed=params.seed,
        width=params.width,
        height=params.height,
        num_images=num_images,
        task=params.task or common_pb2.TASK_TXT2IMG,
        strength=float(params.strength) or DEFAULT_STRENGTH,
        init_image=None if images.init_image is None else fit_image(images.init_image, size),
        mask_image=None if images.mask_image is None else fit_image(images.mask_image, size, mode="L"),
    )
    job.pipeline_key = canonical_key(pipe.base_id, loras, [c.id for c in controlnets])
    job.seeds = image_seeds(params.seed, num_images)
    return job
