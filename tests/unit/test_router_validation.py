"""Router request validation: every rule raises INVALID_ARGUMENT naming its field."""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import pytest
from diffmesh.errors import InvalidArgument
from diffmesh.v1 import common_pb2
from diffmesh_router.validation import component_ids, validate_against_catalog, validate_request
from PIL import Image


def _png(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 48), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def _request() -> tuple[common_pb2.PipelineSpec, common_pb2.GenerationParams]:
    pipeline = common_pb2.PipelineSpec(
        base_id="sd15-base-a",
        loras=[common_pb2.LoraRef(id="lora-1", scale=0.8), common_pb2.LoraRef(id="lora-2", scale=-1.0)],
        controlnets=[common_pb2.ControlNetRef(id="cn-canny", image=_png(), scale=1.0)],
    )
    params = common_pb2.GenerationParams(prompt="a cat", steps=4, width=64, height=64, num_images=1, seed=7)
    return pipeline, params


def _field_of(
    pipeline: common_pb2.PipelineSpec, params: common_pb2.GenerationParams, request_id: str = "", tenant: str = ""
) -> str:
    with pytest.raises(InvalidArgument) as err:
        validate_request(request_id, tenant, pipeline, params)
    assert err.value.field in str(err.value)
    return err.value.field


def test_a_good_request_passes() -> None:
    pipeline, params = _request()
    validate_request("req-1", "tenant-a", pipeline, params)
    params.num_images = 0  # 0 means 1
    params.width, params.height, params.steps = 2048, 64, 150
    validate_request("", "", pipeline, params)


def _inpaint_without_mask(params: common_pb2.GenerationParams) -> None:
    params.task = common_pb2.TASK_INPAINT
    params.init_image = _png()


Mutation = Callable[[common_pb2.PipelineSpec, common_pb2.GenerationParams], object]

PARAM_CASES: list[tuple[str, Mutation, str]] = [
    ("steps zero", lambda pl, pa: setattr(pa, "steps", 0), "params.steps"),
    ("steps negative", lambda pl, pa: setattr(pa, "steps", -3), "params.steps"),
    ("steps over 150", lambda pl, pa: setattr(pa, "steps", 151), "params.steps"),
    ("width not multiple of 8", lambda pl, pa: setattr(pa, "width", 100), "params.width"),
    ("width below 64", lambda pl, pa: setattr(pa, "width", 56), "params.width"),
    ("width above 2048", lambda pl, pa: setattr(pa, "width", 2056), "params.width"),
    ("height zero", lambda pl, pa: setattr(pa, "height", 0), "params.height"),
    ("height not multiple of 8", lambda pl, pa: setattr(pa, "height", 65), "params.height"),
    ("num_images 9", lambda pl, pa: setattr(pa, "num_images", 9), "params.num_images"),
    ("num_images negative", lambda pl, pa: setattr(pa, "num_images", -1), "params.num_images"),
    ("guidance nan", lambda pl, pa: setattr(pa, "guidance_scale", math.nan), "params.guidance_scale"),
    ("guidance negative", lambda pl, pa: setattr(pa, "guidance_scale", -1.0), "params.guidance_scale"),
    ("strength above 1", lambda pl, pa: setattr(pa, "strength", 1.5), "params.strength"),
    ("prompt too long", lambda pl, pa: setattr(pa, "prompt", "x" * 9000), "params.prompt"),
    ("unknown task", lambda pl, pa: setattr(pa, "task", 42), "params.task"),
    ("img2img without image", lambda pl, pa: setattr(pa, "task", common_pb2.TASK_IMG2IMG), "params.init_image"),
    ("inpaint without mask", lambda pl, pa: _inpaint_without_mask(pa), "params.mask_image"),
]

