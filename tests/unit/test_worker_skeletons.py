"""The worker's pool of spare meta-device skeletons: real diffusers and transformers modules."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffmesh.v1 import common_pb2
from diffmesh_worker.assemble import DevicePlacement, build_base, build_controlnet
from diffmesh_worker.shm_mapping import SegmentMapper, is_shared_view
from diffmesh_worker.skeletons import SkeletonPool, config_key
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextModel

from tests.support.shm_packing import Packed

WAIT_S = 60.0


def unet_config(channels: int = 32) -> dict[str, Any]:
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [channels, channels * 2],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    }


CLIP_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 77,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 1,
}


@pytest.fixture
def pool() -> Iterator[SkeletonPool]:
    p = SkeletonPool(max_keys=8)
    yield p
    p.close()


def params_on_meta(module: torch.nn.Module) -> bool:
    return all(p.is_meta for p in module.parameters())


def test_take_returns_a_meta_module_of_the_class_and_config(pool: SkeletonPool) -> None:
    unet = pool.take(UNet2DConditionModel, unet_config(32))
    assert isinstance(unet, UNet2DConditionModel)
    assert params_on_meta(unet)
    assert list(unet.config.block_out_channels) == [32, 64]
    assert pool.built_inline == 1


def test_a_spare_is_built_ahead_and_never_handed_out_twice(pool: SkeletonPool) -> None:
    config = unet_config(32)
    first = pool.take(UNet2DConditionModel, config)
    assert pool.wait_ready(UNet2DConditionModel, config, WAIT_S)
    second = pool.take(UNet2DConditionModel, config)
    assert second is not first
    assert pool.built_ahead >= 1 and pool.built_inline == 1  # the second came ready, not built in the take
    assert isinstance(second, UNet2DConditionModel) and params_on_meta(second)
    assert pool.wait_ready(UNet2DConditionModel, config, WAIT_S)
    third = pool.take(UNet2DConditionModel, config)
    assert third is not first and third is not second
    # A spare is a fresh module: loading weights into one leaves the others untouched.
    state = {n: torch.zeros(p.shape) for n, p in UNet2DConditionModel.from_config(config).state_dict().items()}
    second.load_state_dict(state, assign=True, strict=True)
    assert not any(p.is_meta for p in second.parameters())
    assert params_on_meta(third)


def test_spares_get_real_buffers_and_load_like_a_fresh_module(pool: SkeletonPool) -> None:
    first = pool.take(CLIPTextModel, CLIP_CONFIG)
    assert pool.wait_ready(CLIPTextModel, CLIP_CONFIG, WAIT_S)
    spare = pool.take(CLIPTextModel, CLIP_CONFIG)
    positions = []
    for module in (first, spare):
        assert params_on_meta(module)
        buffers = {n.rsplit(".", 1)[-1]: b for n, b in module.named_buffers()}
        assert not any(b.is_meta for b in buffers.values())
        assert torch.equal(buffers["position_ids"].flatten(), torch.arange(77))
        positions.append(buffers["position_ids"])
    assert positions[0] is not positions[1]  # each spare owns its buffers
    # Assigning real weights makes a working text encoder.
    torch.manual_seed(0)
    real = CLIPTextModel(spare.config)
    spare.load_state_dict(real.state_dict(), assign=True, strict=True)
    spare.eval()
    real.eval()
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        assert torch.equal(spare(ids).last_hidden_state, real(ids).last_hidden_state)


def test_different_configs_do_not_mix(pool: SkeletonPool) -> None:
    small, wide = unet_config(32), unet_config(48)
    pool.take(UNet2DConditionModel, small)
    pool.take(UNet2DConditionModel, wide)
    assert pool.wait_ready(UNet2DConditionModel, small, WAIT_S)
    assert pool.wait_ready(UNet2DConditionModel, wide, WAIT_S)
    assert list(pool.take(UNet2DConditionModel, wide).config.block_out_channels) == [48, 96]
    assert list(pool.take(UNet2DConditionModel, small).config.block_out_channels) == [32, 64]
    # Same config, keys in another order: the same architecture.
    assert config_key(UNet2DConditionModel, dict(reversed(small.items()))) == config_key(UNet2DConditionModel, small)
    assert config_key(CLIPTextModel, small) != config_key(UNet2DConditionModel, small)


def test_keys_are_bounded_least_recently_used_dropped() -> None:
    pool = SkeletonPool(max_keys=2)
    try:
        configs = [unet_config(c) for c in (8, 16, 24)]
        pool.take(UNet2DConditionModel, configs[0])
        pool.take(UNet2DConditionModel, configs[1])
        pool.take(UNet2DConditionModel, configs[0])  # configs[0] is now the most recently used
        pool.take(UNet2DConditionModel, configs[2])
        assert pool.keys() == [config_key(UNet2DConditionModel, c) for c in (configs[0], configs[2])]
        assert not pool.ready(UNet2DConditionModel, configs[1])
        assert pool.wait_ready(UNet2DConditionModel, configs[2], WAIT_S)
    finally:
        pool.close()


def test_refills_wait_until_the_device_is_idle() -> None:
    idle = threading.Event()
    pool = SkeletonPool(max_keys=4, is_idle=idle.is_set, idle_poll_s=0.01)
    try:
        config = unet_config(8)
        pool.take(UNet2DConditionModel, config)
        assert not pool.wait_ready(UNet2DConditionModel, config, 0.3)
        assert pool.built_ahead == 0
        idle.set()
        assert pool.wait_ready(UNet2DConditionModel, config, WAIT_S)
        assert pool.built_ahead == 1
    finally:
        pool.close()


def test_background_builds_leave_other_threads_tensors_real(pool: SkeletonPool) -> None:
    """The refill thread's meta mode is thread-local: modules made meanwhile elsewhere are real."""
    configs = [unet_config(c) for c in (8, 16, 24, 32)]
    for config in configs:
        pool.take(UNet2DConditionModel, config)
    made = [torch.nn.Linear(4, 4) for _ in range(200)]
    assert all(p.device.type == "cpu" for m in made for p in m.parameters())
    for config in configs:
        assert pool.wait_ready(UNet2DConditionModel, config, WAIT_S)


