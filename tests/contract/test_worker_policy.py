"""The worker's part of the live policy plane, against real services: the real coordinator (real
Redis, demo catalog, its plan loop), the real instance manager (real SSD dir, POSIX shared
memory, a real HTTP server as REMOTE for a slow adapter) and real workers in-process.

* load reports (queue, running, device memory) reach the coordinator and follow a request;
* a plan that makes the worker a HOT replica pre-builds and pins the pipeline before any
  request reaches the worker, the plan driven by real ``RecordRequests``;
* the device tier evicts with the utility policy (a LoRA used often outlives one used once,
  more recently) and with LRU under ``DIFFMESH_POLICY=lru``;
* asymmetric build: the base is built while a slow LoRA is still being acquired.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from diffmesh.pipeline_key import canonical_key, fused_id_of_key
from diffmesh.server import ServerThread
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, plan_pb2, worker_pb2, worker_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

from tests.support.im import LORA as LORA_KIND
from tests.support.im import register_component
from tests.support.ranged_http import RangedHttp, ranged_http
from tests.support.waiting import wait_for
from tests.support.worker import BASE, BASE_B, LORA, LORA_2, WorkerMesh, make_request, run

LORA_3 = "lora-ink"
SLOW_LORA = "lora-slow"
NODE = f"node-policy-{os.getpid()}"
WORKER = "wk-policy"


# --- a REMOTE whose answers wait for a gate ---------------------------------------------


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RangedHttp]:
    """An HTTP REMOTE on loopback whose downloads finish only while ``gate`` is set (it starts set)."""
    gate = threading.Event()
    gate.set()
    with ranged_http(tmp_path_factory.mktemp("gated-remote"), gate) as served:
        yield served


# --- spans as they start ----------------------------------------------------------------


@dataclass
class SpanLog(SpanProcessor):
    """Every span's start and end, with its attributes, as they happen (not only finished spans)."""

    started: list[tuple[str, dict[str, Any], int]] = field(default_factory=list)
    ended: list[tuple[str, dict[str, Any], int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_start(self, span: Span, parent_context: object = None) -> None:
        with self.lock:
            self.started.append((span.name, dict(span.attributes or {}), span.start_time or 0))

    def on_end(self, span: ReadableSpan) -> None:
        with self.lock:
            self.ended.append((span.name, dict(span.attributes or {}), span.start_time or 0, span.end_time or 0))

    def start_of(self, name: str, component_id: str) -> int | None:
        """When the first span ``name`` of ``component_id`` started (ns), or None."""
        with self.lock:
            return next((t for n, a, t in self.started if n == name and a.get("component_id") == component_id), None)

    def acquire_end(self, component_id: str) -> int | None:
        """When the first ``worker.acquire`` span naming ``component_id`` ended (ns), or None."""
        with self.lock:
            return next(
                (end for n, a, _, end in self.ended if n == "worker.acquire" and component_id in a.get("component_ids", ())),
                None,
            )


@pytest.fixture(scope="module")
def spans() -> SpanLog:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    log = SpanLog()
    provider.add_span_processor(log)
    return log


# --- meshes -------------------------------------------------------------------------------


@contextmanager
def worker_on(
    mesh: WorkerMesh, worker_id: str, policy: str = "diffmesh", node: str = NODE, **overrides: Any
) -> Iterator[WorkerMesh]:
    """Another real worker on ``node`` (``mesh``'s instance manager's), with ``mesh``'s coordinator, under
    ``DIFFMESH_POLICY=policy``."""
    from diffmesh_worker.app import WorkerApp
    from diffmesh_worker.settings import WorkerSettings

    settings = dict(
        worker_id=worker_id,
        node_id=node,
        coordinator=mesh.coordinator.address,
        instance_manager=mesh.im.address,
        device="cpu",
        max_queue=2,
        torch_threads=1,
    )
    settings.update(overrides)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DIFFMESH_POLICY", policy)
        app = WorkerApp(WorkerSettings(**settings))  # type: ignore[arg-type]
    worker = ServerThread(app)
    channel = grpc.insecure_channel(worker.address)
    try:
        yield WorkerMesh(mesh.coordinator, mesh.im, worker, app, worker_pb2_grpc.WorkerServiceStub(channel), mesh.coord)
    finally:
        channel.close()
        worker.stop()


@contextmanager
def policy_mesh(
    redis_url: str,
    demo_models: Path,
    tmp: Path,
    remote: RangedHttp,
    worker: dict[str, Any] | None = None,
    node: str = NODE,
    **coordinator: Any,
) -> Iterator[WorkerMesh]:
    """Coordinator (demo catalog plus ``lora-slow`` on the gated REMOTE, ``coordinator`` settings), instance manager
    and one worker (``worker`` settings)."""
    from diffmesh_coordinator.app import CoordinatorApp
    from diffmesh_coordinator.settings import CoordinatorSettings
    from diffmesh_instance_manager.app import InstanceManagerApp
    from diffmesh_instance_manager.settings import InstanceManagerSettings

    with ExitStack() as stack:
        settings = dict(
            redis_url=redis_url,
            namespace=f"wpt{uuid.uuid4().hex[:8]}:",
            catalog=str(demo_models / "catalog.json"),
            lease_seconds=6,
        )
        settings.update(coordinator)
        coord_server = ServerThread(CoordinatorApp(CoordinatorSettings(**settings)))  # type: ignore[arg-type]
        stack.callback(coord_server.stop)
        channel = grpc.insecure_channel(coord_server.address)
        stack.callback(channel.close)
        coord = coordinator_pb2_grpc.CacheCoordinatorServiceStub(channel)
        slow = remote.root / f"{SLOW_LORA}.safetensors"
        shutil.copy(demo_models / "lora" / f"{LORA}.safetensors", slow)
        register_component(coord, SLOW_LORA, LORA_KIND, f"{remote.url}/{slow.name}", slow)
        im = ServerThread(
            InstanceManagerApp(
                InstanceManagerSettings(
                    node_id=node,
                    coordinator=coord_server.address,
                    ssd_dir=str(tmp / "ssd"),
                    allowed_roots=[str(demo_models), f"{remote.url}/"],
                )
            )
        )
        stack.callback(im.stop)
        base = WorkerMesh(coord_server, im, coord_server, None, None, coord)  # type: ignore[arg-type]
        yield stack.enter_context(worker_on(base, WORKER, node=node, **(worker or {})))


@pytest.fixture(scope="module")
def mesh(
    redis_url: str, demo_models: Path, tmp_path_factory: pytest.TempPathFactory, remote: RangedHttp
) -> Iterator[WorkerMesh]:
    with policy_mesh(redis_url, demo_models, tmp_path_factory.mktemp("policy"), remote) as m:
        yield m


def clear_device(mesh: WorkerMesh) -> None:
    """Empties the worker's device tier (leases released, residency reported), on the worker's loop."""
    app = mesh.app

    async def clear() -> None:
        assert app._loader is not None
        await app._loader.release_removed(app.cache.clear())

    mesh.worker.call(clear())


def resident(mesh: WorkerMesh) -> dict[str, worker_pb2.ResidentComponent]:
    return {r.component_id: r for r in mesh.stub.Status(worker_pb2.StatusRequest(), timeout=10).resident}


# --- tests --------------------------------------------------------------------------------


def _frequent_vs_recent(mesh: WorkerMesh) -> dict[str, worker_pb2.ResidentComponent]:
    """LoRA used 4 times, then another once (more recently), then a third needs the room of one."""
    clear_device(mesh)
    run(mesh, make_request(seed=1, loras=((LORA, 1.0),)))
    sizes = resident(mesh)
    base_bytes, lora_bytes = sizes[BASE].bytes, sizes[LORA].bytes
    # Room for the base and two LoRAs (the demo LoRAs all have one size), not three.
    mesh.app.cache.capacity_bytes = base_bytes + 2 * lora_bytes + lora_bytes // 2
    for seed in (2, 3, 4):
        run(mesh, make_request(seed=seed, loras=((LORA, 1.0),)))
    run(mesh, make_request(seed=5, loras=((LORA_2, 1.0),)))
    assert resident(mesh)[LORA_2].bytes == lora_bytes
    run(mesh, make_request(seed=6, loras=((LORA_3, 1.0),)))
    return resident(mesh)


def test_utility_eviction_keeps_the_often_used_lora_over_the_recent_one(mesh: WorkerMesh) -> None:
    capacity = mesh.app.cache.capacity_bytes
    try:
        after = _frequent_vs_recent(mesh)
    finally:
        mesh.app.cache.capacity_bytes = capacity
    assert {BASE, LORA, LORA_3} <= set(after) and LORA_2 not in after


def test_lru_mode_evicts_the_least_recently_used_instead(mesh: WorkerMesh) -> None:
    with worker_on(mesh, "wk-lru", policy="lru") as lru:
        assert lru.app.plan_follower is None and lru.app.plan_executor is None  # no plan execution under lru
        after = _frequent_vs_recent(lru)
    assert {BASE, LORA_2, LORA_3} <= set(after) and LORA not in after


def test_base_builds_while_a_slow_lora_is_still_acquired(mesh: WorkerMesh, remote: RangedHttp, spans: SpanLog) -> None:
    clear_device(mesh)
    assert remote.gate is not None
    remote.gate.clear()  # the LoRA's download cannot finish until the gate opens
    outcome: dict[str, Any] = {}

    def client() -> None:
        try:
            outcome["result"] = run(mesh, make_request(seed=3, base=BASE_B, loras=((SLOW_LORA, 1.0),)))[1]
        except grpc.RpcError as exc:  # reported by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=client)
    thread.start()
    try:
        # The ordering itself: the base's build starts while the LoRA cannot have arrived.
        base_started = wait_for(lambda: spans.start_of("worker.load.component", BASE_B), "the base's build to start", 60)
        assert spans.acquire_end(SLOW_LORA) is None
    finally:
        remote.gate.set()
        thread.join(120)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert [(load.component_id, load.source_tier) for load in result.loads] == [
        (BASE_B, result.loads[0].source_tier),
        (SLOW_LORA, common_pb2.TIER_REMOTE),
    ]
    lora_acquired = spans.acquire_end(SLOW_LORA)
    assert lora_acquired is not None and base_started < lora_acquired
    assert {BASE_B, SLOW_LORA} <= set(resident(mesh))


def watch_load(mesh: WorkerMesh, worker_id: str, matches: Callable[[plan_pb2.WorkerLoad], bool]) -> plan_pb2.WorkerLoad:
    """The first load of ``worker_id`` in the coordinator's view (its snapshot, then its changes) that ``matches``."""
    call = mesh.coord.WatchView(coordinator_pb2.WatchViewRequest(), timeout=30)
    try:
        for response in call:
            event = response.event
            kind = event.WhichOneof("change")
            loads = list(event.snapshot.loads) if kind == "snapshot" else [event.load] if kind == "load" else []
            for load in loads:
                if (load.worker.node_id, load.worker.worker_id) == (NODE, worker_id) and matches(load):
                    return load
    finally:
        call.cancel()
    raise AssertionError("the view stream ended")


def test_load_reports_reach_the_coordinator_and_follow_a_request(mesh: WorkerMesh) -> None:
    idle = watch_load(mesh, WORKER, lambda load: load.running == 0 and load.queue_length == 0)
    assert idle.max_queue == 2 and idle.device_memory_total_bytes >= idle.device_memory_free_bytes > 0
    assert idle.measured_unix > 0

    long_call = mesh.stub.Run(make_request(seed=11, steps=150), timeout=300)
    try:
        for event in long_call:  # wait until it denoises
            if event.WhichOneof("event") == "step":
                break
        busy = watch_load(mesh, WORKER, lambda load: load.running == 1)
        assert busy.measured_unix >= idle.measured_unix
    finally:
        long_call.cancel()
    after = watch_load(mesh, WORKER, lambda load: load.running == 0 and load.measured_unix > busy.measured_unix)
    assert after.queue_length == 0


def test_a_lapsed_lease_is_renewed_and_the_load_sent_again(mesh: WorkerMesh, redis_url: str) -> None:
    import redis

    settings = mesh.coordinator.service.settings  # type: ignore[attr-defined]
    lease_key = f"{settings.namespace}worker:{NODE}/{WORKER}"
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.delete(lease_key) == 1  # the coordinator forgets the worker, as when its lease lapses
        forgotten = time.time()
        run(mesh, make_request(seed=12))  # its load changes: ReportLoad is refused NOT_FOUND, the worker registers again
        again = watch_load(mesh, WORKER, lambda load: load.measured_unix > forgotten)
        assert again.running == 0 and client.exists(lease_key)
    finally:
        client.close()


def _record(coord: coordinator_pb2_grpc.CacheCoordinatorServiceStub, key: str, ids: list[str], count: int) -> None:
    now = time.time()
    records = [
        coordinator_pb2.RequestRecord(request_id=uuid.uuid4().hex, pipeline_key=key, component_ids=ids, arrival_unix=now)
        for _ in range(count)
    ]
    assert coord.RecordRequests(coordinator_pb2.RecordRequestsRequest(records=records), timeout=10).recorded == count


def test_a_plan_making_the_worker_a_replica_prebuilds_and_pins_it(
    redis_url: str, demo_models: Path, tmp_path: Path, remote: RangedHttp
) -> None:
    worker = {"plan_retry_seconds": 0.3}
    plan_mesh = policy_mesh(
        redis_url, demo_models, tmp_path, remote, worker, node=f"{NODE}-plan", plan_seconds=0.3, hot_fraction=0.5
    )
    with plan_mesh as m:
        key = canonical_key(BASE, [(LORA, 1.0)])
        fused = fused_id_of_key(key)
        _record(m.coord, key, [BASE, LORA], 5)  # what routers send: the plan follows

        def prebuilt() -> worker_pb2.StatusResponse | None:
            status = m.stub.Status(worker_pb2.StatusRequest(), timeout=10)
            held = {r.component_id for r in status.resident}
            return status if status.plan_version > 0 and {fused, BASE} <= held else None

        # Before any request reached the worker, the plan's pipeline is built on its device and pinned: the
        # overlay the node's instance manager fused for it (before it exists, base + runtime LoRA), over its base.
        status = wait_for(prebuilt, "the HOT replica's pre-build", 60)
        assert (status.running, status.queue_length) == (0, 0)
        pinned = {r.component_id for r in status.resident if r.pinned}
        assert pinned == {r.component_id for r in status.resident} & {BASE, LORA, fused} and {BASE, fused} <= pinned
        _, result = run(m, make_request(seed=4, base=fused))
        assert [(load.component_id, load.source_tier, load.bytes) for load in result.loads] == [
            (fused, common_pb2.TIER_GPU, 0),
            (BASE, common_pb2.TIER_GPU, 0),
        ]

        # A newer plan makes another pipeline the HOT one: the first is unpinned, not removed.
        _record(m.coord, canonical_key(BASE_B), [BASE_B], 50)

        def moved() -> dict[str, worker_pb2.ResidentComponent] | None:
            status = m.stub.Status(worker_pb2.StatusRequest(), timeout=10)
            held = {r.component_id: r for r in status.resident}
            return held if BASE_B in held and held[BASE_B].pinned and status.plan_version > 1 else None

        held = wait_for(moved, "the next plan's replica", 60)
        assert BASE in held and not any(held[cid].pinned for cid in (BASE, LORA, fused) if cid in held)


def test_a_plan_naming_an_unknown_component_is_skipped_and_the_rest_applied(mesh: WorkerMesh) -> None:
    executor = mesh.app.plan_executor
    assert executor is not None
    clear_device(mesh)

    def hot(key: str, base: str, loras: tuple[str, ...] = ()) -> plan_pb2.HotPipelinePlan:
        return plan_pb2.HotPipelinePlan(
            pipeline_key=key,
            pipeline=common_pb2.PipelineSpec(base_id=base, loras=[common_pb2.LoraRef(id=i, scale=1.0) for i in loras]),
            replicas=[plan_pb2.WorkerRef(node_id=NODE, worker_id=WORKER)],
        )

    # Newer than any the coordinator made here (it saw no requests): this test's plan is the one applied.
    version = executor.version + 1000
    plan = plan_pb2.Plan(
        version=version,
        hot=[hot("unknown", "no-such-base"), hot("known", BASE_B, (LORA_2,))],
    )
    mesh.worker.call(executor.apply(plan))
    wait_for(lambda: {BASE_B, LORA_2} <= set(resident(mesh)), "the known replica's pre-build", 60)
    assert executor.replicas["unknown"].skipped_version == version
    held = resident(mesh)
    assert held[BASE_B].pinned and held[LORA_2].pinned
    _, result = run(mesh, make_request(seed=8, base=BASE_B, loras=((LORA_2, 1.0),)))  # still serving, from its device
    assert {load.source_tier for load in result.loads} == {common_pb2.TIER_GPU}


def _queued_behind_a_blocked_request(
    mesh: WorkerMesh, remote: RangedHttp, demo_models: Path, tag: str, before_gate_opens: Callable[[str], None]
) -> common_pb2.GenerationResult:
    """Request A holds the device, blocked on a LoRA from the gated REMOTE; B, needing a LoRA no tier holds yet
    (a local file: its fetch is not gated), queues behind it. ``before_gate_opens(B's LoRA id)`` runs while A is
    still blocked; then the gate opens and B's result is returned."""
    assert remote.gate is not None
    gated, ahead = f"lora-gated-{tag}", f"lora-ahead-{tag}"
    source = demo_models / "lora" / f"{LORA}.safetensors"
    shutil.copy(source, remote.root / f"{gated}.safetensors")
    register_component(mesh.coord, gated, LORA_KIND, f"{remote.url}/{gated}.safetensors", source)
    local = demo_models / "lora" / f"{ahead}.safetensors"
    shutil.copy(source, local)
    register_component(mesh.coord, ahead, LORA_KIND, str(local), source)
    clear_device(mesh)
    run(mesh, make_request(seed=1))  # the base is built: only the LoRAs are missing below
    remote.gate.clear()
    results: dict[str, Any] = {}

    def client(name: str, request: worker_pb2.RunRequest) -> None:
        try:
            results[name] = run(mesh, request)[1]
        except grpc.RpcError as exc:  # reported by the assertions below
            results[name] = exc

    a = threading.Thread(target=client, args=("a", make_request(seed=2, loras=((gated, 1.0),))))
    b = threading.Thread(target=client, args=("b", make_request(seed=3, loras=((ahead, 1.0),))))
    try:
        a.start()
        wait_for(lambda: mesh.stub.Status(worker_pb2.StatusRequest(), timeout=10).running == 1, "A to hold the device", 60)
        b.start()
        wait_for(lambda: mesh.stub.Status(worker_pb2.StatusRequest(), timeout=10).queue_length == 1, "B to queue", 60)
        before_gate_opens(ahead)
        assert "a" not in results  # A cannot have finished: its LoRA is still behind the gate
    finally:
        remote.gate.set()
        a.join(120)
        b.join(120)
    assert isinstance(results.get("a"), common_pb2.GenerationResult), results.get("a")
    assert isinstance(results.get("b"), common_pb2.GenerationResult), results.get("b")
    return results["b"]


def test_a_queued_request_loads_ahead_while_it_waits(
    mesh: WorkerMesh, remote: RangedHttp, demo_models: Path, spans: SpanLog
) -> None:
    def ahead_fetched(lora: str) -> None:
        # The load-ahead Acquire of B's LoRA ends while A still holds the device.
        wait_for(lambda: spans.acquire_end(lora) is not None, "B's LoRA to be fetched ahead", 60)

    b = _queued_behind_a_blocked_request(mesh, remote, demo_models, "dm", ahead_fetched)
    lora = [load for load in b.loads if load.component_id.startswith("lora-ahead")]
    assert [load.source_tier for load in lora] == [common_pb2.TIER_HOST]  # in HOST when B got the device


def test_lru_mode_loads_on_demand(mesh: WorkerMesh, remote: RangedHttp, demo_models: Path) -> None:
    with worker_on(mesh, "wk-lru-ahead", policy="lru") as lru:
        b = _queued_behind_a_blocked_request(lru, remote, demo_models, "lru", lambda _: None)
    lora = [load for load in b.loads if load.component_id.startswith("lora-ahead")]
    assert [load.source_tier for load in lora] == [common_pb2.TIER_REMOTE]  # fetched once B held the device
