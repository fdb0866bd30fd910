"""Every check the router makes on a generation request before forwarding it.

Two stages: :func:`validate_request` needs only the request (ranges, counts, ids,
decodable images) and runs first; :func:`validate_against_catalog` needs the catalog
records of the pipeline's components (kinds and families). Each failure raises
:class:`~diffmesh.errors.InvalidArgument` naming the field, e.g. ``params.steps`` or
``pipeline.loras[1].scale``.
"""

from __future__ import annotations

import io
import math
import re
import struct
from collections.abc import Mapping

from diffmesh.errors import InvalidArgument
from diffmesh.v1 import common_pb2

try:  # Pillow is a dependency of the router; without it only the headers are checked.
    from PIL import Image as _PILImage
except ImportError:  # pragma: no cover - exercised only in stripped-down installs
    _PILImage = None  # type: ignore[assignment]

MIN_STEPS, MAX_STEPS = 1, 150
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 64, 2048, 8
MAX_IMAGES = 8
MAX_LORAS = 8
MAX_CONTROLNETS = 4
LORA_SCALE_LIMIT = 4.0
CONTROLNET_SCALE_MAX = 4.0
GUIDANCE_MAX = 50.0
MAX_PROMPT_CHARS = 8192
MAX_INPUT_IMAGE_SIDE = 8192
MAX_TEXT_ID_CHARS = 128

COMPONENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PRINTABLE_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
BASE_KINDS = (common_pb2.COMPONENT_KIND_BASE, common_pb2.COMPONENT_KIND_FUSED)


def _kind_name(kind: int) -> str:
    names: dict[int, str] = {int(v): k.removeprefix("COMPONENT_KIND_") for k, v in common_pb2.ComponentKind.items()}
    return names.get(kind, str(kind))


def check_image(data: bytes, field: str) -> tuple[int, int]:
    """Checks that ``data`` is a decodable PNG or JPEG image; returns (width, height)."""
    if not data:
        raise InvalidArgument(field, "is empty; expected PNG or JPEG bytes")
    if data.startswith(PNG_SIGNATURE):
        if len(data) < 33 or data[12:16] != b"IHDR":
            raise InvalidArgument(field, "is not a decodable PNG image (missing IHDR header)")
        width, height = struct.unpack(">II", data[16:24])
        if width == 0 or height == 0:
            raise InvalidArgument(field, f"is not a decodable PNG image (size {width}x{height})")
        expected = "PNG"
    elif data.startswith(JPEG_SIGNATURE):
        expected = "JPEG"
        width = height = 0
    else:
        raise InvalidArgument(field, "is not a PNG or JPEG image (unknown signature)")
    if _PILImage is None:
        return width, height
    try:
        with _PILImage.open(io.BytesIO(data)) as img:
            if img.format != expected:
                raise InvalidArgument(field, f"is not a decodable {expected} image (decoded as {img.format})")
            width, height = img.size
            if width > MAX_INPUT_IMAGE_SIDE or height > MAX_INPUT_IMAGE_SIDE:
                raise InvalidArgument(field, f"is {width}x{height}; at most {MAX_INPUT_IMAGE_SIDE} pixels per side")
            img.load()
    except InvalidArgument:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the image is unusable
        raise InvalidArgument(field, f"is not a decodable {expected} image ({type(exc).__name__}: {exc})") from None
    return width, height


def _check_finite_range(value: float, field: str, low: float, high: float) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(field, f"must be finite, got {value}")
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be within [{low:g}, {high:g}], got {value:g}")


def _check_component_id(value: str, field: str) -> None:
    if not value:
        raise InvalidArgument(field, "is required")
    if not COMPONENT_ID.match(value):
        raise InvalidArgument(field, "must be 1-128 characters of [A-Za-z0-9._:-]")


def validate_params(params: common_pb2.GenerationParams) -> None:
    """Checks the generation parameters (ranges, task inputs); decodes input images."""
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
    _check_finite_range(params.guidance_scale, "params.guidance_scale", 0.0, GUIDANCE_MAX)
    _check_finite_range(params.strength, "params.strength", 0.0, 1.0)
    for name in ("prompt", "negative_prompt"):
        if len(getattr(params, name)) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"params.{name}", f"must be at most {MAX_PROMPT_CHARS} characters")
    if params.task not in common_pb2.Task.values():
        raise InvalidArgument("params.task", f"unknown task {params.task}")
    if params.task in (common_pb2.TASK_IMG2IMG, common_pb2.TASK_INPAINT):
        check_image(params.init_image, "params.init_image")
    if params.task == common_pb2.TASK_INPAINT:
        check_image(params.mask_image, "params.mask_image")


