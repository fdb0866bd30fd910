"""The catalog-independent rules of a generation request (router and worker both apply them).

:func:`validate_generation` checks a :class:`~diffmesh.v1.common_pb2.PipelineSpec` and its
:class:`~diffmesh.v1.common_pb2.GenerationParams`: ranges, counts, component ids (each id
at most once in a pipeline) and input images, which it decodes and returns. Each failure
raises :class:`~diffmesh.errors.InvalidArgument` naming the field, e.g. ``params.steps``
or ``pipeline.loras[1].scale``. Rules that need the catalog (kinds, families, unknown ids)
belong to the caller.

Images need Pillow (the ``images`` extra); it is imported only when an image is decoded,
so this module imports without it.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from diffmesh.catalog import ID_RE
from diffmesh.errors import InvalidArgument
from diffmesh.v1 import common_pb2

if TYPE_CHECKING:
    from PIL import Image

MIN_STEPS, MAX_STEPS = 1, 150
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 64, 2048, 8
MAX_IMAGES = 8
MAX_LORAS = 8
MAX_CONTROLNETS = 4
LORA_SCALE_LIMIT = 4.0
"""The one bound on ``|scale|`` of a LoRA, in requests and in fused overlays alike."""
CONTROLNET_SCALE_MAX = 4.0
GUIDANCE_MAX = 50.0
MAX_PROMPT_CHARS = 8192

# Input images: a decompression-bomb guard (a small PNG can claim gigapixels) and a size cap.
MAX_INPUT_BYTES = 32 * 1024 * 1024
MAX_INPUT_IMAGE_SIDE = 8192
MAX_INPUT_PIXELS = 4096 * 4096

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
IMAGE_TASKS = (common_pb2.TASK_IMG2IMG, common_pb2.TASK_INPAINT)


@dataclass
class RequestImages:
    """The decoded input images of a valid request, at their own size and mode."""

    controlnets: list[Image.Image] = field(default_factory=list)
    init_image: Image.Image | None = None
    mask_image: Image.Image | None = None


def check_finite_range(value: float, field: str, low: float, high: float) -> None:
    """Raises InvalidArgument unless ``value`` is finite and within ``[low, high]``."""
    if not math.isfinite(value):
        raise InvalidArgument(field, f"must be finite, got {value}")
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be within [{low:g}, {high:g}], got {value:g}")


def check_component_id(value: str, field: str) -> None:
    """Raises InvalidArgument unless ``value`` is a well-formed component id."""
    if not value:
        raise InvalidArgument(field, "is required")
    if not ID_RE.match(value):
        raise InvalidArgument(field, "must be 1-128 characters of [A-Za-z0-9._:-]")


def _sniff_format(data: bytes, field: str) -> str:
    if not data:
        raise InvalidArgument(field, "is empty; expected PNG or JPEG bytes")
    if len(data) > MAX_INPUT_BYTES:
        raise InvalidArgument(field, f"is {len(data)} bytes; at most {MAX_INPUT_BYTES} allowed")
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    if data.startswith(JPEG_SIGNATURE):
        return "JPEG"
    raise InvalidArgument(field, "is not a PNG or JPEG image (unknown signature)")


def open_image(data: bytes, field: str) -> Image.Image:
    """Decodes PNG or JPEG bytes into a fully loaded image.

    Raises :class:`InvalidArgument` naming ``field`` when the bytes are empty, too large,
    not PNG/JPEG, larger than :data:`MAX_INPUT_IMAGE_SIDE` per side or
    :data:`MAX_INPUT_PIXELS` in all, or corrupt.
    """
    expected = _sniff_format(data, field)
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                if probe.format != expected:
                    raise InvalidArgument(field, f"is not a decodable {expected} image (decoded as {probe.format})")
                width, height = probe.size
                if width <= 0 or height <= 0:
                    raise InvalidArgument(field, f"is not a decodable {expected} image (size {width}x{height})")
                if max(width, height) > MAX_INPUT_IMAGE_SIDE or width * height > MAX_INPUT_PIXELS:
                    raise InvalidArgument(
                        field,
                        f"is {width}x{height}; at most {MAX_INPUT_IMAGE_SIDE} pixels per side"
                        f" and {MAX_INPUT_PIXELS} pixels in all",
                    )
                probe.verify()  # structure and checksums; the object is unusable afterwards
            image = Image.open(io.BytesIO(data))
            image.load()
    except InvalidArgument:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the image is unusable
        raise InvalidArgument(field, f"is not a decodable {expected} image ({type(exc).__name__}: {exc})") from None
    return image


def check_image(data: bytes, field: str) -> tuple[int, int]:
    """Checks that ``data`` is a decodable PNG or JPEG image (see :func:`open_image`); returns (width, height)."""
    size: tuple[int, int] = open_image(data, field).size
    return size


def fit_image(image: Image.Image, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """``image`` converted to ``mode`` and resized (bicubic) to ``size`` (width, height)."""
    from PIL import Image

    image = image.convert(mode)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image


def decode_image(data: bytes, field: str, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Decodes PNG/JPEG bytes (see :func:`open_image`) into a ``mode`` image of ``size`` (width, height)."""
    return fit_image(open_image(data, field), size, mode)


