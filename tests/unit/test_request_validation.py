"""diffmesh.request_validation: the rules the router and the worker share, and image decoding."""

from __future__ import annotations

import io
import subprocess
import sys
import zlib

import pytest
from diffmesh.errors import InvalidArgument
from diffmesh.request_validation import (
    MAX_INPUT_BYTES,
    check_image,
    decode_image,
    has_images,
    open_image,
    validate_generation,
)
from diffmesh.v1 import common_pb2
from PIL import Image


def _image(size: tuple[int, int] = (32, 48), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color=128 if mode == "L" else (10, 200, 30)).save(out, format=fmt)
    return out.getvalue()


def _pipeline() -> common_pb2.PipelineSpec:
    return common_pb2.PipelineSpec(
        base_id="base-a",
        loras=[common_pb2.LoraRef(id="l1", scale=0.5), common_pb2.LoraRef(id="l2", scale=-4.0)],
        controlnets=[common_pb2.ControlNetRef(id="cn", image=_image((80, 72)), scale=0)],
    )


def _params(**fields: object) -> common_pb2.GenerationParams:
    values: dict[str, object] = dict(prompt="p", steps=4, width=64, height=64, seed=1)
    values.update(fields)
    return common_pb2.GenerationParams(**values)  # type: ignore[arg-type]


def _field(pipeline: common_pb2.PipelineSpec, params: common_pb2.GenerationParams) -> str:
    with pytest.raises(InvalidArgument) as err:
        validate_generation(pipeline, params)
    assert err.value.field in str(err.value)
    return err.value.field


def test_a_valid_request_returns_its_images_undecorated() -> None:
    params = _params(task=common_pb2.TASK_INPAINT, init_image=_image(fmt="JPEG"), mask_image=_image(mode="L"), strength=1.0)
    images = validate_generation(_pipeline(), params)
    assert [im.size for im in images.controlnets] == [(80, 72)]
    assert images.init_image is not None and images.init_image.size == (32, 48)
    assert images.mask_image is not None and images.mask_image.mode == "L"

    txt = validate_generation(common_pb2.PipelineSpec(base_id="b"), _params(num_images=0, steps=150, width=2048))
    assert txt.controlnets == [] and txt.init_image is None and txt.mask_image is None


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(steps=0), "params.steps"),
        (dict(steps=151), "params.steps"),
        (dict(width=100), "params.width"),
        (dict(height=2056), "params.height"),
        (dict(num_images=9), "params.num_images"),
        (dict(num_images=-1), "params.num_images"),
        (dict(guidance_scale=float("nan")), "params.guidance_scale"),
        (dict(guidance_scale=50.5), "params.guidance_scale"),
        (dict(strength=-0.1), "params.strength"),
        (dict(negative_prompt="x" * 8193), "params.negative_prompt"),
        (dict(task=4), "params.task"),
        (dict(task=common_pb2.TASK_IMG2IMG, init_image=b"junk"), "params.init_image"),
        (dict(task=common_pb2.TASK_INPAINT, init_image=_image()), "params.mask_image"),
    ],
)
def test_each_param_rule_names_its_field(fields: dict[str, object], field: str) -> None:
    assert _field(_pipeline(), _params(**fields)) == field


def test_an_id_is_listed_at_most_once_across_base_loras_and_controlnets() -> None:
    pipeline = _pipeline()
    pipeline.loras[0].id = "base-a"
    assert _field(pipeline, _params()) == "pipeline.loras[0].id"
    pipeline = _pipeline()
    pipeline.controlnets[0].id = "l2"
    assert _field(pipeline, _params()) == "pipeline.controlnets[0].id"
    pipeline = _pipeline()
    pipeline.controlnets.add(id="cn", image=_image())
    assert _field(pipeline, _params()) == "pipeline.controlnets[1].id"


def test_cheap_rules_are_checked_before_images_are_decoded() -> None:
    pipeline = _pipeline()
    pipeline.controlnets[0].image = b"not an image"
    assert _field(pipeline, _params(steps=0)) == "params.steps"
    assert _field(pipeline, _params()) == "pipeline.controlnets[0].image"


def test_has_images() -> None:
    assert has_images(_pipeline(), _params())
    assert not has_images(common_pb2.PipelineSpec(base_id="b"), _params())
    assert has_images(common_pb2.PipelineSpec(base_id="b"), _params(task=common_pb2.TASK_IMG2IMG))


def test_check_image_accepts_png_and_jpeg_and_reports_size() -> None:
    assert check_image(_image((80, 72)), "f") == (80, 72)
    assert check_image(_image(fmt="JPEG"), "f") == (32, 48)
    with pytest.raises(InvalidArgument, match="unknown signature"):
        check_image(b"hello", "f")


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "is empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * (MAX_INPUT_BYTES), "bytes; at most"),
        (_image(fmt="GIF"), "unknown signature"),
        (_image(fmt="WEBP"), "unknown signature"),
        (_image()[:60], "not a decodable PNG"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a decodable PNG"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 64, "not a decodable JPEG"),
        (_png_claiming(8200, 8), "pixels per side"),
        (_png_claiming(5000, 5000), "pixels in all"),
        (_png_claiming(0, 0), "not a decodable PNG"),
    ],
    ids=["empty", "too-many-bytes", "gif", "webp", "truncated", "png-signature-only", "corrupt-jpeg", "too-wide", "bomb", "0x0"],
)
def test_bad_images_are_refused_naming_the_field(data: bytes, problem: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        open_image(data, "pipeline.controlnets[3].image")
    assert err.value.field == "pipeline.controlnets[3].image"
    assert problem in str(err.value)


def test_decode_image_converts_and_resizes() -> None:
    image = decode_image(_image((100, 80), fmt="JPEG"), "f", (64, 128))
    assert image.mode == "RGB" and image.size == (64, 128)
    mask = decode_image(_image(mode="L"), "m", (64, 64), mode="L")
    assert mask.mode == "L" and mask.size == (64, 64)


def test_the_module_imports_without_torch_or_pillow() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['PIL'] = None\n"
        "from diffmesh.request_validation import validate_generation\n"
        "from diffmesh.v1 import common_pb2\n"
        "p = common_pb2.GenerationParams(steps=4, width=64, height=64)\n"
        "validate_generation(common_pb2.PipelineSpec(base_id='b'), p)\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
