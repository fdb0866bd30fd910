"""Contract tests of the coordinator's view RPCs: ReportLoad, GetPlan, WatchView (real server, real Redis).

The plan loop runs with a long period here, so the plan stays at the version published at
start; the plan loop itself is tested in test_coordinator_policy.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis
from diffmesh.server import ServerThread
from diffmesh.v1 import coordinator_pb2, coordinator_pb2_grpc, plan_pb2
from diffmesh_coordinator.app import CoordinatorApp
from diffmesh_coordinator.keys import KeyLayout
from diffmesh_coordinator.view_events import parse_id

from tests.contract.test_coordinator import GPU, HOST, SSD, _fails, _node, _report, _settings, _update, _worker
from tests.support.waiting import wait_for

Stub = coordinator_pb2_grpc.CacheCoordinatorServiceStub
NOT_FOUND, INVALID = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def app(redis_url: str) -> Iterator[tuple[CoordinatorApp, ServerThread]]:
    coordinator = CoordinatorApp(_settings(redis_url, lease_seconds=60, plan_seconds=3600))
    thread = ServerThread(coordinator)
    yield coordinator, thread
    thread.stop()


@pytest.fixture(scope="module")
def stub(app: tuple[CoordinatorApp, ServerThread]) -> Iterator[Stub]:
    with grpc.insecure_channel(app[1].address) as channel:
        yield Stub(channel)


@pytest.fixture(scope="module")
def db(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def _load(node_id: str, worker_id: str, **fields: Any) -> coordinator_pb2.ReportLoadRequest:
    return coordinator_pb2.ReportLoadRequest(
        load=plan_pb2.WorkerLoad(worker=plan_pb2.WorkerRef(node_id=node_id, worker_id=worker_id), **fields)
    )


def _watch(stub: Stub, after: str = "", plans_only: bool = False) -> Any:
    return stub.WatchView(coordinator_pb2.WatchViewRequest(after_event_id=after, plans_only=plans_only), timeout=60)


def _next(call: Any) -> plan_pb2.ViewEvent:
    event: plan_pb2.ViewEvent = next(call).event
    assert event.event_id
    return event


def test_report_load_checks_the_worker_and_the_numbers(stub: Stub) -> None:
    stub.RegisterNode(_node("ld-n1"), timeout=10)
    stub.RegisterWorker(_worker("ld-n1", "w1"), timeout=10)
    ok = stub.ReportLoad(_load("ld-n1", "w1", queue_length=1, running=1, device_memory_free_bytes=5, max_queue=4), timeout=10)
    assert ok.recorded
    _fails(stub, stub.ReportLoad, _load("ld-n1", "w9"), NOT_FOUND, "ld-n1/w9")
    _fails(stub, stub.ReportLoad, _load("ld-nx", "w1"), NOT_FOUND, "ld-nx/w1")
    _fails(stub, stub.ReportLoad, coordinator_pb2.ReportLoadRequest(), INVALID, "load")
    _fails(stub, stub.ReportLoad, _load("", "w1"), INVALID, "load.worker.node_id")
    _fails(stub, stub.ReportLoad, _load("ld-n1", ""), INVALID, "load.worker.worker_id")
    _fails(stub, stub.ReportLoad, _load("ld-n1", "w1", queue_length=-1), INVALID, "load.queue_length")
    _fails(stub, stub.ReportLoad, _load("ld-n1", "w1", device_memory_free_bytes=-5), INVALID, "load.device_memory_free_bytes")
    _fails(stub, stub.ReportLoad, _load("ld-n1", "w1", measured_unix=-1.0), INVALID, "load.measured_unix")


def test_get_plan_sends_the_body_only_when_the_caller_lacks_it(stub: Stub) -> None:
    def published() -> plan_pb2.Plan | None:
        plan = stub.GetPlan(coordinator_pb2.GetPlanRequest(), timeout=10).plan
        return plan if plan.version else None

    plan = wait_for(published, "the first plan")
    assert plan.mode == plan_pb2.POLICY_MODE_DIFFMESH
    assert plan.admission.cold_min_uses == 2
    same = stub.GetPlan(coordinator_pb2.GetPlanRequest(known_version=plan.version), timeout=10).plan
    assert same == plan_pb2.Plan(version=plan.version)
    older = stub.GetPlan(coordinator_pb2.GetPlanRequest(known_version=plan.version + 7), timeout=10).plan
    assert older == plan
    _fails(stub, stub.GetPlan, coordinator_pb2.GetPlanRequest(known_version=-1), INVALID, "known_version")


def test_watch_view_sends_a_snapshot_then_every_change(stub: Stub) -> None:
    stub.RegisterNode(_node("wv-n1"), timeout=10)
    stub.RegisterWorker(_worker("wv-n1", "w1"), timeout=10)
    stub.ReportResidency(_report("wv-n1", "", _update("wv-base", SSD), _update("wv-base", HOST, last_used=5.0)), timeout=10)
    stub.ReportResidency(_report("wv-n1", "w1", _update("wv-base", GPU)), timeout=10)
    stub.ReportLoad(_load("wv-n1", "w1", queue_length=3, device_memory_total_bytes=1 << 32), timeout=10)

    call = _watch(stub)
    try:
        first = _next(call)
        assert first.WhichOneof("change") == "snapshot"
        snap = first.snapshot
        nodes = {n.node_id: n for n in snap.live.nodes}
        assert [w.worker_id for w in nodes["wv-n1"].workers] == ["w1"]
        assert nodes["wv-n1"].workers[0].device_memory_bytes == 1 << 32
        reporters = {(r.node_id, r.worker_id): r for r in snap.residency}
        assert all(r.full_snapshot for r in snap.residency)
        ims = {(c.component_id, c.tier, c.last_used_unix) for c in reporters[("wv-n1", "")].copies}
        assert ims == {("wv-base", SSD, 1.7e9), ("wv-base", HOST, 5.0)}
        assert [(c.component_id, c.tier) for c in reporters[("wv-n1", "w1")].copies] == [("wv-base", GPU)]
        loads = {(ld.worker.node_id, ld.worker.worker_id): ld for ld in snap.loads}
        assert loads[("wv-n1", "w1")].queue_length == 3
        assert snap.plan.version >= 1

        # live changes, in the order they were applied
        stub.ReportResidency(_report("wv-n1", "", _update("wv-base", HOST, present=False, last_used=9.0)), timeout=10)
        gone = _next(call)
        assert gone.WhichOneof("change") == "residency"
        assert (gone.residency.node_id, gone.residency.worker_id, gone.residency.full_snapshot) == ("wv-n1", "", False)
        assert [(c.component_id, c.tier, c.present, c.last_used_unix) for c in gone.residency.copies] == [
            ("wv-base", HOST, False, 9.0)
        ]
        stub.ReportLoad(_load("wv-n1", "w1", queue_length=0, running=1), timeout=10)
        load = _next(call)
        assert load.WhichOneof("change") == "load"
        assert (load.load.worker.worker_id, load.load.queue_length, load.load.running) == ("w1", 0, 1)
        stub.RegisterWorker(_worker("wv-n1", "w2", 50062), timeout=10)
        live = _next(call)
        assert live.WhichOneof("change") == "live"
        workers = {(n.node_id, w.worker_id) for n in live.live.nodes for w in n.workers}
        assert {("wv-n1", "w1"), ("wv-n1", "w2")} <= workers
        assert parse_id(gone.event_id) < parse_id(load.event_id) < parse_id(live.event_id)
    finally:
        call.cancel()

    # resuming after an event continues with the next one, without a snapshot
    resumed = _watch(stub, after=gone.event_id)
    try:
        assert _next(resumed).event_id == load.event_id
        assert _next(resumed).event_id == live.event_id
    finally:
        resumed.cancel()


def test_watch_view_after_a_trimmed_id_starts_with_a_snapshot(
    stub: Stub, app: tuple[CoordinatorApp, ServerThread], db: redis.Redis
) -> None:
    stub.RegisterNode(_node("tr-n1"), timeout=10)
    stub.ReportResidency(_report("tr-n1", "", _update("tr-base", SSD)), timeout=10)
    call = _watch(stub)
    try:
        snapshot = _next(call)
        stub.ReportResidency(_report("tr-n1", "", _update("tr-lora", SSD)), timeout=10)
        seen = _next(call)
        assert seen.WhichOneof("change") == "residency"
    finally:
        call.cancel()
    stub.ReportResidency(_report("tr-n1", "", _update("tr-cn", SSD)), timeout=10)
    db.xtrim(KeyLayout(app[0].settings.namespace).view, maxlen=0, approximate=False)
    for after in (snapshot.event_id, seen.event_id):
        again = _watch(stub, after=after)
        try:
            event = _next(again)
            assert event.WhichOneof("change") == "snapshot"
            reporters = {(r.node_id, r.worker_id): r for r in event.snapshot.residency}
            assert {c.component_id for c in reporters[("tr-n1", "")].copies} == {"tr-base", "tr-lora", "tr-cn"}
        finally:
            again.cancel()
    # an id from another incarnation of the stream (beyond its last id) is not held either
    future = _watch(stub, after="99999999999999-0")
    try:
        assert _next(future).WhichOneof("change") == "snapshot"
    finally:
        future.cancel()


def test_watch_view_plans_only_sends_plans_and_nothing_else(stub: Stub) -> None:
    stub.RegisterNode(_node("po-n1"), timeout=10)
    call = _watch(stub, plans_only=True)
    try:
        first = _next(call)
        assert first.WhichOneof("change") == "snapshot"
        assert first.snapshot.plan.version >= 1
        assert not first.snapshot.live.nodes and not first.snapshot.residency and not first.snapshot.loads
    finally:
        call.cancel()
    # residency changes since the snapshot are skipped: resuming after it blocks until a plan
    # arrives, so a short deadline ends the call with nothing received.
    stub.ReportResidency(_report("po-n1", "", _update("po-base", SSD)), timeout=10)
    quiet = stub.WatchView(coordinator_pb2.WatchViewRequest(after_event_id=first.event_id, plans_only=True), timeout=1.5)
    with pytest.raises(grpc.RpcError) as err:
        next(quiet)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_watch_view_refuses_a_malformed_id(stub: Stub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        next(_watch(stub, after="not-an-id"))
    assert err.value.code() == INVALID
    assert "after_event_id" in (err.value.details() or "")


def test_lapsed_holders_reach_the_stream(redis_url: str) -> None:
    coordinator = CoordinatorApp(_settings(redis_url, lease_seconds=1.0, sweep_seconds=3600, plan_seconds=3600))
    thread = ServerThread(coordinator)
    try:
        with grpc.insecure_channel(thread.address) as channel:
            stub = Stub(channel)
            stub.RegisterNode(_node("lp-n1"), timeout=10)
            stub.ReportResidency(_report("lp-n1", "", _update("lp-base", SSD)), timeout=10)
            call = _watch(stub)
            try:
                assert _next(call).WhichOneof("change") == "snapshot"
                wait_for(lambda: thread.call(coordinator.store.sweep()), "the sweeper to purge lp-n1's lapsed lease")
                purge = _next(call)
                assert purge.WhichOneof("change") == "residency"
                assert (purge.residency.node_id, purge.residency.full_snapshot, list(purge.residency.copies)) == (
                    "lp-n1",
                    True,
                    [],
                )
                live = _next(call)
                assert live.WhichOneof("change") == "live"
                assert list(live.live.nodes) == []
            finally:
                call.cancel()
    finally:
        thread.stop()
