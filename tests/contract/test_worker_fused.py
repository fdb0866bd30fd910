"""The worker runs a FUSED overlay (made by the instance manager's ``Fuse``) instead of runtime
adapters: real coordinator (real Redis, demo catalog), real instance manager (real SSD dir and
POSIX shared memory) and real worker in-process; real diffusers pipelines on the demo models.

Tolerances, from measurements (CPU, fp32 everywhere, 64x64, 3 steps, 1 torch thread): the
overlay merges ``W + Σ scale·(alpha/r)·B@A`` once in fp32, runtime adapters add the same
product on every forward, diffusers' ``fuse_lora`` merges in its own order. Measured: overlay
UNet vs ``fuse_lora`` UNet max |ΔW| = 6e-8 (asserted within fp16 tolerance, rtol = atol =
1e-3); images vs runtime adapters and vs ``fuse_lora`` mean |Δ| = 0.0002 and max |Δ| = 1
(levels of 255: one rounding step). Asserted: mean ≤ 0.25 and max ≤ 2 levels. The LoRAs
themselves move the image by max 118 / mean 18 levels, so the bounds tell the pipelines apart.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from diffmesh.safetensors_header import torch_dtype
from diffmesh.v1 import common_pb2, coordinator_pb2, instance_manager_pb2, instance_manager_pb2_grpc, worker_pb2
from diffmesh_worker.assemble import BuiltBase
from diffmesh_worker.overlay_reader import base_unet_state
from PIL import Image
from safetensors import safe_open

from tests.support.waiting import wait_for
from tests.support.worker import BASE, WORKER_ID, WorkerMesh, make_request, pixels, run

LORAS = (("lora-ink", 0.8), ("lora-pastel", -0.5))
EXTRA = ("lora-neon", 0.6)
PROMPT = "a red fox in the snow"
STEPS, SEED = 3, 17
MEAN_TOL, MAX_TOL = 0.25, 2.0  # in 0..255 pixel levels (see the module docstring)


@pytest.fixture(scope="module")
def im_stub(worker_mesh: WorkerMesh) -> Iterator[instance_manager_pb2_grpc.InstanceManagerServiceStub]:
    channel = grpc.insecure_channel(worker_mesh.im.address)
    yield instance_manager_pb2_grpc.InstanceManagerServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def fused_id(im_stub: instance_manager_pb2_grpc.InstanceManagerServiceStub) -> str:
    resp = im_stub.Fuse(
        instance_manager_pb2.FuseRequest(base_id=BASE, loras=[common_pb2.LoraRef(id=i, scale=s) for i, s in LORAS]),
        timeout=120,
    )
    assert resp.component.kind == common_pb2.COMPONENT_KIND_FUSED and resp.component.base_id == BASE
    return resp.component.id


def _diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(d.mean()), float(d.max())


def _reference(demo_models: Path, loras: tuple[tuple[str, float], ...]) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """Image and UNet weights of a pipeline built by diffusers from the demo files, LoRAs merged by ``fuse_lora``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(demo_models / "base" / BASE), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    names = []
    for i, (lid, _) in enumerate(loras):
        name = f"ref{i}"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")  # a second adapter, on purpose
            pipe.load_lora_weights(str(demo_models / "lora"), weight_name=f"{lid}.safetensors", adapter_name=name)
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    out = pipe(
        prompt=PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        height=64,
        width=64,
        num_images_per_prompt=1,
        generator=[torch.Generator("cpu").manual_seed(SEED)],
        output_type="pil",
    )
    unet_state = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    return np.asarray(out.images[0].convert("RGB"), dtype=np.int16), unet_state


def _host_copy_equals_disk(im_stub: instance_manager_pb2_grpc.InstanceManagerServiceStub, demo_models: Path) -> int:
    """Compares every tensor of the base's HOST copy (read from its /dev/shm segment) with its file; returns the count."""
    acq = im_stub.Acquire(instance_manager_pb2.AcquireRequest(component_ids=[BASE], holder="fused-test"), timeout=60)
    try:
        (handle,) = acq.handles
        checked = 0
        for shm_file in handle.files:
            blob = Path("/dev/shm", shm_file.segment).read_bytes()
            with safe_open(str(demo_models / "base" / BASE / shm_file.relpath), "pt") as f:
                for t in shm_file.tensors:
                    got = torch.frombuffer(bytearray(blob[t.offset : t.offset + t.length]), dtype=torch_dtype(t.dtype))
                    assert torch.equal(got.view(list(t.shape)), f.get_tensor(t.name)), f"{shm_file.relpath}:{t.name}"
                    checked += 1
        return checked
    finally:
        im_stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=acq.lease_id), timeout=10)


