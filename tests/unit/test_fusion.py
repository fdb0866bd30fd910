"""lora_merge.fuse: hand-computed merges, bad LoRAs, and equality with diffusers' fuse_lora."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffmesh.errors import InvalidArgument, Unimplemented
from diffmesh_instance_manager.lora_merge import LoraInput, apply_overlay, fuse
from diffmesh_instance_manager.overlay_file import META_BASE, META_LORAS, overlay_metadata, save_overlay
from safetensors import safe_open
from safetensors.torch import load_file


def _meta(**cfg: object) -> dict[str, str]:
    return {"format": "pt", "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in cfg.items()})}


EYE = torch.eye(2)
A = torch.tensor([[1.0, 2.0]])  # r = 1, in = 2
B = torch.tensor([[1.0], [0.0]])  # out = 2


def test_single_lora_matches_the_hand_computed_merge() -> None:
    base = {"blk.proj.weight": EYE.clone(), "blk.other.weight": torch.ones(3)}
    lora = {"unet.blk.proj.lora.down.weight": A, "unet.blk.proj.lora.up.weight": B}
    overlay = fuse(base, [(lora, _meta(lora_alpha=2, r=1), 0.5)])
    # W + 0.5 · (2 / 1) · B @ A = I + [[1, 2], [0, 0]]
    assert overlay.keys() == {"blk.proj.weight"}
    assert torch.equal(overlay["blk.proj.weight"], torch.tensor([[2.0, 2.0], [0.0, 1.0]]))
    assert torch.equal(base["blk.proj.weight"], EYE)  # the base is never written


def test_peft_key_names_several_loras_and_alpha_sources_add_up() -> None:
    base = {"m.weight": EYE.clone()}
    peft_names = {"unet.m.lora_A.weight": A, "unet.m.lora_B.weight": B}
    alpha_tensor = {**peft_names, "unet.m.alpha": torch.tensor(4.0)}
    overlay = fuse(
        base,
        [
            LoraInput(peft_names, {}, 1.0, "no-metadata"),  # alpha = r → factor 1
            LoraInput(alpha_tensor, _meta(lora_alpha=1, r=1), 0.25, "alpha-tensor"),  # the tensor wins: factor 4
            LoraInput(peft_names, _meta(lora_alpha=1, r=1, alpha_pattern={"m": 3}), -1.0, "pattern"),  # factor 3
        ],
    )
    # I + (1 + 0.25·4 - 3) · [[1, 2], [0, 0]] = I - [[1, 2], [0, 0]]
    assert torch.equal(overlay["m.weight"], torch.tensor([[0.0, -2.0], [0.0, 1.0]]))


def test_rslora_scales_by_the_square_root_of_the_rank() -> None:
    a = torch.ones(4, 2)
    b = torch.ones(2, 4) / 4  # B @ A = all ones
    lora = {"unet.m.lora_A.weight": a, "unet.m.lora_B.weight": b}
    overlay = fuse({"m.weight": torch.zeros(2, 2)}, [(lora, _meta(lora_alpha=8, r=4, use_rslora=True), 1.0)])
    assert torch.allclose(overlay["m.weight"], torch.full((2, 2), 8 / 2))


def test_conv_lora_and_fp16_base_stay_in_the_base_dtype() -> None:
    w = torch.zeros(3, 2, 3, 3, dtype=torch.float16)
    down = torch.arange(2 * 2 * 3 * 3, dtype=torch.float32).reshape(2, 2, 3, 3) / 10
    up = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).reshape(3, 2, 1, 1)
    lora = {"unet.conv.lora_A.weight": down, "unet.conv.lora_B.weight": up}
    overlay = fuse({"conv.weight": w}, [(lora, _meta(lora_alpha=2, r=2), 1.0)])
    out = overlay["conv.weight"]
    assert out.dtype == torch.float16
    expected = torch.stack([down[0], down[1], down[0] + down[1]])
    assert torch.allclose(out.float(), expected, atol=1e-2)


def test_bad_loras_are_refused() -> None:
    base = {"m.weight": EYE.clone()}
    ok = {"unet.m.lora_A.weight": A, "unet.m.lora_B.weight": B}
    with pytest.raises(Unimplemented, match="text_encoder"):
        fuse(base, [({**ok, "text_encoder.x.lora_A.weight": A}, {}, 1.0)])
    with pytest.raises(Unimplemented, match="DoRA"):
        fuse(base, [({**ok, "unet.m.lora_magnitude_vector": torch.ones(2)}, {}, 1.0)])
    with pytest.raises(Unimplemented, match="DoRA"):
        fuse(base, [(ok, _meta(use_dora=True), 1.0)])
    with pytest.raises(InvalidArgument, match="without both A and B"):
        fuse(base, [({"unet.m.lora_A.weight": A}, {}, 1.0)])
    with pytest.raises(InvalidArgument, match=r"no weight 'n\.weight'"):
        fuse(base, [({"unet.n.lora_A.weight": A, "unet.n.lora_B.weight": B}, {}, 1.0)])
    with pytest.raises(InvalidArgument, match="do not compose"):
        fuse(base, [({"unet.m.lora_A.weight": A, "unet.m.lora_B.weight": torch.ones(2, 3)}, {}, 1.0)])
    with pytest.raises(InvalidArgument, match="base weight"):
        fuse(base, [({"unet.m.lora_A.weight": torch.ones(1, 3), "unet.m.lora_B.weight": B}, {}, 1.0)])
    with pytest.raises(InvalidArgument, match="not finite"):
        fuse(base, [(ok, {}, float("nan"))])
    with pytest.raises(InvalidArgument, match="not JSON"):
        fuse(base, [(ok, {"lora_adapter_metadata": "{"}, 1.0)])
    with pytest.raises(InvalidArgument, match="not in the base"):
        apply_overlay(base, {"zz.weight": EYE})
    assert torch.equal(fuse(base, [(ok, {}, 0.0)])["m.weight"], EYE)  # still works


def test_overlay_file_names_its_base_and_lora_set(tmp_path: Path) -> None:
    overlay = fuse({"m.weight": EYE.clone()}, [({"unet.m.lora_A.weight": A, "unet.m.lora_B.weight": B}, {}, 1.0)])
    path = tmp_path / "fused.safetensors"
    save_overlay(path, overlay, overlay_metadata("sd15-a", [("lora-ink", 0.7), ("lora-neon", -0.4)]))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta[META_BASE] == "sd15-a"
    assert json.loads(meta[META_LORAS]) == [{"id": "lora-ink", "scale": 0.7}, {"id": "lora-neon", "scale": -0.4}]
    assert torch.equal(load_file(str(path))["m.weight"], overlay["m.weight"])


def _lora_input(path: Path, scale: float) -> LoraInput:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return LoraInput(load_file(str(path)), meta, scale, path.stem)


@pytest.mark.slow
def test_overlay_matches_diffusers_fuse_lora(demo_models: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    base_dir = demo_models / "base" / "sd15-tiny-a"
    loras = [(demo_models / "lora" / "lora-ink.safetensors", 0.7), (demo_models / "lora" / "lora-neon.safetensors", -0.4)]

    # Reference: diffusers' own fusion.
    ref = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None)
    for path, _ in loras:
        ref.load_lora_weights(str(path), adapter_name=path.stem)
    ref.set_adapters([p.stem for p, _ in loras], adapter_weights=[s for _, s in loras])
    ref.fuse_lora()

    # Ours: base weights (as the HOST tier would map them) + the overlay, never touching the base.
    base_sd = load_file(str(base_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    before = {k: v.clone() for k, v in base_sd.items()}
    overlay = fuse(base_sd, [_lora_input(p, s) for p, s in loras])
    assert all(torch.equal(base_sd[k], before[k]) for k in base_sd)
    touched = {k[len("unet.") : k.rindex(".lora")] + ".weight" for p, _ in loras for k in load_file(str(p))}
    assert overlay.keys() == touched
    assert len(overlay) < len(base_sd)

    ours = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(ours.unet.config)
    unet.load_state_dict(apply_overlay(base_sd, overlay), assign=True, strict=True)
    ours.unet = unet.eval()

    ref_sd = ref.unet.state_dict()
    for name, w in overlay.items():
        fused = ref_sd.get(name.replace(".weight", ".base_layer.weight"), ref_sd.get(name))
        assert fused is not None, name
        assert torch.allclose(w, fused, atol=1e-6), name

    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    text = torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        out_ref = ref.unet(sample, 10, encoder_hidden_states=text).sample
        out_ours = ours.unet(sample, 10, encoder_hidden_states=text).sample
        out_base = UNet2DConditionModel.from_pretrained(base_dir / "unet")(sample, 10, encoder_hidden_states=text).sample
    assert torch.allclose(out_ours, out_ref, atol=1e-3)
    assert (out_ours - out_base).abs().max() > 1e-3  # the LoRAs do change the UNet

    kwargs = {"prompt": "a red fox", "num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}
    img_ref = ref(generator=torch.Generator().manual_seed(1), **kwargs).images
    img_ours = ours(generator=torch.Generator().manual_seed(1), **kwargs).images
    assert abs(img_ref - img_ours).max() < 1e-3  # fp16 tolerance

    # The overlay as a file round-trips with its metadata.
    path = tmp_path / "fused.safetensors"
    save_overlay(path, overlay, overlay_metadata("sd15-tiny-a", [(p.stem, s) for p, s in loras]))
    reloaded = load_file(str(path))
    assert all(torch.equal(reloaded[k], overlay[k]) for k in overlay)


def test_save_overlay_writes_the_same_bytes_for_the_same_tensors(tmp_path: Path) -> None:
    from diffmesh_instance_manager.overlay_file import save_overlay
    from safetensors import safe_open
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "up.w": torch.randn(3, 4, generator=g).half(),
        "down.w": torch.randn(5, generator=g).to(torch.bfloat16),
        "mid.b": torch.randn(2, 2, generator=g),
    }
    save_overlay(tmp_path / "a.safetensors", tensors, {"z": "1", "a": "2", "m": "3"})
    save_overlay(tmp_path / "b.safetensors", dict(reversed(list(tensors.items()))), {"m": "3", "a": "2", "z": "1"})
    raw = (tmp_path / "a.safetensors").read_bytes()
    assert raw == (tmp_path / "b.safetensors").read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0  # header padded for aligned tensor data
    back = load_file(str(tmp_path / "a.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata() == {"a": "2", "m": "3", "z": "1"}
