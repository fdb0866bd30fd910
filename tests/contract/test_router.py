"""Contract tests of the router: the real RouterService in-process against a real coordinator
on a real Redis, and — for generation — a real instance manager and worker on the demo models.

Every RPC and every error status, and that the router keeps serving after each bad call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from diffmesh.server import ServerThread
from diffmesh.tiers import Tier
from diffmesh.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from diffmesh_coordinator.app import CoordinatorApp
from diffmesh_coordinator.keys import KeyLayout
from diffmesh_coordinator.settings import CoordinatorSettings
from diffmesh_router.app import RouterApp
from diffmesh_router.settings import RouterSettings
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.waiting import wait_for

BASE = "sd15-tiny-a"
LORAS = ("lora-ink", "lora-pastel")
CONTROLNET = "controlnet-edges"
FOREIGN_LORA = "rt-sdxl-lora"  # registered by the tests: family sdxl, so it does not fit an sd15 base


def _png(size: tuple[int, int] = (64, 64)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (255, 255, 255)).save(buf, format="PNG")
    return buf.getvalue()


class RouterMesh:
    """A coordinator and a router (and optionally IM + worker) on one Redis namespace."""

    def __init__(self, redis_url: str, catalog: Path, lease_seconds: float = 15.0) -> None:
        self.namespace = f"rt-{uuid.uuid4().hex[:8]}:"
        self.redis_url = redis_url
        self.coordinator = ServerThread(
            CoordinatorApp(
                CoordinatorSettings(
                    redis_url=redis_url, namespace=self.namespace, catalog=str(catalog), lease_seconds=lease_seconds
                )
            )
        )
        settings = RouterSettings(
            coordinator=self.coordinator.address,
            nodes_refresh_seconds=0.2,
            catalog_cache_seconds=0.5,
            record_flush_seconds=0.1,
        )
        self.router_app = RouterApp(settings)
        self.router = ServerThread(self.router_app)
        self.extra: list[ServerThread] = []
        self.router_channel = grpc.insecure_channel(self.router.address)
        self.coordinator_channel = grpc.insecure_channel(self.coordinator.address)
        self.stub = router_pb2_grpc.RouterServiceStub(self.router_channel)
        self.coord = coordinator_pb2_grpc.CacheCoordinatorServiceStub(self.coordinator_channel)

    def close(self) -> None:
        self.router_channel.close()
        self.coordinator_channel.close()
        for server in [self.router, *reversed(self.extra), self.coordinator]:
            server.stop()

    def request_stream(self) -> list[dict[str, str]]:
        """Request records the coordinator stored (read straight from Redis)."""
        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        try:
            return [fields for _, fields in _xrange(client, KeyLayout(self.namespace).requests)]
        finally:
            client.close()


def _xrange(client: redis.Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    return client.xrange(key)  # type: ignore[return-value]  # decode_responses=True gives str


def _register_foreign_lora(mesh: RouterMesh, catalog: Path) -> None:
    records = json.loads(catalog.read_text())["components"]
    ink = next(r for r in records if r["id"] == LORAS[0])
    mesh.coord.RegisterComponent(
        coordinator_pb2.RegisterComponentRequest(
            component=common_pb2.Component(
                id=FOREIGN_LORA,
                kind=common_pb2.COMPONENT_KIND_LORA,
                family="sdxl",
                uri=ink["uri"],
                bytes=ink["bytes"],
                sha256=ink["sha256"],
                format=common_pb2.ARTIFACT_FORMAT_SAFETENSORS,
            )
        ),
        timeout=10,
    )


@pytest.fixture(scope="module")
def mesh(redis_url: str, demo_models: Path) -> Iterator[RouterMesh]:
    """Coordinator + router, no workers."""
    m = RouterMesh(redis_url, demo_models / "catalog.json")
    _register_foreign_lora(m, demo_models / "catalog.json")
    yield m
    m.close()


def _gen_request(**params: Any) -> router_pb2.GenerateRequest:
    pipeline = common_pb2.PipelineSpec(base_id=BASE, loras=[common_pb2.LoraRef(id=LORAS[0], scale=0.7)])
    defaults: dict[str, Any] = {"prompt": "a red square", "steps": 2, "width": 64, "height": 64, "num_images": 1, "seed": 3}
    defaults.update(params)
    return router_pb2.GenerateRequest(pipeline=pipeline, params=common_pb2.GenerationParams(**defaults), tenant="t1")


def _assert_still_serving(mesh: RouterMesh) -> None:
    resp = mesh.stub.ListModels(router_pb2.ListModelsRequest(), timeout=10)
    assert BASE in {m.id for m in resp.models}


def _field(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get("diffmesh-field")


# -- catalog proxy ----------------------------------------------------------------------


def test_list_models_filters_and_pages(mesh: RouterMesh, demo_models: Path) -> None:
    expected = {r["id"] for r in json.loads((demo_models / "catalog.json").read_text())["components"]} | {FOREIGN_LORA}
    seen: list[str] = []
    token = ""
    while True:
        resp = mesh.stub.ListModels(router_pb2.ListModelsRequest(page_size=3, page_token=token), timeout=10)
        assert len(resp.models) <= 3
        seen += [m.id for m in resp.models]
        token = resp.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(expected)

    loras = mesh.stub.ListModels(router_pb2.ListModelsRequest(kind=common_pb2.COMPONENT_KIND_LORA), timeout=10).models
    assert loras and all(m.kind == common_pb2.COMPONENT_KIND_LORA for m in loras)
    sdxl = mesh.stub.ListModels(router_pb2.ListModelsRequest(family="sdxl"), timeout=10).models
    assert [m.id for m in sdxl] == [FOREIGN_LORA]

    with pytest.raises(grpc.RpcError) as err:
        mesh.stub.ListModels(router_pb2.ListModelsRequest(page_size=5000), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _field(err.value) == "page_size"
    _assert_still_serving(mesh)


def test_get_model_returns_record_and_residencies(mesh: RouterMesh) -> None:
    resp = mesh.stub.GetModel(router_pb2.GetModelRequest(id=BASE), timeout=10)
    assert resp.model.id == BASE
    assert resp.model.kind == common_pb2.COMPONENT_KIND_BASE
    assert resp.model.family == "sd15"
    assert resp.model.bytes > 0

    # A node reports the base in its HOST tier; GetModel shows where the copy lives.
    node = f"node-{uuid.uuid4().hex[:6]}"
    mesh.coord.RegisterNode(
        coordinator_pb2.RegisterNodeRequest(node=coordinator_pb2.NodeInfo(node_id=node, instance_manager_address="127.0.0.1:9")),
        timeout=10,
    )
    update = coordinator_pb2.ResidencyUpdate(component_id=BASE, tier=common_pb2.TIER_HOST, present=True, bytes=123)
    mesh.coord.ReportResidency(coordinator_pb2.ReportResidencyRequest(node_id=node, updates=[update]), timeout=10)
    resp = mesh.stub.GetModel(router_pb2.GetModelRequest(id=BASE), timeout=10)
    assert [(r.node_id, r.tier, r.bytes) for r in resp.residencies if r.node_id == node] == [(node, common_pb2.TIER_HOST, 123)]
    mesh.coord.ReportResidency(coordinator_pb2.ReportResidencyRequest(node_id=node, updates=[], full_snapshot=True), timeout=10)


def test_get_model_errors(mesh: RouterMesh) -> None:
    with pytest.raises(grpc.RpcError) as err:
        mesh.stub.GetModel(router_pb2.GetModelRequest(id="no-such-model"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        mesh.stub.GetModel(router_pb2.GetModelRequest(id=""), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _field(err.value) == "id"
    _assert_still_serving(mesh)


# -- generation errors (no worker needed) -------------------------------------------------


def _call_both(mesh: RouterMesh, request: router_pb2.GenerateRequest) -> list[grpc.RpcError]:
    """Sends ``request`` through Generate and GenerateStream; returns both errors."""
    errors = []
    with pytest.raises(grpc.RpcError) as err:
        mesh.stub.Generate(request, timeout=30)
    errors.append(err.value)
    stream_req = router_pb2.GenerateStreamRequest(
        request_id=request.request_id, pipeline=request.pipeline, params=request.params, tenant=request.tenant
    )
    with pytest.raises(grpc.RpcError) as err:
        list(mesh.stub.GenerateStream(stream_req, timeout=30))
    errors.append(err.value)
    return errors


@pytest.mark.parametrize(
    ("missing", "where"),
    [("no-such-base", "base"), ("no-such-lora", "lora"), ("no-such-cn", "controlnet")],
)
def test_unknown_component_is_not_found_naming_it(mesh: RouterMesh, missing: str, where: str) -> None:
    request = _gen_request()
    if where == "base":
        request.pipeline.base_id = missing
    elif where == "lora":
        request.pipeline.loras.add(id=missing, scale=1.0)
    else:
        request.pipeline.controlnets.add(id=missing, image=_png())
    for error in _call_both(mesh, request):
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert missing in (error.details() or "")
    _assert_still_serving(mesh)


def _set(path: str, value: Any) -> Callable[[router_pb2.GenerateRequest], None]:
    def mutate(request: router_pb2.GenerateRequest) -> None:
        *parents, leaf = path.split(".")
        target: Any = request
        for part in parents:
            name, _, index = part.partition("[")
            target = getattr(target, name)
            if index:
                target = target[int(index.rstrip("]"))]
        setattr(target, leaf, value)

    return mutate


def _add_lora(lora_id: str, scale: float = 1.0) -> Callable[[router_pb2.GenerateRequest], None]:
    return lambda r: r.pipeline.loras.add(id=lora_id, scale=scale) and None


def _add_controlnet(cn_id: str, image: bytes) -> Callable[[router_pb2.GenerateRequest], None]:
    return lambda r: r.pipeline.controlnets.add(id=cn_id, image=image) and None


BAD_REQUESTS: list[tuple[str, Callable[[router_pb2.GenerateRequest], None], str]] = [
    ("steps zero", _set("params.steps", 0), "params.steps"),
    ("steps 151", _set("params.steps", 151), "params.steps"),
    ("width not multiple of 8", _set("params.width", 100), "params.width"),
    ("height above 2048", _set("params.height", 4096), "params.height"),
    ("width below 64", _set("params.width", 32), "params.width"),
    ("num_images 9", _set("params.num_images", 9), "params.num_images"),
    ("num_images negative", _set("params.num_images", -2), "params.num_images"),
    ("lora scale nan", _set("pipeline.loras[0].scale", float("nan")), "pipeline.loras[0].scale"),
    ("lora scale 5", _set("pipeline.loras[0].scale", 5.0), "pipeline.loras[0].scale"),
    ("second lora scale inf", _add_lora(LORAS[1], float("inf")), "pipeline.loras[1].scale"),
    ("base id empty", _set("pipeline.base_id", ""), "pipeline.base_id"),
    ("base is a lora", _set("pipeline.base_id", LORAS[1]), "pipeline.base_id"),
    ("controlnet image undecodable", _add_controlnet(CONTROLNET, b"\x89PNG\r\n\x1a\nbroken"), "pipeline.controlnets[0].image"),
    ("controlnet image empty", _add_controlnet(CONTROLNET, b""), "pipeline.controlnets[0].image"),
    ("lora of the wrong family", _add_lora(FOREIGN_LORA), "pipeline.loras[1].id"),
    ("controlnet listed as lora", _add_lora(CONTROLNET), "pipeline.loras[1].id"),
    ("lora listed as controlnet", _add_controlnet(LORAS[1], _png()), "pipeline.controlnets[0].id"),
]


@pytest.mark.parametrize(("name", "mutate", "field"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_invalid_argument_naming_the_field(
    mesh: RouterMesh, name: str, mutate: Callable[[router_pb2.GenerateRequest], None], field: str
) -> None:
    request = _gen_request()
    mutate(request)
    for error in _call_both(mesh, request):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert _field(error) == field
        assert field in (error.details() or "")
    _assert_still_serving(mesh)


def test_no_live_worker_is_unavailable_and_the_request_is_recorded(mesh: RouterMesh) -> None:
    request = _gen_request(num_images=2)
    request.request_id = f"rt-{uuid.uuid4().hex}"
    for error in _call_both(mesh, request):
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "no live worker" in (error.details() or "")
    # Demand is recorded once validation passed, even though no worker could take it.
    records = wait_for(lambda: [r for r in mesh.request_stream() if r["request_id"] == request.request_id], "the request record")
    assert len(records) == 2  # Generate and GenerateStream
    for rec in records:
        assert rec["pipeline_key"] == f"{BASE}|{LORAS[0]}@0.70|"
        assert rec["component_ids"] == f"{BASE},{LORAS[0]}"
        assert rec["tenant"] == "t1"
        assert rec["task"] == "TASK_TXT2IMG"
        assert rec["num_images"] == "2"
    _assert_still_serving(mesh)


def test_unreachable_workers_are_unavailable_after_one_retry(redis_url: str, demo_models: Path) -> None:
    # Own namespace: these dead workers must not leak into other tests' placement.
    dead = RouterMesh(redis_url, demo_models / "catalog.json")
    try:
        node = "dead-node"
        dead.coord.RegisterNode(
            coordinator_pb2.RegisterNodeRequest(
                node=coordinator_pb2.NodeInfo(node_id=node, instance_manager_address="127.0.0.1:9")
            ),
            timeout=10,
        )
        for worker_id, port in (("dead-a", 9), ("dead-b", 11)):  # discard and systat: nothing listens there
            dead.coord.RegisterWorker(
                coordinator_pb2.RegisterWorkerRequest(
                    worker=coordinator_pb2.WorkerInfo(worker_id=worker_id, node_id=node, address=f"127.0.0.1:{port}")
                ),
                timeout=10,
            )
        for error in _call_both(dead, _gen_request()):
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "dead-a" in (error.details() or "") and "dead-b" in (error.details() or "")
        _assert_still_serving(dead)
    finally:
        dead.close()


def test_router_health(mesh: RouterMesh) -> None:
    health = health_pb2_grpc.HealthStub(mesh.router_channel)
    for name in ("", "diffmesh.v1.RouterService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING


TORCH_FREE = """
import sys
sys.modules['torch'] = None  # any `import torch` now raises ImportError
import grpc
import diffmesh_router.app
from diffmesh.server import ServerThread
from diffmesh.v1 import router_pb2, router_pb2_grpc
from diffmesh_router.app import RouterApp
from diffmesh_router.settings import RouterSettings
server = ServerThread(RouterApp(RouterSettings(coordinator=sys.argv[1])))
with grpc.insecure_channel(server.address) as ch:
    models = router_pb2_grpc.RouterServiceStub(ch).ListModels(router_pb2.ListModelsRequest(), timeout=10).models
