"""The worker's own request validation and image decoding (it does not trust the router)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from diffmesh.errors import InvalidArgument
from diffmesh.pipeline_key import canonical_key
from diffmesh.request_validation import decode_image
from diffmesh.v1 import common_pb2, worker_pb2
from diffmesh_worker.images import encode_png
from diffmesh_worker.validation import image_seeds, validate
from PIL import Image


def _png(size: tuple[int, int] = (32, 48), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color=128 if mode == "L" else (10, 200, 30)).save(out, format=fmt)
    return out.getvalue()


def _request(**params: object) -> worker_pb2.RunRequest:
    pipeline = params.pop("pipeline", None) or common_pb2.PipelineSpec(base_id="base-a")
    gen = dict(prompt="p", steps=4, width=64, height=64, seed=1)
    gen.update(params)
    return worker_pb2.RunRequest(request_id="r1", pipeline=pipeline, params=common_pb2.GenerationParams(**gen))  # type: ignore[arg-type]


def _field(request: worker_pb2.RunRequest) -> str:
    with pytest.raises(InvalidArgument) as err:
        validate(request)
    assert err.value.field in str(err.value)
    return err.value.field


def test_valid_request_becomes_a_job() -> None:
    pipeline = common_pb2.PipelineSpec(
        base_id="base-a",
        loras=[common_pb2.LoraRef(id="l2", scale=0.5), common_pb2.LoraRef(id="l1", scale=-4.0)],
        controlnets=[common_pb2.ControlNetRef(id="cn", image=_png(), scale=0)],
    )
    job = validate(_request(pipeline=pipeline, num_images=0, seed=10, guidance_scale=0))
    assert job.num_images == 1 and job.seeds == [10]
    assert job.guidance_scale == 7.5 and job.strength == 0.75 and job.task == common_pb2.TASK_TXT2IMG
    assert job.loras == [("l2", 0.5), ("l1", -4.0)]
    assert job.component_ids() == ["base-a", "l2", "l1", "cn"]
    assert job.controlnets[0].scale == 1.0 and job.controlnets[0].image.size == (64, 64)
    assert job.pipeline_key == canonical_key("base-a", [("l1", -4.0), ("l2", 0.5)], ["cn"])


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (dict(steps=0), "params.steps"),
        (dict(steps=-3), "params.steps"),
        (dict(steps=151), "params.steps"),
        (dict(width=65), "params.width"),
        (dict(width=56), "params.width"),
        (dict(width=2056), "params.width"),
        (dict(height=0), "params.height"),
        (dict(num_images=9), "params.num_images"),
        (dict(num_images=-2), "params.num_images"),
        (dict(guidance_scale=float("inf")), "params.guidance_scale"),
        (dict(guidance_scale=-1.0), "params.guidance_scale"),
        (dict(strength=1.5), "params.strength"),
        (dict(task=7), "params.task"),
        (dict(task=common_pb2.TASK_IMG2IMG), "params.init_image"),
        (dict(task=common_pb2.TASK_INPAINT, init_image=_png()), "params.mask_image"),
        (dict(prompt="x" * 10_001), "params.prompt"),
    ],
)
def test_params_out_of_range(params: dict[str, object], field: str) -> None:
    assert _field(_request(**params)) == field


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 4.01, -5.0])
def test_lora_scale_must_be_finite_within_4(scale: float) -> None:
    pipeline = common_pb2.PipelineSpec(
        base_id="b", loras=[common_pb2.LoraRef(id="ok", scale=1), common_pb2.LoraRef(id="l", scale=scale)]
    )
    assert _field(_request(pipeline=pipeline)) == "pipeline.loras[1].scale"


def test_ids_and_counts() -> None:
    assert _field(_request(pipeline=common_pb2.PipelineSpec(base_id=""))) == "pipeline.base_id"
    assert _field(_request(pipeline=common_pb2.PipelineSpec(base_id="a b"))) == "pipeline.base_id"
    dup = common_pb2.PipelineSpec(base_id="b", loras=[common_pb2.LoraRef(id="l", scale=1), common_pb2.LoraRef(id="l", scale=1)])
    assert _field(_request(pipeline=dup)) == "pipeline.loras[1].id"
    many = common_pb2.PipelineSpec(base_id="b", loras=[common_pb2.LoraRef(id=f"l{i}", scale=1) for i in range(9)])
    assert _field(_request(pipeline=many)) == "pipeline.loras"
    cns = common_pb2.PipelineSpec(base_id="b", controlnets=[common_pb2.ControlNetRef(id=f"c{i}", image=_png()) for i in range(5)])
    assert _field(_request(pipeline=cns)) == "pipeline.controlnets"
    cn_scale = common_pb2.PipelineSpec(base_id="b", controlnets=[common_pb2.ControlNetRef(id="c", image=_png(), scale=-1)])
    assert _field(_request(pipeline=cn_scale)) == "pipeline.controlnets[0].scale"


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", _png()[:40], _png(fmt="GIF"), _png(size=(5000, 5000), mode="L")],
    ids=["empty", "garbage", "truncated", "gif", "too-many-pixels"],
)
def test_undecodable_controlnet_image_names_the_field(data: bytes) -> None:
    pipeline = common_pb2.PipelineSpec(
        base_id="b",
        controlnets=[common_pb2.ControlNetRef(id="c0", image=_png()), common_pb2.ControlNetRef(id="c1", image=data)],
    )
    assert _field(_request(pipeline=pipeline)) == "pipeline.controlnets[1].image"


def test_images_decode_resize_and_encode() -> None:
    jpeg = _png(size=(100, 80), fmt="JPEG")
    image = decode_image(jpeg, "f", (64, 128))
    assert image.mode == "RGB" and image.size == (64, 128)
    mask = decode_image(_png(mode="L"), "m", (64, 64), mode="L")
    assert mask.mode == "L"
    png = encode_png(image)
    back = Image.open(io.BytesIO(png))
    assert back.format == "PNG" and np.array_equal(np.asarray(back), np.asarray(image))


def test_image_seeds_wrap_within_int64() -> None:
    assert image_seeds(5, 3) == [5, 6, 7]
    top = 2**63 - 1
    assert image_seeds(top, 2) == [top, -(2**63)]
