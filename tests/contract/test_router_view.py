"""The router on its replica of the coordinator's view, with real services: a coordinator on a real
Redis, an instance manager and two CPU workers (``max_queue=2``) on the demo models, a router per
policy. Placement follows residency changes without ``Locate``; a full queue spills to the other
worker; ``lru`` routes least-loaded; a plan's fused overlay is run for its pipeline; the router keeps
answering while the coordinator is down.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from diffmesh.pipeline_key import canonical_key, fused_id
from diffmesh.policy_mode import PolicyMode
from diffmesh.server import ServerThread
from diffmesh.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    instance_manager_pb2,
    instance_manager_pb2_grpc,
    plan_pb2,
    router_pb2,
    router_pb2_grpc,
)
from diffmesh_coordinator.app import CoordinatorApp
from diffmesh_coordinator.settings import CoordinatorSettings
from diffmesh_router.app import RouterApp
from diffmesh_router.settings import RouterSettings
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.waiting import wait_for

NODE = f"rv-node-{os.getpid()}"
WORKERS = ("w1", "w2")
LORA = "lora-ink"


@dataclass
class Router:
    """One router on the mesh's coordinator, with a client stub."""

    app: RouterApp
    thread: ServerThread
    channel: grpc.Channel
    stub: router_pb2_grpc.RouterServiceStub

    def stats(self) -> router_pb2.GetRouterStatsResponse:
        return self.stub.GetRouterStats(router_pb2.GetRouterStatsRequest(), timeout=10)

    def close(self) -> None:
        self.channel.close()
        self.thread.stop()


@dataclass
class ViewMesh:
    """Coordinator, instance manager, two workers and one router per policy."""

    coordinator_settings: CoordinatorSettings
    coordinator: ServerThread
    coord: coordinator_pb2_grpc.CacheCoordinatorServiceStub
    im: ServerThread
    workers: list[ServerThread]
    routers: dict[PolicyMode, Router]

    @property
    def router(self) -> Router:
        return self.routers[PolicyMode.DIFFMESH]


def _start_router(coordinator: str, mode: PolicyMode) -> Router:
    settings = RouterSettings(
        coordinator=coordinator, catalog_cache_seconds=0.5, record_flush_seconds=0.1, full_wait_seconds=240.0
    )
    app = RouterApp(settings, mode=mode)
    thread = ServerThread(app)
    channel = grpc.insecure_channel(thread.address)
    return Router(app, thread, channel, router_pb2_grpc.RouterServiceStub(channel))


def _synced(router: Router) -> bool:
    state = router.app.state
    return state.replica.synced and {(NODE, w) for w in WORKERS} <= set(state.view.workers)


@pytest.fixture(scope="module")
def mesh(redis_url: str, demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ViewMesh]:
    from diffmesh_instance_manager.app import InstanceManagerApp
    from diffmesh_instance_manager.settings import InstanceManagerSettings
    from diffmesh_worker.app import WorkerApp
    from diffmesh_worker.settings import WorkerSettings

    coordinator_settings = CoordinatorSettings(
        redis_url=redis_url, namespace=f"rv-{uuid.uuid4().hex[:8]}:", catalog=str(demo_models / "catalog.json")
    )
    coordinator = ServerThread(CoordinatorApp(coordinator_settings))
    coord_channel = grpc.insecure_channel(coordinator.address)
    started: list[Any] = [coordinator]
    try:
        im = ServerThread(
            InstanceManagerApp(
                InstanceManagerSettings(
                    node_id=NODE,
                    coordinator=coordinator.address,
                    ssd_dir=str(tmp_path_factory.mktemp("rv-ssd")),
                    allowed_roots=[str(demo_models)],
                )
            )
        )
        started.append(im)
        workers = []
        for worker_id in WORKERS:
            settings = WorkerSettings(
                worker_id=worker_id,
                node_id=NODE,
                coordinator=coordinator.address,
                instance_manager=im.address,
                device="cpu",
                max_queue=2,
                torch_threads=1,
            )
            workers.append(ServerThread(WorkerApp(settings)))
            started.append(workers[-1])
        routers = {mode: _start_router(coordinator.address, mode) for mode in PolicyMode}
        started.extend(routers.values())
        for router in routers.values():
            wait_for(lambda r=router: _synced(r), "the router's view to list both workers", timeout=60)  # type: ignore[misc]
        mesh = ViewMesh(
            coordinator_settings,
            coordinator,
            coordinator_pb2_grpc.CacheCoordinatorServiceStub(coord_channel),
            im,
            workers,
            routers,
        )
    except BaseException:
        for server in reversed(started):
            server.stop() if isinstance(server, ServerThread) else server.close()
        raise
    yield mesh
    coord_channel.close()
    for router in mesh.routers.values():
        router.close()
    for server in [*reversed(mesh.workers), mesh.im, mesh.coordinator]:
        server.stop()