server.stop()
assert not any(name == 'torch' or name.startswith('torch.') for name, mod in sys.modules.items() if mod is not None)
print('served', len(models))
"""


def test_router_imports_and_serves_without_torch(mesh: RouterMesh) -> None:
    out = subprocess.run(
        [sys.executable, "-c", TORCH_FREE, mesh.coordinator.address], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("served ")
    assert int(out.stdout.split()[-1]) > 0


def test_recorder_keeps_records_while_the_coordinator_is_down(redis_url: str) -> None:
    import asyncio

    from diffmesh.channels import open_channel
    from diffmesh.redis_server import free_port
    from diffmesh_router.recorder import RequestRecorder

    port = free_port()
    namespace = f"rt-rec-{uuid.uuid4().hex[:8]}:"

    def record(i: int) -> coordinator_pb2.RequestRecord:
        return coordinator_pb2.RequestRecord(
            request_id=f"r{i}", pipeline_key=f"{BASE}||", component_ids=[BASE], tenant="t", arrival_unix=1.0, num_images=1
        )

    async def scenario() -> tuple[int, int, int, int]:
        channel = open_channel(f"127.0.0.1:{port}")
        recorder = RequestRecorder(coordinator_pb2_grpc.CacheCoordinatorServiceStub(channel), 60.0, 3, 2.0)
        for i in range(5):
            recorder.add(record(i))  # bounded: the two oldest are dropped
        stored_while_down = await recorder.flush()  # nothing listens on the port yet
        kept = len(recorder)
        coordinator = await asyncio.to_thread(
            ServerThread, CoordinatorApp(CoordinatorSettings(redis_url=redis_url, namespace=namespace)), "127.0.0.1", port
        )
        try:
            stored = 0
            for _ in range(100):  # the channel reconnects with backoff
                stored = await recorder.flush()
                if stored:
                    break
                await asyncio.sleep(0.1)
        finally:
            await asyncio.to_thread(coordinator.stop)
            await channel.close()
        return stored_while_down, kept, recorder.dropped, stored

    stored_while_down, kept, dropped, stored = asyncio.run(scenario())
    assert (stored_while_down, kept, dropped, stored) == (0, 3, 2, 3)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        ids = [fields["request_id"] for _, fields in _xrange(client, KeyLayout(namespace).requests)]
    finally:
        client.close()
    assert ids == ["r2", "r3", "r4"]


# -- generation through the real instance manager and worker ----------------------------------
#
# These tests need services/worker (diffmesh_worker.app) and services/instance-manager; they
# skip, saying so, only while one of those packages is missing from the tree.

NODE = f"rt-node-{os.getpid()}"


def _worker_status(address: str) -> Any:
    from diffmesh.v1 import worker_pb2, worker_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        return worker_pb2_grpc.WorkerServiceStub(ch).Status(worker_pb2.StatusRequest(), timeout=10)


@pytest.fixture(scope="module")
def live(redis_url: str, demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterMesh]:
    """Coordinator + router + one instance manager + two CPU workers on node ``rt-node``."""
    worker_app = pytest.importorskip(
        "diffmesh_worker.app", reason="services/worker is not built yet", exc_type=ModuleNotFoundError
    )
    worker_settings = pytest.importorskip("diffmesh_worker.settings", exc_type=ModuleNotFoundError)
    im_app = pytest.importorskip("diffmesh_instance_manager.app", exc_type=ModuleNotFoundError)
    im_settings = pytest.importorskip("diffmesh_instance_manager.settings", exc_type=ModuleNotFoundError)

    m = RouterMesh(redis_url, demo_models / "catalog.json")
    try:
        im = ServerThread(
            im_app.InstanceManagerApp(
                im_settings.InstanceManagerSettings(
                    node_id=NODE,
                    coordinator=m.coordinator.address,
                    ssd_dir=str(tmp_path_factory.mktemp("rt-ssd")),
                    allowed_roots=[str(demo_models)],
                )
            )
        )
        m.extra.append(im)
        for worker_id in ("w1", "w2"):
            m.extra.append(
                ServerThread(
                    worker_app.WorkerApp(
                        worker_settings.WorkerSettings(
                            worker_id=worker_id,
                            node_id=NODE,
                            coordinator=m.coordinator.address,
                            instance_manager=im.address,
                            device="cpu",
                        )
                    )
                )
            )

        def live_workers() -> set[str]:
            nodes = m.coord.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=10).nodes
            return {w.worker_id for n in nodes if n.node_id == NODE for w in n.workers}

        wait_for(lambda: {"w1", "w2"} <= live_workers(), "both workers to register", timeout=60)
    except BaseException:
        m.close()
        raise
    yield m
    m.close()


def _worker_address(mesh: RouterMesh, worker_id: str) -> str:
    nodes = mesh.coord.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=10).nodes
    return next(w.address for n in nodes for w in n.workers if w.worker_id == worker_id)


def _decode(png: bytes) -> tuple[int, int]:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        img.load()
        return img.size


def test_generate_returns_images_from_a_live_worker(live: RouterMesh) -> None:
    request = _gen_request(num_images=2, width=64, height=72)
    resp = live.stub.Generate(request, timeout=300)
    result = resp.result
    assert len(result.request_id) == 32 and int(result.request_id, 16) >= 0  # assigned uuid4 hex
    assert len(result.images) == 2
    assert [_decode(img.png) for img in result.images] == [(64, 72), (64, 72)]
    assert result.worker_id in {"w1", "w2"}
    assert result.node_id == NODE
    assert result.pipeline_key == f"{BASE}|{LORAS[0]}@0.70|"
    assert {load.component_id for load in result.loads} == {BASE, LORAS[0]}
    assert result.timing.total_seconds > 0

    # The same pipeline again goes to the worker that now holds it on its device.
    again = live.stub.Generate(_gen_request(seed=4), timeout=300).result
    assert again.worker_id == result.worker_id
    gpu = [load for load in again.loads if load.source_tier == common_pb2.TIER_GPU]
    assert {load.component_id for load in gpu} == {BASE, LORAS[0]}

    # GetModel shows the copies the worker and the instance manager reported.
    model = wait_for(
        lambda: [
            r
            for r in live.stub.GetModel(router_pb2.GetModelRequest(id=BASE), timeout=10).residencies
            if r.tier == common_pb2.TIER_GPU and r.worker_id == result.worker_id
        ],
        "the GPU residency of the base",
    )
    assert model[0].node_id == NODE


def test_generate_stream_event_order(live: RouterMesh) -> None:
    steps = 3
    base = "sd15-tiny-b"  # not yet loaded anywhere: the stream shows loading events
    request = router_pb2.GenerateStreamRequest(
        request_id=f"rt-stream-{uuid.uuid4().hex[:8]}",
        pipeline=common_pb2.PipelineSpec(base_id=base, loras=[common_pb2.LoraRef(id=LORAS[1], scale=1.0)]),
        params=common_pb2.GenerationParams(prompt="stream", steps=steps, width=64, height=64, seed=1),
        tenant="t2",
    )
    events = list(live.stub.GenerateStream(request, timeout=300))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "result" and kinds.count("result") == 1
    first_step = kinds.index("step")
    assert set(kinds[:first_step]) <= {"queued", "loading"}
    assert "loading" in kinds[:first_step]
    assert set(kinds[first_step:-1]) == {"step"}
    assert [(e.step.step, e.step.total) for e in events if e.HasField("step")] == [(k, steps) for k in range(1, steps + 1)]
    loading = [e.loading for e in events if e.HasField("loading")]
    assert {ev.component_id for ev in loading} <= {base, LORAS[1]}
    assert all(ev.source_tier != common_pb2.TIER_UNSPECIFIED for ev in loading)
    result = events[-1].result
    assert result.request_id == request.request_id
    assert len(result.images) == 1 and _decode(result.images[0].png) == (64, 64)


def test_controlnet_request_runs(live: RouterMesh) -> None:
    request = _gen_request()
    request.pipeline.controlnets.add(id=CONTROLNET, image=_png(), scale=1.0)
    result = live.stub.Generate(request, timeout=300).result
    assert len(result.images) == 1
    assert CONTROLNET in {load.component_id for load in result.loads}


def _router_idle(mesh: RouterMesh) -> bool:
    state = mesh.router_app.state
    return all(state.in_flight.count((NODE, w)) == 0 for w in ("w1", "w2"))


def test_client_deadline_and_cancel_reach_the_worker(live: RouterMesh) -> None:
    # Long enough to still be denoising when the 1 s deadline passes, short enough not to stall teardown.
    slow = _gen_request(steps=150, width=128, height=128, num_images=2)
    with pytest.raises(grpc.RpcError) as err:
        live.stub.Generate(slow, timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: _router_idle(live), "the router to drop the timed-out worker call")

    call = live.stub.GenerateStream(
        router_pb2.GenerateStreamRequest(pipeline=slow.pipeline, params=slow.params, tenant="t1"), timeout=300
    )
    first = next(call)
    assert first.WhichOneof("event") in {"queued", "loading", "step"}
    call.cancel()
    wait_for(lambda: _router_idle(live), "the router to drop the cancelled worker call")
    for worker_id in ("w1", "w2"):
        address = _worker_address(live, worker_id)
        wait_for(
            lambda a=address: (s := _worker_status(a)).running == 0 and s.queue_length == 0,  # type: ignore[misc]
            f"worker {worker_id} to go idle",
            timeout=120,
        )
    # Still serving real requests afterwards.
    assert len(live.stub.Generate(_gen_request(), timeout=300).result.images) == 1


def test_unreachable_worker_is_retried_on_the_next_candidate(live: RouterMesh, caplog: pytest.LogCaptureFixture) -> None:
    # A dead worker on the same node that claims the base on its device ranks first.
    base = "sd15-tiny-c"
    live.coord.RegisterWorker(
        coordinator_pb2.RegisterWorkerRequest(
            worker=coordinator_pb2.WorkerInfo(worker_id="a-dead", node_id=NODE, address="127.0.0.1:9")
        ),
        timeout=10,
    )
    claim = coordinator_pb2.ResidencyUpdate(component_id=base, tier=common_pb2.TIER_GPU, present=True, bytes=1)
    live.coord.ReportResidency(
        coordinator_pb2.ReportResidencyRequest(node_id=NODE, worker_id="a-dead", updates=[claim]), timeout=10
    )
    try:
        residencies = live.stub.GetModel(router_pb2.GetModelRequest(id=base), timeout=10).residencies
        assert "a-dead" in {r.worker_id for r in residencies}
        # The router places from its replica of the view: wait until it lists the dead worker and its claim.
        view = live.router_app.state.view
        wait_for(
            lambda: (NODE, "a-dead") in view.workers and (NODE, "a-dead", Tier.GPU) in view.copies(base),
            "the router's view to show the dead worker holding the base",
        )
        request = _gen_request()
        request.pipeline.base_id = base
        del request.pipeline.loras[:]
        with caplog.at_level("WARNING", logger="diffmesh_router.forwarder"):
            result = live.stub.Generate(request, timeout=300).result
        assert result.worker_id in {"w1", "w2"}
        assert len(result.images) == 1
        retried = [r for r in caplog.records if r.getMessage().startswith("worker unavailable; retrying")]
        assert [getattr(r, "worker_id", None) for r in retried] == ["a-dead"]
    finally:
        live.coord.ReportResidency(
            coordinator_pb2.ReportResidencyRequest(node_id=NODE, worker_id="a-dead", updates=[], full_snapshot=True),
            timeout=10,
        )