def validate_pipeline(pipeline: common_pb2.PipelineSpec) -> None:
    """Checks the pipeline's shape: ids (each at most once), counts and scales; not its images."""
    check_component_id(pipeline.base_id, "pipeline.base_id")
    seen = {pipeline.base_id}
    if len(pipeline.loras) > MAX_LORAS:
        raise InvalidArgument("pipeline.loras", f"at most {MAX_LORAS} LoRAs, got {len(pipeline.loras)}")
    for i, lora in enumerate(pipeline.loras):
        check_component_id(lora.id, f"pipeline.loras[{i}].id")
        if lora.id in seen:
            raise InvalidArgument(f"pipeline.loras[{i}].id", f"{lora.id!r} is listed twice")
        seen.add(lora.id)
        check_finite_range(lora.scale, f"pipeline.loras[{i}].scale", -LORA_SCALE_LIMIT, LORA_SCALE_LIMIT)
    if len(pipeline.controlnets) > MAX_CONTROLNETS:
        raise InvalidArgument("pipeline.controlnets", f"at most {MAX_CONTROLNETS} ControlNets, got {len(pipeline.controlnets)}")
    for i, cn in enumerate(pipeline.controlnets):
        check_component_id(cn.id, f"pipeline.controlnets[{i}].id")
        if cn.id in seen:
            raise InvalidArgument(f"pipeline.controlnets[{i}].id", f"{cn.id!r} is listed twice")
        seen.add(cn.id)
        check_finite_range(cn.scale, f"pipeline.controlnets[{i}].scale", 0.0, CONTROLNET_SCALE_MAX)


def validate_params(params: common_pb2.GenerationParams) -> None:
    """Checks the generation parameters' ranges and task; not their images."""
    if not MIN_STEPS <= params.steps <= MAX_STEPS:
        raise InvalidArgument("params.steps", f"must be within {MIN_STEPS}..{MAX_STEPS}, got {params.steps}")
    for name in ("width", "height"):
        side = getattr(params, name)
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise InvalidArgument(f"params.{name}", f"must be within {MIN_SIDE}..{MAX_SIDE}, got {side}")
        if side % SIDE_MULTIPLE:
            raise InvalidArgument(f"params.{name}", f"must be a multiple of {SIDE_MULTIPLE}, got {side}")
    if not 0 <= params.num_images <= MAX_IMAGES:
        raise InvalidArgument("params.num_images", f"must be within 1..{MAX_IMAGES} (0 means 1), got {params.num_images}")
    check_finite_range(params.guidance_scale, "params.guidance_scale", 0.0, GUIDANCE_MAX)
    check_finite_range(params.strength, "params.strength", 0.0, 1.0)
    for name in ("prompt", "negative_prompt"):
        if len(getattr(params, name)) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"params.{name}", f"must be at most {MAX_PROMPT_CHARS} characters")
    if params.task not in common_pb2.Task.values():
        raise InvalidArgument("params.task", f"unknown task {params.task}")


def has_images(pipeline: common_pb2.PipelineSpec, params: common_pb2.GenerationParams) -> bool:
    """True when :func:`validate_generation` will decode images (worth running off an event loop)."""
    return bool(pipeline.controlnets) or params.task in IMAGE_TASKS


def validate_generation(pipeline: common_pb2.PipelineSpec, params: common_pb2.GenerationParams) -> RequestImages:
    """Every catalog-independent check of a request; returns its decoded input images.

    The cheap checks run first; images are decoded last, ControlNets' first, then the
    init image (IMG2IMG and INPAINT) and the mask (INPAINT).
    """
    validate_pipeline(pipeline)
    validate_params(params)
    images = RequestImages(
        controlnets=[open_image(cn.image, f"pipeline.controlnets[{i}].image") for i, cn in enumerate(pipeline.controlnets)]
    )
    if params.task in IMAGE_TASKS:
        images.init_image = open_image(params.init_image, "params.init_image")
    if params.task == common_pb2.TASK_INPAINT:
        images.mask_image = open_image(params.mask_image, "params.mask_image")
    return images