PIPELINE_CASES: list[tuple[str, Mutation, str]] = [
    ("base empty", lambda pl, pa: setattr(pl, "base_id", ""), "pipeline.base_id"),
    ("base bad characters", lambda pl, pa: setattr(pl, "base_id", "a b/c"), "pipeline.base_id"),
    ("lora scale inf", lambda pl, pa: setattr(pl.loras[1], "scale", math.inf), "pipeline.loras[1].scale"),
    ("lora scale nan", lambda pl, pa: setattr(pl.loras[0], "scale", math.nan), "pipeline.loras[0].scale"),
    ("lora scale above 4", lambda pl, pa: setattr(pl.loras[1], "scale", 4.5), "pipeline.loras[1].scale"),
    ("lora scale below -4", lambda pl, pa: setattr(pl.loras[0], "scale", -4.01), "pipeline.loras[0].scale"),
    ("lora id empty", lambda pl, pa: setattr(pl.loras[1], "id", ""), "pipeline.loras[1].id"),
    ("lora listed twice", lambda pl, pa: setattr(pl.loras[1], "id", "lora-1"), "pipeline.loras[1].id"),
    (
        "nine loras",
        lambda pl, pa: pl.loras.extend(common_pb2.LoraRef(id=f"x{i}", scale=1.0) for i in range(7)),
        "pipeline.loras",
    ),
    ("controlnet scale above 4", lambda pl, pa: setattr(pl.controlnets[0], "scale", 5.0), "pipeline.controlnets[0].scale"),
    ("controlnet image empty", lambda pl, pa: setattr(pl.controlnets[0], "image", b""), "pipeline.controlnets[0].image"),
    (
        "controlnet image not an image",
        lambda pl, pa: setattr(pl.controlnets[0], "image", b"GIF89a not supported"),
        "pipeline.controlnets[0].image",
    ),
    (
        "controlnet image truncated png",
        lambda pl, pa: setattr(pl.controlnets[0], "image", _png()[:60]),
        "pipeline.controlnets[0].image",
    ),
    (
        "controlnet image png signature only",
        lambda pl, pa: setattr(pl.controlnets[0], "image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),
        "pipeline.controlnets[0].image",
    ),
    (
        "controlnet image corrupt jpeg",
        lambda pl, pa: setattr(pl.controlnets[0], "image", b"\xff\xd8\xff\xe0" + b"\x00" * 64),
        "pipeline.controlnets[0].image",
    ),
    (
        "five controlnets",
        lambda pl, pa: pl.controlnets.extend(common_pb2.ControlNetRef(id=f"cn{i}", image=_png()) for i in range(4)),
        "pipeline.controlnets",
    ),
]


ALL_CASES = PARAM_CASES + PIPELINE_CASES


@pytest.mark.parametrize(("name", "mutate", "field"), ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_each_rule_names_its_field(name: str, mutate: Mutation, field: str) -> None:
    pipeline, params = _request()
    mutate(pipeline, params)
    assert _field_of(pipeline, params) == field


def test_request_id_and_tenant_limits() -> None:
    pipeline, params = _request()
    assert _field_of(pipeline, params, request_id="has space") == "request_id"
    assert _field_of(pipeline, params, request_id="x" * 129) == "request_id"
    assert _field_of(pipeline, params, tenant="t" * 129) == "tenant"


def test_img2img_and_inpaint_with_images_pass() -> None:
    pipeline, params = _request()
    params.task = common_pb2.TASK_INPAINT
    params.init_image = _png()
    params.mask_image = _jpeg()
    params.strength = 0.5
    validate_request("", "", pipeline, params)


def _catalog() -> dict[str, common_pb2.Component]:
    kind = common_pb2
    return {
        "sd15-base-a": common_pb2.Component(id="sd15-base-a", kind=kind.COMPONENT_KIND_BASE, family="sd15", bytes=1000),
        "lora-1": common_pb2.Component(id="lora-1", kind=kind.COMPONENT_KIND_LORA, family="sd15", bytes=10),
        "lora-2": common_pb2.Component(id="lora-2", kind=kind.COMPONENT_KIND_LORA, family="sd15", bytes=10),
        "cn-canny": common_pb2.Component(id="cn-canny", kind=kind.COMPONENT_KIND_CONTROLNET, family="sd15", bytes=100),
    }


def _catalog_field(pipeline: common_pb2.PipelineSpec, records: dict[str, common_pb2.Component]) -> str:
    with pytest.raises(InvalidArgument) as err:
        validate_against_catalog(pipeline, records)
    return err.value.field


def test_catalog_kinds_and_families() -> None:
    pipeline, _ = _request()
    validate_against_catalog(pipeline, _catalog())

    records = _catalog()
    records["sd15-base-a"].kind = common_pb2.COMPONENT_KIND_LORA
    assert _catalog_field(pipeline, records) == "pipeline.base_id"

    records = _catalog()
    records["lora-2"].kind = common_pb2.COMPONENT_KIND_CONTROLNET
    assert _catalog_field(pipeline, records) == "pipeline.loras[1].id"

    records = _catalog()
    records["lora-1"].family = "sdxl"
    assert _catalog_field(pipeline, records) == "pipeline.loras[0].id"

    records = _catalog()
    records["cn-canny"].kind = common_pb2.COMPONENT_KIND_LORA
    assert _catalog_field(pipeline, records) == "pipeline.controlnets[0].id"

    records = _catalog()
    records["cn-canny"].family = "sdxl"
    assert _catalog_field(pipeline, records) == "pipeline.controlnets[0].id"

    records = _catalog()
    records["sd15-base-a"].kind = common_pb2.COMPONENT_KIND_FUSED  # a fused overlay is a valid base
    validate_against_catalog(pipeline, records)


def test_a_fused_overlay_stands_for_its_base_and_its_family_rules() -> None:
    pipeline, _ = _request()
    fused = common_pb2.Component(
        id="fused-0123456789abcdef0123", kind=common_pb2.COMPONENT_KIND_FUSED, family="sd15", base_id="sd15-base-a", bytes=50
    )
    pipeline.base_id = fused.id
    records = {**_catalog(), fused.id: fused}
    validate_against_catalog(pipeline, records)  # runtime LoRAs and ControlNets on top of an overlay

    records[fused.id].family = "sdxl"  # LoRAs and ControlNets must match the overlay's own family
    assert _catalog_field(pipeline, records) == "pipeline.loras[0].id"

    records = {**_catalog(), fused.id: fused}
    records[fused.id].family = "sd15"
    pipeline.loras[0].id = fused.id  # an overlay is no LoRA
    assert _catalog_field(pipeline, records) == "pipeline.loras[0].id"


def test_component_ids_base_first_without_duplicates() -> None:
    pipeline, _ = _request()
    pipeline.controlnets.add(id="lora-1")
    assert component_ids(pipeline) == ["sd15-base-a", "lora-1", "lora-2", "cn-canny"]