def _request(base: str, loras: tuple[tuple[str, float], ...] = (), **params: Any) -> router_pb2.GenerateRequest:
    gen: dict[str, Any] = {"prompt": "a blue circle", "steps": 2, "width": 64, "height": 64, "num_images": 1, "seed": 5}
    gen.update(params)
    pipeline = common_pb2.PipelineSpec(base_id=base, loras=[common_pb2.LoraRef(id=i, scale=s) for i, s in loras])
    return router_pb2.GenerateRequest(pipeline=pipeline, params=common_pb2.GenerationParams(**gen), tenant="rv")


def _claim(mesh: ViewMesh, worker_id: str, component_id: str) -> None:
    """Reports ``component_id`` on ``worker_id``'s device, as the worker would after building it."""
    update = coordinator_pb2.ResidencyUpdate(component_id=component_id, tier=common_pb2.TIER_GPU, present=True, bytes=1)
    mesh.coord.ReportResidency(
        coordinator_pb2.ReportResidencyRequest(node_id=NODE, worker_id=worker_id, updates=[update]), timeout=10
    )


def _in_view(router: Router, worker_id: str, component_id: str) -> bool:
    from diffmesh.tiers import Tier

    return (NODE, worker_id, Tier.GPU) in router.app.state.view.copies(component_id)


def test_placement_follows_residency_changes_without_locate(mesh: ViewMesh) -> None:
    router = mesh.router
    before = router.stats()
    assert before.view_connected and before.view_snapshots >= 1
    for worker_id, base in (("w2", "sd15-tiny-c"), ("w1", "sd15-tiny-b")):
        _claim(mesh, worker_id, base)
        wait_for(lambda w=worker_id, b=base: _in_view(router, w, b), f"{base} on {worker_id} in the router's view")  # type: ignore[misc]
        result = router.stub.Generate(_request(base), timeout=300).result
        assert result.worker_id == worker_id, f"{base} is on {worker_id}'s device, yet {result.worker_id} ran it"
        assert len(result.images) == 1
    after = router.stats()
    assert after.locate_calls == before.locate_calls == 0
    assert after.list_nodes_calls == before.list_nodes_calls == 0
    assert after.fallback_decisions == 0
    assert after.view_decisions - before.view_decisions == 2
    assert after.view_updates > before.view_updates


