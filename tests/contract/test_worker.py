"""Contract tests of the worker: the real coordinator (on a real Redis, with the demo catalog),
the real instance manager (real SSD dir, real POSIX shared memory) and the real worker, each
a gRPC server in-process on a free port; real diffusers pipelines denoise tiny demo models."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from diffmesh.errors import retry_after_ms
from diffmesh.pipeline_key import canonical_key
from diffmesh.v1 import (
    common_pb2,
    coordinator_pb2,
    instance_manager_pb2,
    instance_manager_pb2_grpc,
    worker_pb2,
)
from diffmesh_worker.adapters import adapter_name
from diffmesh_worker.assemble import BuiltBase
from diffmesh_worker.shm_mapping import is_shared_view
from PIL import Image
from safetensors.torch import load_file

from tests.support.waiting import wait_for
from tests.support.worker import BASE, BASE_B, CONTROLNET, LORA, LORA_2, NODE_ID, WORKER_ID, WorkerMesh, make_request, pixels, run


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _error(worker_mesh: WorkerMesh, request: worker_pb2.RunRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        list(worker_mesh.stub.Run(request, timeout=120))
    return err.value


def _edges(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return _png((rng.random((64, 64, 3)) > 0.5) * 255)


def test_run_streams_progress_and_returns_pngs(worker_mesh: WorkerMesh) -> None:
    events, result = run(worker_mesh, make_request(num_images=3, steps=3, loras=((LORA, 0.8),)))
    kinds = [e.WhichOneof("event") for e in events]
    # queued, then loading per component, then one step event per step, then the result
    assert kinds[0] == "queued" and events[0].queued.worker_id == WORKER_ID
    loading = [e.loading for e in events if e.WhichOneof("event") == "loading"]
    assert [ev.component_id for ev in loading] == [BASE, LORA]
    first_load = kinds.index("loading")
    first_step = kinds.index("step")
    assert set(kinds[:first_load]) == {"queued"} and set(kinds[first_load:first_step]) == {"loading"}
    steps = [e.step for e in events if e.WhichOneof("event") == "step"]
    assert [(s.step, s.total) for s in steps] == [(1, 3), (2, 3), (3, 3)]
    assert kinds.index("result") == len(kinds) - 1

    assert len(result.images) == 3
    for i, image in enumerate(result.images):
        decoded = Image.open(io.BytesIO(image.png))
        assert decoded.format == "PNG" and decoded.size == (64, 64)
        assert (image.width, image.height, image.seed) == (64, 64, 7 + i)
    assert result.worker_id == WORKER_ID and result.node_id == NODE_ID
    assert result.pipeline_key == canonical_key(BASE, [(LORA, 0.8)])
    assert [load.component_id for load in result.loads] == [BASE, LORA]
    assert {load.kind for load in result.loads} == {common_pb2.COMPONENT_KIND_BASE, common_pb2.COMPONENT_KIND_LORA}
    t = result.timing
    assert t.total_seconds >= t.load_seconds + t.denoise_seconds > 0 and t.queue_seconds >= 0


def test_second_run_uses_device_tier_and_status_reports_it(worker_mesh: WorkerMesh) -> None:
    run(worker_mesh, make_request(seed=1))
    events, result = run(worker_mesh, make_request(seed=2))
    loading = [e.loading for e in events if e.WhichOneof("event") == "loading"]
    assert [(ev.component_id, ev.source_tier) for ev in loading] == [(BASE, common_pb2.TIER_GPU)]
    assert result.loads[0].source_tier == common_pb2.TIER_GPU

    status = worker_mesh.stub.Status(worker_pb2.StatusRequest(), timeout=10)
    assert (status.worker_id, status.node_id, status.device) == (WORKER_ID, NODE_ID, "cpu")
    assert status.device_memory_total_bytes >= status.device_memory_free_bytes > 0
    assert (status.queue_length, status.running) == (0, 0)
    resident = {r.component_id: r for r in status.resident}
    assert BASE in resident and resident[BASE].bytes > 0 and resident[BASE].last_used_unix > 0


def test_worker_registers_and_reports_gpu_residency(worker_mesh: WorkerMesh) -> None:
    run(worker_mesh, make_request(seed=3))
    nodes = worker_mesh.coord.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=10).nodes
    workers = [w for n in nodes for w in n.workers]
    mine = [w for w in workers if w.worker_id == WORKER_ID]
    assert mine and mine[0].address == worker_mesh.worker.address and mine[0].device == "cpu" and mine[0].node_id == NODE_ID

    def gpu_holders() -> list[str]:
        loc = worker_mesh.coord.Locate(coordinator_pb2.LocateRequest(component_ids=[BASE]), timeout=10).locations[0]
        return [r.worker_id for r in loc.residencies if r.tier == common_pb2.TIER_GPU]

    # Reports travel off the request path: wait for the report to land.
    wait_for(lambda: WORKER_ID in gpu_holders(), "the worker's GPU residency report", timeout=10)
    assert WORKER_ID in gpu_holders()


def test_same_seed_gives_identical_images(worker_mesh: WorkerMesh) -> None:
    _, first = run(worker_mesh, make_request(seed=42, num_images=2))
    _, second = run(worker_mesh, make_request(seed=42, num_images=2))
    _, other = run(worker_mesh, make_request(seed=43, num_images=1))
    a, b, c = pixels(first), pixels(second), pixels(other)
    assert [img.png for img in first.images] == [img.png for img in second.images]
    assert not np.array_equal(a[0], a[1])  # seeds 42 and 43 within one request differ
    # Image i is seeded seed+i, so it matches a lone request with that seed (batched math
    # may differ in the last bit, hence a rounding-sized tolerance).
    assert np.abs(a[1] - c[0]).max() <= 2
    assert np.array_equal(a[0], b[0])


def test_lora_scale_changes_output_and_is_not_fused(worker_mesh: WorkerMesh) -> None:
    _, plain = run(worker_mesh, make_request(seed=5))
    _, zero = run(worker_mesh, make_request(seed=5, loras=((LORA, 0.0),)))
    _, one = run(worker_mesh, make_request(seed=5, loras=((LORA, 1.0),)))
    _, two = run(worker_mesh, make_request(seed=5, loras=((LORA, 1.0), (LORA_2, 1.0))))
    _, again = run(worker_mesh, make_request(seed=5))
    p, z, o, t, g = (pixels(r)[0] for r in (plain, zero, one, two, again))
    assert np.array_equal(p, z)  # scale 0 is the base model
    assert np.abs(o - z).max() > 0  # scale 1 changes the image
    assert np.abs(t - o).max() > 0  # a second LoRA adds its own change
    assert np.array_equal(p, g)  # without LoRAs the base is untouched: nothing was fused

    # The adapter kept the alpha stored in the file's header (alpha 8 / rank 4, not alpha = rank).
    entry = worker_mesh.app.cache.get(BASE)
    assert entry is not None and isinstance(entry.built, BuiltBase)
    config = entry.built.unet.peft_config[adapter_name(LORA)]
    assert (config.r, config.lora_alpha) == (4, 8)


def test_weights_are_zero_copy_views_of_the_host_copy(worker_mesh: WorkerMesh, demo_models: Path) -> None:
    run(worker_mesh, make_request(seed=6, loras=((LORA, 1.0),)))
    entry = worker_mesh.app.cache.get(BASE)
    assert entry is not None and isinstance(entry.built, BuiltBase)
    unet = entry.built.unet
    maps = list(worker_mesh.app.mapper.mappings().values())
    base_params = [(n, p) for n, p in unet.named_parameters() if "lora_" not in n]
    assert base_params and all(any(is_shared_view(p, m) for m in maps) for _, p in base_params)
    # Nothing was written into the shared copy: it still equals the artifact on disk.
    on_disk = load_file(str(demo_models / "base" / BASE / "unet" / "diffusion_pytorch_model.safetensors"))
    state = {n.replace(".base_layer", ""): p for n, p in base_params}
    assert set(on_disk) == set(state)
    assert all(torch.equal(on_disk[k], state[k]) for k in on_disk)


def test_controlnet_image_changes_output(worker_mesh: WorkerMesh) -> None:
    _, first = run(worker_mesh, make_request(seed=9, controlnets=((CONTROLNET, _edges(1)),)))
    _, second = run(worker_mesh, make_request(seed=9, controlnets=((CONTROLNET, _edges(2)),)))
    _, repeat = run(worker_mesh, make_request(seed=9, controlnets=((CONTROLNET, _edges(1)),)))
    assert first.pipeline_key == canonical_key(BASE, [], [CONTROLNET])
    assert [load.component_id for load in first.loads] == [BASE, CONTROLNET]
    a, b, r = pixels(first)[0], pixels(second)[0], pixels(repeat)[0]
    assert np.abs(a - b).max() > 0
    assert np.array_equal(a, r)


def test_img2img_and_inpaint(worker_mesh: WorkerMesh) -> None:
    init = _edges(3)
    mask = _png(np.pad(np.full((32, 32, 3), 255), ((16, 16), (16, 16), (0, 0))))
    _, i2i = run(worker_mesh, make_request(seed=4, steps=4, task=common_pb2.TASK_IMG2IMG, init_image=init, strength=0.5))
    _, i2i_other = run(
        worker_mesh, make_request(seed=4, steps=4, task=common_pb2.TASK_IMG2IMG, init_image=_edges(4), strength=0.5)
    )
    _, inpaint = run(
        worker_mesh, make_request(seed=4, steps=4, task=common_pb2.TASK_INPAINT, init_image=init, mask_image=mask, strength=1.0)
    )
    for result in (i2i, inpaint):
        assert len(result.images) == 1 and Image.open(io.BytesIO(result.images[0].png)).size == (64, 64)
    assert np.abs(pixels(i2i)[0] - pixels(i2i_other)[0]).max() > 0  # the init image matters


def test_second_base_and_status(worker_mesh: WorkerMesh) -> None:
    _, result = run(worker_mesh, make_request(base=BASE_B, seed=1))
    assert result.pipeline_key == canonical_key(BASE_B)
    resident = {r.component_id for r in worker_mesh.stub.Status(worker_pb2.StatusRequest(), timeout=10).resident}
    assert {BASE, BASE_B} <= resident


BAD_REQUESTS = [
    ("params.steps", dict(steps=0)),
    ("params.steps", dict(steps=151)),
    ("params.width", dict(width=100)),
    ("params.height", dict(height=32)),
    ("params.height", dict(height=2056)),
    ("params.num_images", dict(num_images=9)),
    ("params.num_images", dict(num_images=-1)),
    ("params.guidance_scale", dict(guidance_scale=float("nan"))),
    ("params.init_image", dict(task=common_pb2.TASK_IMG2IMG)),
]


@pytest.mark.parametrize(("field", "params"), BAD_REQUESTS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_REQUESTS)])
def test_invalid_params_are_refused_naming_the_field(worker_mesh: WorkerMesh, field: str, params: dict[str, Any]) -> None:
    err = _error(worker_mesh, make_request(**params))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details()


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 4.5, -4.01])
def test_bad_lora_scale(worker_mesh: WorkerMesh, scale: float) -> None:
    err = _error(worker_mesh, make_request(loras=((LORA, scale),)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pipeline.loras[0].scale" in err.details()


def test_bad_controlnet_image_and_family_and_kind(worker_mesh: WorkerMesh) -> None:
    err = _error(worker_mesh, make_request(controlnets=((CONTROLNET, b"definitely not a png"),)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "pipeline.controlnets[0].image" in err.details()
    truncated = _edges(1)[:60]
    err = _error(worker_mesh, make_request(controlnets=((CONTROLNET, truncated),)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "pipeline.controlnets[0].image" in err.details()

    err = _error(worker_mesh, make_request(loras=((LORA, 1.0), ("xl-lora", 1.0))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "pipeline.loras[1].id" in err.details()
    assert "sdxl" in err.details()
    err = _error(worker_mesh, make_request(controlnets=(("xl-controlnet", _edges(1)),)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "pipeline.controlnets[0].id" in err.details()

    err = _error(worker_mesh, make_request(loras=((BASE_B, 1.0),)))  # a BASE where a LoRA belongs
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "pipeline.loras[0].id" in err.details()
    err = _error(worker_mesh, make_request(base=LORA))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "pipeline.base_id" in err.details()
    err = _error(worker_mesh, make_request(base="bad id!"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "pipeline.base_id" in err.details()
    _, result = run(worker_mesh, make_request(seed=2, loras=((LORA, 1.0),)))  # still serving
    assert len(result.images) == 1


def test_unknown_component_is_not_found_naming_it(worker_mesh: WorkerMesh) -> None:
    err = _error(worker_mesh, make_request(base="no-such-base"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "no-such-base" in err.details()
    err = _error(worker_mesh, make_request(loras=(("no-such-lora", 1.0),)))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "no-such-lora" in err.details()
    _, result = run(worker_mesh, make_request(seed=2))  # still serving
    assert len(result.images) == 1


def test_leases_are_held_only_for_device_resident_components(worker_mesh: WorkerMesh) -> None:
    # After every request and error above, the IM leases this worker holds are exactly
    # those of its device tier: nothing leaked by refused or cancelled requests.
    resident = {r.component_id for r in worker_mesh.stub.Status(worker_pb2.StatusRequest(), timeout=10).resident}
    with grpc.insecure_channel(worker_mesh.im.address) as channel:
        stats = instance_manager_pb2_grpc.InstanceManagerServiceStub(channel).Stats(
            instance_manager_pb2.StatsRequest(), timeout=10
        )
    leased = {c.component_id for c in stats.components if c.leases > 0}
    assert resident and leased == resident


def test_full_queue_is_resource_exhausted_and_cancel_frees_the_device(worker_mesh: WorkerMesh) -> None:
    # A long request holds the device; max_queue=1 lets one more wait; a third is refused.
    long_call = worker_mesh.stub.Run(make_request(seed=11, steps=150), timeout=300)
    first = next(long_call)
    assert first.WhichOneof("event") == "queued"
    for event in long_call:  # wait until it denoises
        if event.WhichOneof("event") == "step":
            break
    waiting = worker_mesh.stub.Run(make_request(seed=12), timeout=300)
    queued = next(waiting)
    assert queued.WhichOneof("event") == "queued" and queued.queued.position == 1
    err = _error(worker_mesh, make_request(seed=13))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (retry_after_ms(err) or 0) > 0
    status = worker_mesh.stub.Status(worker_pb2.StatusRequest(), timeout=10)
    assert (status.running, status.queue_length) == (1, 1)

    # Cancelling the running request stops its denoising; the waiting one then runs.
    long_call.cancel()
    rest = list(waiting)
    assert rest[-1].WhichOneof("event") == "result"
    steps = [e.step for e in rest if e.WhichOneof("event") == "step"]
    assert steps[-1].step == steps[-1].total == 2


def test_deadline_stops_the_request_and_service_keeps_serving(worker_mesh: WorkerMesh) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(worker_mesh.stub.Run(make_request(seed=21, steps=150), timeout=3))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _, result = run(worker_mesh, make_request(seed=22))  # the device was freed
    assert len(result.images) == 1
    status = worker_mesh.stub.Status(worker_pb2.StatusRequest(), timeout=10)
    assert (status.running, status.queue_length) == (0, 0)


def test_status_answers_while_denoising(worker_mesh: WorkerMesh) -> None:
    call = worker_mesh.stub.Run(make_request(seed=31, steps=50), timeout=300)
    seen = threading.Event()
    for event in call:
        if event.WhichOneof("event") == "step":
            status = worker_mesh.stub.Status(worker_pb2.StatusRequest(), timeout=10)
            assert status.running == 1
            seen.set()
            call.cancel()
            break
    assert seen.is_set()


def test_spans_break_down_queue_load_and_denoise(worker_mesh: WorkerMesh) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    run(worker_mesh, make_request(seed=8, base=BASE_B, loras=((LORA_2, 0.5),)))
    spans = {s.name: s for s in exporter.get_finished_spans() if s.name.startswith("worker.")}
    assert {"worker.queue", "worker.load", "worker.load.component", "worker.denoise"} <= set(spans)
    components = [s for s in exporter.get_finished_spans() if s.name == "worker.load.component"]
    attrs = {s.attributes["component_id"]: dict(s.attributes or {}) for s in components}  # type: ignore[index]
    assert set(attrs) == {BASE_B, LORA_2}
    for values in attrs.values():
        assert values["source_tier"] in ("TIER_GPU", "TIER_HOST", "TIER_SSD", "TIER_REMOTE")
        assert isinstance(values["bytes"], int)
    load = spans["worker.load"]
    assert all(s.parent is not None and s.parent.span_id == load.context.span_id for s in components)
    trace_ids = {s.context.trace_id for s in (*spans.values(), *components)}
    assert len(trace_ids) == 1  # one request, one trace