def _gpu_holders(worker_mesh: WorkerMesh, cid: str) -> list[str]:
    loc = worker_mesh.coord.Locate(coordinator_pb2.LocateRequest(component_ids=[cid]), timeout=10).locations[0]
    return [r.worker_id for r in loc.residencies if r.tier == common_pb2.TIER_GPU]


def test_fused_overlay_matches_runtime_adapters_and_fuse_lora(
    worker_mesh: WorkerMesh,
    fused_id: str,
    im_stub: instance_manager_pb2_grpc.InstanceManagerServiceStub,
    demo_models: Path,
) -> None:
    events, fused = run(worker_mesh, make_request(seed=SEED, steps=STEPS, base=fused_id, prompt=PROMPT))
    loading = [(e.loading.component_id, e.loading.source_tier) for e in events if e.WhichOneof("event") == "loading"]
    assert [cid for cid, _ in loading] == [BASE, fused_id]  # progress in build order: the base first
    assert [(load.component_id, load.kind) for load in fused.loads] == [
        (fused_id, common_pb2.COMPONENT_KIND_FUSED),
        (BASE, common_pb2.COMPONENT_KIND_BASE),
    ]
    assert fused.loads[0].source_tier == common_pb2.TIER_HOST  # Fuse left it HOST-resident
    _, runtime = run(worker_mesh, make_request(seed=SEED, steps=STEPS, loras=LORAS, prompt=PROMPT))
    _, plain = run(worker_mesh, make_request(seed=SEED, steps=STEPS, prompt=PROMPT))
    f, r, p = pixels(fused)[0], pixels(runtime)[0], pixels(plain)[0]
    ref, ref_unet = _reference(demo_models, LORAS)

    mean_rt, max_rt = _diff(f, r)
    mean_ref, max_ref = _diff(f, ref)
    mean_base, max_base = _diff(f, p)
    print(f"fused vs runtime {mean_rt:.4f}/{max_rt:.0f}, vs fuse_lora {mean_ref:.4f}/{max_ref:.0f}")
    print(f"fused vs base {mean_base:.3f}/{max_base:.0f}")
    assert mean_rt <= MEAN_TOL and max_rt <= MAX_TOL
    assert mean_ref <= MEAN_TOL and max_ref <= MAX_TOL
    assert max_base > MAX_TOL  # the LoRAs do change the image: the bounds discriminate

    # The overlay's UNet shares the base's tensors; the shared HOST copy was never written.
    fused_entry, base_entry = worker_mesh.app.cache.get(fused_id), worker_mesh.app.cache.get(BASE)
    assert fused_entry is not None and isinstance(fused_entry.built, BuiltBase) and fused_entry.built.base_id == BASE
    assert base_entry is not None and isinstance(base_entry.built, BuiltBase)
    base_ptrs = {p.data_ptr() for p in base_entry.built.unet.parameters()}
    fused_ptrs = [p.data_ptr() for p in fused_entry.built.unet.parameters()]
    own = [ptr for ptr in fused_ptrs if ptr not in base_ptrs]
    assert 0 < len(own) < len(fused_ptrs)
    assert 0 < fused_entry.bytes < base_entry.bytes
    # Weight by weight, the overlay's UNet is diffusers' fuse_lora UNet within fp16 tolerance.
    mine = dict(fused_entry.built.unet.named_parameters())
    assert set(mine) == set(ref_unet)
    worst = max(float((mine[n] - ref_unet[n]).abs().max()) for n in mine)
    base_state = base_unet_state(base_entry.built.unet)  # the base carries runtime adapters by now
    changed = sum(not torch.equal(mine[n], base_state[n]) for n in mine)
    print(f"max |W_overlay - W_fuse_lora| = {worst:.3g}, tensors changed by the LoRAs: {changed}")
    assert changed == len(own)
    for name, weight in mine.items():
        torch.testing.assert_close(weight, ref_unet[name], rtol=1e-3, atol=1e-3, msg=name)
    assert fused_entry.built.vae is base_entry.built.vae and fused_entry.built.text_encoder is base_entry.built.text_encoder
    assert _host_copy_equals_disk(im_stub, demo_models) > 0