def validate_pipeline(pipeline: common_pb2.PipelineSpec) -> None:
    """Checks the pipeline's shape: ids, counts, scales and ControlNet images."""
    _check_component_id(pipeline.base_id, "pipeline.base_id")
    if len(pipeline.loras) > MAX_LORAS:
        raise InvalidArgument("pipeline.loras", f"at most {MAX_LORAS} LoRAs, got {len(pipeline.loras)}")
    seen: set[str] = set()
    for i, lora in enumerate(pipeline.loras):
        _check_component_id(lora.id, f"pipeline.loras[{i}].id")
        if lora.id in seen:
            raise InvalidArgument(f"pipeline.loras[{i}].id", f"LoRA {lora.id!r} is listed twice")
        seen.add(lora.id)
        _check_finite_range(lora.scale, f"pipeline.loras[{i}].scale", -LORA_SCALE_LIMIT, LORA_SCALE_LIMIT)
    if len(pipeline.controlnets) > MAX_CONTROLNETS:
        raise InvalidArgument("pipeline.controlnets", f"at most {MAX_CONTROLNETS} ControlNets, got {len(pipeline.controlnets)}")
    for i, cn in enumerate(pipeline.controlnets):
        _check_component_id(cn.id, f"pipeline.controlnets[{i}].id")
        _check_finite_range(cn.scale, f"pipeline.controlnets[{i}].scale", 0.0, CONTROLNET_SCALE_MAX)
        check_image(cn.image, f"pipeline.controlnets[{i}].image")


def validate_request(
    request_id: str, tenant: str, pipeline: common_pb2.PipelineSpec, params: common_pb2.GenerationParams
) -> None:
    """Every check that needs only the request itself (stage one)."""
    if request_id and not PRINTABLE_ID.match(request_id):
        raise InvalidArgument("request_id", f"must be 1-{MAX_TEXT_ID_CHARS} printable ASCII characters without spaces")
    if len(tenant) > MAX_TEXT_ID_CHARS:
        raise InvalidArgument("tenant", f"must be at most {MAX_TEXT_ID_CHARS} characters")
    validate_pipeline(pipeline)
    validate_params(params)


def has_images(pipeline: common_pb2.PipelineSpec, params: common_pb2.GenerationParams) -> bool:
    """True when stage one will decode images (worth running off the event loop)."""
    return bool(pipeline.controlnets) or params.task in (common_pb2.TASK_IMG2IMG, common_pb2.TASK_INPAINT)


def component_ids(pipeline: common_pb2.PipelineSpec) -> list[str]:
    """Every component id the pipeline uses, base first, without duplicates, in request order."""
    ids = [pipeline.base_id, *(lora.id for lora in pipeline.loras), *(cn.id for cn in pipeline.controlnets)]
    return list(dict.fromkeys(ids))


def validate_against_catalog(pipeline: common_pb2.PipelineSpec, records: Mapping[str, common_pb2.Component]) -> None:
    """Checks kinds and families against the catalog records of every component (stage two).

    The base may be a BASE or a FUSED overlay (the worker runs it instead of runtime
    adapters); LoRAs and ControlNets must be of the base's — or the overlay's — family.
    """
    base = records[pipeline.base_id]
    if base.kind not in BASE_KINDS:
        raise InvalidArgument("pipeline.base_id", f"{base.id!r} is a {_kind_name(base.kind)}, not a base model")
    for i, lora in enumerate(pipeline.loras):
        rec = records[lora.id]
        if rec.kind != common_pb2.COMPONENT_KIND_LORA:
            raise InvalidArgument(f"pipeline.loras[{i}].id", f"{rec.id!r} is a {_kind_name(rec.kind)}, not a LORA")
        if rec.family != base.family:
            raise InvalidArgument(
                f"pipeline.loras[{i}].id", f"{rec.id!r} is family {rec.family!r}, the base {base.id!r} is {base.family!r}"
            )
    for i, cn in enumerate(pipeline.controlnets):
        rec = records[cn.id]
        if rec.kind != common_pb2.COMPONENT_KIND_CONTROLNET:
            raise InvalidArgument(f"pipeline.controlnets[{i}].id", f"{rec.id!r} is a {_kind_name(rec.kind)}, not a CONTROLNET")
        if rec.family != base.family:
            raise InvalidArgument(
                f"pipeline.controlnets[{i}].id", f"{rec.id!r} is family {rec.family!r}, the base {base.id!r} is {base.family!r}"
            )
