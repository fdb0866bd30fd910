"""Building pipelines from shared-memory handles: real demo models, real diffusers, real peft."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffmesh.errors import DataLoss, FailedPrecondition
from diffmesh.v1 import common_pb2, instance_manager_pb2
from diffmesh_worker import adapters
from diffmesh_worker.assemble import BuiltBase, DevicePlacement, build_base, build_controlnet, make_pipeline
from diffmesh_worker.device_cache import AcquireLease, CacheEntry, DeviceCache, LoraWeights
from diffmesh_worker.shm_mapping import SegmentMapper, is_shared_view
from PIL import Image

from tests.support.shm_packing import Packed

BASE, LORA, LORA_2, CONTROLNET = "sd15-tiny-a", "lora-neon", "lora-sketch", "controlnet-edges"
CPU = DevicePlacement.for_device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: the machine's few cores are shared, and tiny models gain nothing from more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def packed() -> Iterator[Packed]:
    p = Packed()
    yield p
    p.close()


@pytest.fixture(scope="module")
def handles(packed: Packed, demo_models: Path) -> dict[str, instance_manager_pb2.HostHandle]:
    return {
        BASE: packed.pack(demo_models / "base" / BASE, BASE, common_pb2.COMPONENT_KIND_BASE),
        LORA: packed.pack(demo_models / "lora" / f"{LORA}.safetensors", LORA, common_pb2.COMPONENT_KIND_LORA),
        LORA_2: packed.pack(demo_models / "lora" / f"{LORA_2}.safetensors", LORA_2, common_pb2.COMPONENT_KIND_LORA),
        CONTROLNET: packed.pack(demo_models / "controlnet" / CONTROLNET, CONTROLNET, common_pb2.COMPONENT_KIND_CONTROLNET),
    }


@pytest.fixture(scope="module")
def mapper() -> SegmentMapper:
    return SegmentMapper()


@pytest.fixture(scope="module")
def base(mapper: SegmentMapper, handles: dict[str, instance_manager_pb2.HostHandle]) -> BuiltBase:
    return build_base(mapper, handles[BASE], CPU)


def _generate(pipe: object, seed: int = 3, **kwargs: object) -> np.ndarray:
    out = pipe(  # type: ignore[operator]
        "a lighthouse at dusk",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(seed)],
        output_type="np",
        **kwargs,
    )
    return np.asarray(out.images)


def test_base_is_built_zero_copy_and_matches_from_pretrained(
    base: BuiltBase, mapper: SegmentMapper, handles: dict[str, instance_manager_pb2.HostHandle], demo_models: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    buf = mapper.map(handles[BASE].files[0].segment)
    for module in (base.unet, base.vae, base.text_encoder):
        params = list(module.parameters())
        assert params and all(is_shared_view(p, buf) for p in params)
        assert not any(p.is_meta for p in module.parameters())
    assert base.tokenizer.model_max_length == 77
    assert 0 < base.bytes <= handles[BASE].bytes

    reference = StableDiffusionPipeline.from_pretrained(str(demo_models / "base" / BASE), safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    assert np.array_equal(_generate(make_pipeline(base, [], common_pb2.TASK_TXT2IMG)), _generate(reference))


def test_lora_keeps_alpha_matches_diffusers_and_never_touches_the_base(
    base: BuiltBase, mapper: SegmentMapper, handles: dict[str, instance_manager_pb2.HostHandle], demo_models: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    plain = _generate(make_pipeline(base, [], common_pb2.TASK_TXT2IMG))
    handle = handles[LORA]
    name = adapters.load_adapter(base, LORA, adapters.lora_state_dict(mapper, handle), adapters.lora_metadata(handle), CPU)
    assert adapters.load_adapter(base, LORA, {}, None, CPU) == name  # cached per pipeline
    config = base.unet.peft_config[name]
    assert (config.r, config.lora_alpha) == (4, 8)

    adapters.activate(base, [(LORA, 0.0)])
    zero = _generate(make_pipeline(base, [], common_pb2.TASK_TXT2IMG))
    adapters.activate(base, [(LORA, 1.0)])
    one = _generate(make_pipeline(base, [], common_pb2.TASK_TXT2IMG))
    adapters.activate(base, [])
    off = _generate(make_pipeline(base, [], common_pb2.TASK_TXT2IMG))
    assert np.array_equal(zero, plain) and np.array_equal(off, plain)
    assert np.abs(one - zero).max() > 1e-3

    # The same LoRA loaded by diffusers from its file (alpha read from the header) agrees.
    reference = StableDiffusionPipeline.from_pretrained(str(demo_models / "base" / BASE), safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(demo_models / "lora"), weight_name=f"{LORA}.safetensors", adapter_name="ref")
    reference.set_adapters(["ref"], [1.0])
    assert np.abs(_generate(reference) - one).max() < 1e-5

    # Base weights (now wrapped by peft as base_layer) were never written.
    after = {k.replace(".base_layer", ""): v for k, v in base.unet.state_dict().items() if "lora_" not in k}
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    adapters.unload_adapter(base, LORA)
    assert LORA not in base.adapters and name not in getattr(base.unet, "peft_config", {})


def test_two_loras_with_scales(
    base: BuiltBase, mapper: SegmentMapper, handles: dict[str, instance_manager_pb2.HostHandle]
) -> None:
    for cid in (LORA, LORA_2):
        h = handles[cid]
        adapters.load_adapter(base, cid, adapters.lora_state_dict(mapper, h), adapters.lora_metadata(h), CPU)
    adapters.activate(base, [(LORA, 1.0)])
    one = _generate(make_pipeline(base, [], common_pb2.TASK_TXT2IMG))
    adapters.activate(base, [(LORA, 1.0), (LORA_2, -1.5)])
    both = _generate(make_pipeline(base, [], common_pb2.TASK_TXT2IMG))
    adapters.activate(base, [(LORA, 1.0), (LORA_2, 0.0)])
    second_off = _generate(make_pipeline(base, [], common_pb2.TASK_TXT2IMG))
    assert np.abs(both - one).max() > 1e-3
    assert np.abs(second_off - one).max() < 1e-6

    # Evicting a LoRA from the device cache unloads its adapter from the bases holding it.
    cache = DeviceCache(capacity_bytes=0, max_entries=8)
    cache.add(CacheEntry(BASE, common_pb2.COMPONENT_KIND_BASE, "sd15", base.bytes, base, AcquireLease("l1")))
    cache.add(CacheEntry(LORA_2, common_pb2.COMPONENT_KIND_LORA, "sd15", 1, LoraWeights({}, None), AcquireLease("l2")))
    removed = cache.remove([LORA_2])
    assert LORA_2 not in base.adapters and removed.leases == ["l2"]
    adapters.unload_adapter(base, LORA)
    adapters.activate(base, [])


def test_controlnet_and_tasks(
    base: BuiltBase, mapper: SegmentMapper, handles: dict[str, instance_manager_pb2.HostHandle]
) -> None:
    controlnet = build_controlnet(mapper, handles[CONTROLNET], CPU)
    buf = mapper.map(handles[CONTROLNET].files[0].segment)
    assert all(is_shared_view(p, buf) for p in controlnet.model.parameters())
    rng = np.random.default_rng(0)
    a = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
    b = Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))
    pipe = make_pipeline(base, [controlnet], common_pb2.TASK_TXT2IMG)
    assert type(pipe).__name__ == "StableDiffusionControlNetPipeline"
    assert pipe.unet is base.unet and pipe.vae is base.vae and pipe.controlnet is controlnet.model
    assert np.abs(_generate(pipe, image=a) - _generate(pipe, image=b)).max() > 0

    i2i = make_pipeline(base, [], common_pb2.TASK_IMG2IMG)
    out = i2i("x", image=a, strength=0.5, num_inference_steps=4, generator=[torch.Generator().manual_seed(1)], output_type="np")
    assert np.asarray(out.images).shape == (1, 64, 64, 3)
    inpaint = make_pipeline(base, [controlnet], common_pb2.TASK_INPAINT)
    assert type(inpaint).__name__ == "StableDiffusionControlNetInpaintPipeline"


def test_bad_handles_are_refused(mapper: SegmentMapper, handles: dict[str, instance_manager_pb2.HostHandle]) -> None:
    with pytest.raises(FailedPrecondition, match="not a BASE"):
        build_base(mapper, handles[LORA], CPU)
    with pytest.raises(FailedPrecondition, match="not a CONTROLNET"):
        build_controlnet(mapper, handles[BASE], CPU)
    with pytest.raises(FailedPrecondition, match="not a LORA"):
        adapters.lora_state_dict(mapper, handles[BASE])

    no_config = instance_manager_pb2.HostHandle()
    no_config.CopyFrom(handles[BASE])
    del no_config.configs[:]
    no_config.configs.extend(c for c in handles[BASE].configs if c.relpath != "unet/config.json")
    with pytest.raises(DataLoss, match=r"unet/config\.json"):
        build_base(mapper, no_config, CPU)

    # A UNet config that does not match the weights is refused before anything runs.
    bad = instance_manager_pb2.HostHandle()
    bad.CopyFrom(handles[BASE])
    for config in bad.configs:
        if config.relpath == "unet/config.json":
            raw = config.content.decode().replace('"cross_attention_dim": 32', '"cross_attention_dim": 48')
            config.content = raw.encode()
    with pytest.raises(DataLoss, match="do not match"):
        build_base(mapper, bad, CPU)

    missing_weights = instance_manager_pb2.HostHandle()
    missing_weights.CopyFrom(handles[BASE])
    del missing_weights.files[:]
    missing_weights.files.extend(f for f in handles[BASE].files if not f.relpath.startswith("vae/"))
    with pytest.raises(DataLoss, match="vae"):
        build_base(mapper, missing_weights, CPU)