def test_concurrent_requests_spill_instead_of_failing(mesh: ViewMesh) -> None:
    router = mesh.router
    before = router.stats()
    request = _request("sd15-tiny-a", ((LORA, 0.8),), steps=6, width=128, height=128)
    results: list[common_pb2.GenerationResult] = []
    errors: list[grpc.RpcError] = []
    lock = threading.Lock()

    def send(seed: int) -> None:
        r = router_pb2.GenerateRequest()
        r.CopyFrom(request)
        r.params.seed = seed
        try:
            result = router.stub.Generate(r, timeout=600).result
        except grpc.RpcError as err:
            with lock:
                errors.append(err)
            return
        with lock:
            results.append(result)

    threads = [threading.Thread(target=send, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    assert not errors, [(e.code(), e.details()) for e in errors]  # no RESOURCE_EXHAUSTED (nor anything else)
    assert len(results) == 8
    assert {r.worker_id for r in results} == set(WORKERS)
    after = router.stats()
    assert after.resource_exhausted == before.resource_exhausted
    routed = {w.worker_id: w.requests for w in after.workers}
    assert set(routed) == set(WORKERS)
    # 8 requests, room for 2 x (1 running + 2 waiting): anything beyond spilled or waited, never failed.
    print(f"spills {after.spills - before.spills}, waits {after.full_waits - before.full_waits}, routed {routed}")


def test_lru_routes_least_loaded(mesh: ViewMesh) -> None:
    lru = mesh.routers[PolicyMode.LRU]
    _claim(mesh, "w2", "sd15-tiny-b")
    wait_for(lambda: _in_view(lru, "w2", "sd15-tiny-b"), "the claim in the lru router's view")
    slow = _request("sd15-tiny-a", steps=150, width=128, height=128)
    call = lru.stub.GenerateStream(
        router_pb2.GenerateStreamRequest(pipeline=slow.pipeline, params=slow.params, tenant="rv"), timeout=300
    )
    try:
        first = next(call)
        assert first.WhichOneof("event") in {"queued", "loading", "step"}
        busy = set(lru.app.state.in_flight.counts())
        assert len(busy) == 1
        (busy_worker,) = busy
        # Least loaded: the idle worker, whatever holds the pipeline (w2 claims sd15-tiny-b on its device).
        result = lru.stub.Generate(_request("sd15-tiny-b"), timeout=300).result
        assert (result.node_id, result.worker_id) != busy_worker
    finally:
        call.cancel()
    stats = lru.stats()
    assert stats.policy == "lru"
    assert stats.locate_calls == 0 and stats.fallback_decisions == 0
    assert stats.fused_rewrites == 0 and stats.hot_requests == 0


def test_a_plan_fused_overlay_runs_for_its_pipeline(mesh: ViewMesh) -> None:
    router = mesh.router
    base, loras = "sd15-tiny-b", ((LORA, 0.6),)
    key = canonical_key(base, loras)
    overlay = fused_id(base, loras)
    with grpc.insecure_channel(mesh.im.address) as ch:
        instance_manager_pb2_grpc.InstanceManagerServiceStub(ch).Fuse(
            instance_manager_pb2.FuseRequest(base_id=base, loras=[common_pb2.LoraRef(id=i, scale=s) for i, s in loras]),
            timeout=300,
        )
    # The plan the coordinator would publish for a HOT, fused pipeline (a version above its own).
    plan = plan_pb2.Plan(version=10**9, mode=plan_pb2.POLICY_MODE_DIFFMESH)
    hot = plan.hot.add(pipeline_key=key, fused_id=overlay, share=1.0)
    hot.pipeline.base_id = base
    hot.pipeline.loras.add(id=LORA, scale=0.6)
    hot.replicas.add(node_id=NODE, worker_id="w1")
    plan.pipelines.add(pipeline_key=key, band=plan_pb2.BAND_HOT, rate_per_s=1.0)

    async def publish() -> None:
        router.app.state.view.apply_plan(plan)

    router.thread.call(publish())
    before = router.stats()
    result = router.stub.Generate(_request(base, loras), timeout=300).result
    after = router.stats()
    assert after.fused_rewrites == before.fused_rewrites + 1
    assert after.hot_requests == before.hot_requests + 1
    assert result.pipeline_key == key  # the requested pipeline, not the overlay's
    kinds = {load.component_id: load.kind for load in result.loads}
    assert kinds.get(overlay) == common_pb2.COMPONENT_KIND_FUSED
    assert LORA not in kinds  # no runtime adapter


def test_a_warm_fusion_target_runs_as_its_overlay(mesh: ViewMesh) -> None:
    router = mesh.router
    base, loras = "sd15-tiny-b", ((LORA, 0.6),)
    key = canonical_key(base, loras)
    overlay = fused_id(base, loras)
    with grpc.insecure_channel(mesh.im.address) as ch:
        instance_manager_pb2_grpc.InstanceManagerServiceStub(ch).Fuse(
            instance_manager_pb2.FuseRequest(base_id=base, loras=[common_pb2.LoraRef(id=i, scale=s) for i, s in loras]),
            timeout=300,
        )
    # WARM, not HOT: only the plan's fusion targets name the overlay (a version above any plan before).
    plan = plan_pb2.Plan(version=10**9 + 1, mode=plan_pb2.POLICY_MODE_DIFFMESH)
    plan.pipelines.add(pipeline_key=key, band=plan_pb2.BAND_WARM, rate_per_s=1.0)
    target = plan.fusions.add(pipeline_key=key, fused_id=overlay, node_ids=[NODE])
    target.pipeline.base_id = base
    target.pipeline.loras.add(id=LORA, scale=0.6)

    async def publish() -> None:
        router.app.state.view.apply_plan(plan)

    router.thread.call(publish())
    before = router.stats()
    result = router.stub.Generate(_request(base, loras), timeout=300).result
    after = router.stats()
    assert after.fused_rewrites == before.fused_rewrites + 1
    assert after.hot_requests == before.hot_requests  # WARM: fused without being HOT
    assert result.pipeline_key == key
    kinds = {load.component_id: load.kind for load in result.loads}
    assert kinds.get(overlay) == common_pb2.COMPONENT_KIND_FUSED
    assert LORA not in kinds


def test_router_answers_with_the_coordinator_stopped(mesh: ViewMesh) -> None:
    router = mesh.router
    request = _request("sd15-tiny-a")
    assert len(router.stub.Generate(request, timeout=300).result.images) == 1  # warm: catalog records cached
    port = mesh.coordinator.port
    mesh.coordinator.stop()
    try:
        wait_for(lambda: not router.stats().view_connected, "the router to see the change stream down")
        stats = router.stats()
        assert "routing on the last view" in stats.view_detail
        health = health_pb2_grpc.HealthStub(router.channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        result = router.stub.Generate(request, timeout=300).result
        assert len(result.images) == 1 and result.worker_id in WORKERS
        later = router.stats()
        assert later.view_decisions == stats.view_decisions + 1
        assert later.locate_calls == stats.locate_calls
    finally:
        mesh.coordinator = ServerThread(CoordinatorApp(mesh.coordinator_settings), "127.0.0.1", port)
    wait_for(lambda: router.stats().view_connected, "the router to follow the view again", timeout=60)
    assert "following the coordinator's view" in router.stats().view_detail