def test_a_closed_pool_still_builds_but_keeps_no_spares() -> None:
    pool = SkeletonPool(max_keys=4)
    pool.close()
    unet = pool.take(UNet2DConditionModel, unet_config(8))
    assert params_on_meta(unet)
    assert pool.keys() == []


def test_demo_models_build_from_spares_zero_copy(demo_models: Path) -> None:
    """The worker's path: a second build of the same base and ControlNet takes spares built ahead."""
    cpu = DevicePlacement.for_device("cpu")
    packed, mapper, pool = Packed(), SegmentMapper(), SkeletonPool(max_keys=8)
    try:
        base_handle = packed.pack(demo_models / "base" / "sd15-tiny-a", "sd15-tiny-a", common_pb2.COMPONENT_KIND_BASE)
        cn_handle = packed.pack(
            demo_models / "controlnet" / "controlnet-edges", "controlnet-edges", common_pb2.COMPONENT_KIND_CONTROLNET
        )
        first = build_base(mapper, base_handle, cpu, pool)
        first_cn = build_controlnet(mapper, cn_handle, cpu, pool)
        assert pool.built_inline == 4  # UNet, VAE, text encoder, ControlNet: none was there yet
        for cls, module in (
            (UNet2DConditionModel, first.unet),
            (AutoencoderKL, first.vae),
            (ControlNetModel, first_cn.model),
        ):
            assert pool.wait_ready(cls, dict(module.config), WAIT_S)
        text_config = first.text_encoder.config.to_dict()
        second = build_base(mapper, base_handle, cpu, pool)
        second_cn = build_controlnet(mapper, cn_handle, cpu, pool)
        assert pool.built_ahead >= 3
        base_buf, cn_buf = mapper.map(base_handle.files[0].segment), mapper.map(cn_handle.files[0].segment)
        pairs = (
            (first.unet, second.unet, base_buf),
            (first.vae, second.vae, base_buf),
            (first_cn.model, second_cn.model, cn_buf),
        )
        for old, new, buf in pairs:
            assert new is not old
            assert all(is_shared_view(p, buf) for p in new.parameters())
            assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values(), strict=True))
        assert second.text_encoder is not first.text_encoder
        assert text_config["max_position_embeddings"] == second.text_encoder.config.max_position_embeddings
        ids = torch.tensor([[1, 5, 7, 2]])
        with torch.no_grad():
            assert torch.equal(first.text_encoder(ids).last_hidden_state, second.text_encoder(ids).last_hidden_state)
    finally:
        pool.close()
        mapper.forget_all()
        packed.close()