def test_second_run_of_the_overlay_comes_from_the_device_tier(worker_mesh: WorkerMesh, fused_id: str) -> None:
    _, first = run(worker_mesh, make_request(seed=SEED, steps=STEPS, base=fused_id, prompt=PROMPT))
    events, second = run(worker_mesh, make_request(seed=SEED, steps=STEPS, base=fused_id, prompt=PROMPT))
    loading = [(e.loading.component_id, e.loading.source_tier) for e in events if e.WhichOneof("event") == "loading"]
    assert loading == [(BASE, common_pb2.TIER_GPU), (fused_id, common_pb2.TIER_GPU)]
    assert [load.source_tier for load in second.loads] == [common_pb2.TIER_GPU, common_pb2.TIER_GPU]
    assert [img.png for img in first.images] == [img.png for img in second.images]

    resident = {r.component_id: r.bytes for r in worker_mesh.stub.Status(worker_pb2.StatusRequest(), timeout=10).resident}
    assert resident.get(fused_id, 0) > 0 and BASE in resident
    # Residency reports travel off the request path: wait for the report to land.
    wait_for(lambda: WORKER_ID in _gpu_holders(worker_mesh, fused_id), "the overlay's GPU residency report", timeout=10)
    assert WORKER_ID in _gpu_holders(worker_mesh, fused_id)


def test_runtime_lora_on_top_of_the_overlay(worker_mesh: WorkerMesh, fused_id: str) -> None:
    _, alone = run(worker_mesh, make_request(seed=SEED, steps=STEPS, base=fused_id, prompt=PROMPT))
    _, on_top = run(worker_mesh, make_request(seed=SEED, steps=STEPS, base=fused_id, loras=(EXTRA,), prompt=PROMPT))
    _, runtime = run(worker_mesh, make_request(seed=SEED, steps=STEPS, loras=(*LORAS, EXTRA), prompt=PROMPT))
    _, again = run(worker_mesh, make_request(seed=SEED, steps=STEPS, base=fused_id, prompt=PROMPT))
    assert [load.component_id for load in on_top.loads] == [fused_id, BASE, EXTRA[0]]
    a, t, r, g = (pixels(x)[0] for x in (alone, on_top, runtime, again))
    assert _diff(a, t)[1] > MAX_TOL  # the extra LoRA acts on the overlay
    mean, peak = _diff(t, r)
    assert mean <= MEAN_TOL and peak <= MAX_TOL  # overlay + 1 adapter ≈ base + 3 adapters
    assert np.array_equal(a, g)  # without it, the overlay alone again: adapters were only disabled


def test_overlay_leaves_the_device_with_its_base_and_comes_back(worker_mesh: WorkerMesh, fused_id: str) -> None:
    run(worker_mesh, make_request(seed=SEED, steps=STEPS, base=fused_id, prompt=PROMPT))
    loader = worker_mesh.app._loader
    assert loader is not None
    removed = worker_mesh.app.cache.remove([BASE])  # the base goes: the overlay sharing its tensors goes with it
    assert {cid for cid, _ in removed.components} == {BASE, fused_id}
    worker_mesh.worker.call(loader.release_removed(removed))
    resident = {r.component_id for r in worker_mesh.stub.Status(worker_pb2.StatusRequest(), timeout=10).resident}
    assert BASE not in resident and fused_id not in resident

    _, result = run(worker_mesh, make_request(seed=SEED, steps=STEPS, base=fused_id, prompt=PROMPT))
    assert [(load.component_id, load.source_tier) for load in result.loads] == [
        (fused_id, common_pb2.TIER_HOST),
        (BASE, common_pb2.TIER_HOST),
    ]
    assert Image.open(io.BytesIO(result.images[0].png)).size == (64, 64)


def test_fused_base_with_a_lora_of_another_family_is_refused(worker_mesh: WorkerMesh, fused_id: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(worker_mesh.stub.Run(make_request(base=fused_id, loras=(("xl-lora", 1.0),)), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pipeline.loras[0].id" in (err.value.details() or "")
    _, result = run(worker_mesh, make_request(seed=2, base=fused_id))  # still serving
    assert len(result.images) == 1


def test_leases_are_held_only_for_device_resident_components(
    worker_mesh: WorkerMesh,
    im_stub: instance_manager_pb2_grpc.InstanceManagerServiceStub,
) -> None:
    # Overlay and base come from one or two Acquires: every lease left is one the device tier relies on.
    resident = {r.component_id for r in worker_mesh.stub.Status(worker_pb2.StatusRequest(), timeout=10).resident}
    stats = im_stub.Stats(instance_manager_pb2.StatsRequest(), timeout=10)
    leased = {c.component_id for c in stats.components if c.leases > 0}
    assert BASE in resident and leased == resident
