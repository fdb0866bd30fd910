"""diffmesh.demo: the tiny demo models load into real diffusers pipelines and behave as promised."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffmesh.artifacts import artifact_bytes, artifact_sha256, is_pickle_path
from diffmesh.catalog import load_manifest
from diffmesh.cli import main as cli_main
from diffmesh.demo.models import LORA_ALPHA, LORA_RANK, lora_config, lora_metadata, write_demo_models
from diffmesh.safetensors_header import canonicalize_header
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

PROMPT = "the cat and the dog"


def _catalog(root: Path) -> list[dict[str, Any]]:
    return list(json.loads((root / "catalog.json").read_text())["components"])


def _path(record: dict[str, Any]) -> Path:
    assert record["uri"].startswith("file:///")
    return Path(record["uri"].removeprefix("file://"))


def _by_kind(root: Path, kind: str) -> list[dict[str, Any]]:
    return [c for c in _catalog(root) if c["kind"] == kind]


def _generate(pipe: Any, **kwargs: Any) -> np.ndarray:
    out = pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
        **kwargs,
    )
    return np.asarray(out.images[0])


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # Tiny models gain nothing from a second thread, and on a shared 2-core machine the
    # spinning OpenMP threads cost several times the work itself.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_pipe(demo_models: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(_path(_by_kind(demo_models, "BASE")[0])))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_catalog_lists_every_component_with_its_real_size_and_digest(demo_models: Path) -> None:
    records = _catalog(demo_models)
    kinds = [r["kind"] for r in records]
    assert kinds.count("BASE") >= 3 and kinds.count("LORA") == 6 and kinds.count("CONTROLNET") == 1
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        path = _path(r)
        assert path.is_absolute() and path.exists(), r["id"]
        assert r["family"] == "sd15"
        assert r["format"] == ("SAFETENSORS" if r["kind"] == "LORA" else "DIFFUSERS_FOLDER")
        assert r["bytes"] == artifact_bytes(path) > 0
        assert r["sha256"] == artifact_sha256(path)
        assert r["labels"]["display_name"]
    # Different seeds: the bases are different models.
    assert len({r["sha256"] for r in records if r["kind"] == "BASE"}) == kinds.count("BASE")
    # Only safetensors and small configs: no pickle checkpoints anywhere.
    files = [p for p in demo_models.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert not [p for p in files if is_pickle_path(str(p))]
    assert {p.suffix for p in files} <= {".safetensors", ".json"}
    # The coordinator's loader accepts the manifest as written.
    assert [c.id for c in load_manifest(demo_models / "catalog.json")] == [r["id"] for r in records]


def test_base_loads_with_from_pretrained_and_generates_64x64(base_pipe: StableDiffusionPipeline) -> None:
    assert base_pipe.safety_checker is None
    assert type(base_pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert base_pipe.tokenizer.model_max_length == 77
    ids = base_pipe.tokenizer(PROMPT).input_ids
    cfg = base_pipe.text_encoder.config
    assert ids[0] == cfg.bos_token_id and ids[-1] == cfg.eos_token_id
    assert max(ids) < cfg.vocab_size
    assert all(p.dtype == torch.float32 for p in base_pipe.unet.parameters())

    image = _generate(base_pipe)
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()
    np.testing.assert_array_equal(image, _generate(base_pipe))  # same seed, same image


def test_lora_keeps_alpha_and_its_scale_changes_the_image(demo_models: Path, base_pipe: StableDiffusionPipeline) -> None:
    lora = _path(_by_kind(demo_models, "LORA")[0])
    with safe_open(str(lora), "pt") as f:
        assert all(f.get_tensor(k).abs().sum() > 0 for k in f.keys() if ".lora.up." in k)  # non-zero init
    base_image = _generate(base_pipe)
    base_pipe.load_lora_weights(str(lora), adapter_name="demo")
    try:
        layer = base_pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
        assert layer.scaling["demo"] == pytest.approx(LORA_ALPHA / LORA_RANK) == 2.0
        base_pipe.set_adapters(["demo"], [1.0])
        with_lora = _generate(base_pipe)
        base_pipe.set_adapters(["demo"], [0.0])
        scale_zero = _generate(base_pipe)
    finally:
        base_pipe.unload_lora_weights()
    assert np.abs(with_lora - scale_zero).max() > 1e-3
    np.testing.assert_allclose(scale_zero, base_image, atol=1e-5)


def test_controlnet_condition_image_changes_the_output(demo_models: Path, base_pipe: StableDiffusionPipeline) -> None:
    controlnet = ControlNetModel.from_pretrained(str(_path(_by_kind(demo_models, "CONTROLNET")[0])))
    assert all(b.weight.abs().sum() > 0 for b in controlnet.controlnet_down_blocks)
    assert controlnet.controlnet_mid_block.weight.abs().sum() > 0
    pipe = StableDiffusionControlNetPipeline(**base_pipe.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    stripes = np.zeros((64, 64, 3), dtype=np.uint8)
    stripes[:, ::8] = 255
    outputs = [_generate(pipe, image=Image.fromarray(c)) for c in (np.zeros_like(stripes), stripes)]
    assert outputs[0].shape == (64, 64, 3)
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-3


def test_up_to_date_set_is_kept_and_rewrites_are_byte_identical(demo_models: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    write_demo_models(demo_models, progress=lines.append)
    assert lines == [f"demo models in {demo_models.resolve()} are up to date"]

    # A copy elsewhere is rewritten (its uris would be wrong), deterministically: same digests.
    copy = tmp_path / "copy"
    shutil.copytree(demo_models, copy)
    write_demo_models(copy)
    original = {r["id"]: r["sha256"] for r in _catalog(demo_models)}
    assert {r["id"]: r["sha256"] for r in _catalog(copy)} == original
    assert all(r["uri"].startswith(copy.resolve().as_uri()) for r in _catalog(copy))

    # A tampered artifact makes the set stale; regeneration restores the exact bytes.
    lora = _path(_by_kind(copy, "LORA")[0])
    lora.write_bytes(lora.read_bytes()[:-4] + b"\0\0\0\0")
    lines.clear()
    write_demo_models(copy, progress=lines.append)
    assert "up to date" not in " ".join(lines)
    assert artifact_sha256(lora) == original[_by_kind(copy, "LORA")[0]["id"]]


def test_lora_metadata_is_reproducible_and_keeps_alpha() -> None:
    metadata = lora_metadata(lora_config())
    assert metadata["lora_alpha"] == LORA_ALPHA and metadata["r"] == LORA_RANK
    assert metadata["init_lora_weights"] is False
    assert metadata["target_modules"] == sorted(metadata["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]


def test_canonical_header_does_not_depend_on_metadata_order(tmp_path: Path) -> None:
    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(3)}
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    save_file(tensors, str(one), metadata={"format": "pt", "zeta": "1", "alpha": "2"})
    save_file(tensors, str(two), metadata={"alpha": "2", "zeta": "1", "format": "pt"})
    for path in (one, two):
        canonicalize_header(path)
    assert one.read_bytes() == two.read_bytes()
    (size,) = struct.unpack("<Q", one.read_bytes()[:8])
    assert size % 8 == 0
    loaded = load_file(str(one))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(str(one), "pt") as f:
        assert f.metadata() == {"format": "pt", "zeta": "1", "alpha": "2"}


def test_cli_reports_an_up_to_date_set(demo_models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["demo-models", str(demo_models)]) == 0
    assert "up to date" in capsys.readouterr().out
