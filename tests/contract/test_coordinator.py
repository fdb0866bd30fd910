"""Contract tests of CacheCoordinatorService: the real server in-process on a free port, real Redis.

Every test module run gets its own key namespace, so the session Redis can be shared.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from diffmesh.catalog import ManifestError
from diffmesh.server import ServerThread
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from diffmesh_coordinator.app import SERVICE_NAME, CatalogLoadError, CoordinatorApp
from diffmesh_coordinator.keys import KeyLayout
from diffmesh_coordinator.settings import CoordinatorSettings
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support.waiting import wait_for

Stub = coordinator_pb2_grpc.CacheCoordinatorServiceStub
SHA = "0123456789abcdef" * 4
BASE, LORA, CN = common_pb2.COMPONENT_KIND_BASE, common_pb2.COMPONENT_KIND_LORA, common_pb2.COMPONENT_KIND_CONTROLNET
SSD, HOST, GPU = common_pb2.TIER_SSD, common_pb2.TIER_HOST, common_pb2.TIER_GPU


def _settings(redis_url: str, **overrides: Any) -> CoordinatorSettings:
    values: dict[str, Any] = {"redis_url": redis_url, "namespace": f"t{uuid.uuid4().hex[:10]}:", "host": "127.0.0.1"}
    values.update(overrides)
    return CoordinatorSettings(**values)


@pytest.fixture(scope="module")
def server(redis_url: str) -> Iterator[ServerThread]:
    """The coordinator with a long lease (the lease tests start their own with a short one)."""
    thread = ServerThread(CoordinatorApp(_settings(redis_url, lease_seconds=60)))
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> Stub:
    return Stub(channel)


def _component(cid: str, kind: int = LORA, family: str = "sd15", **extra: Any) -> common_pb2.Component:
    fields: dict[str, Any] = {
        "uri": f"file:///models/{cid}.safetensors" if kind == LORA else f"file:///models/{cid}",
        "bytes": 1000,
        "sha256": SHA,
    }
    fields.update(extra)
    return common_pb2.Component(id=cid, kind=kind, family=family, **fields)  # type: ignore[arg-type]


def _register(stub: Stub, *components: common_pb2.Component) -> None:
    for c in components:
        stub.RegisterComponent(coordinator_pb2.RegisterComponentRequest(component=c), timeout=10)


def _fails(stub: Stub, call: Callable[..., Any], request: Any, code: grpc.StatusCode, *words: str) -> grpc.RpcError:
    """Asserts ``call(request)`` fails with ``code`` and a message holding ``words``; then that the service still serves."""
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10)
    assert err.value.code() == code, err.value.details()
    for word in words:
        assert word in err.value.details()
    stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=10)  # still serving
    return err.value


def _node(node_id: str, port: int = 50051) -> coordinator_pb2.RegisterNodeRequest:
    return coordinator_pb2.RegisterNodeRequest(
        node=coordinator_pb2.NodeInfo(
            node_id=node_id, instance_manager_address=f"127.0.0.1:{port}", host_capacity_bytes=1 << 30, ssd_capacity_bytes=1 << 34
        )
    )


def _worker(node_id: str, worker_id: str, port: int = 50061) -> coordinator_pb2.RegisterWorkerRequest:
    return coordinator_pb2.RegisterWorkerRequest(
        worker=coordinator_pb2.WorkerInfo(
            worker_id=worker_id, node_id=node_id, address=f"127.0.0.1:{port}", device="cpu", device_memory_bytes=1 << 32
        )
    )


def _update(
    cid: str, tier: int, present: bool = True, size: int = 1000, last_used: float = 1.7e9
) -> coordinator_pb2.ResidencyUpdate:
    return coordinator_pb2.ResidencyUpdate(component_id=cid, tier=tier, present=present, bytes=size, last_used_unix=last_used)  # type: ignore[arg-type]


def _report(node_id: str, worker_id: str, *updates: coordinator_pb2.ResidencyUpdate, full: bool = False) -> Any:
    return coordinator_pb2.ReportResidencyRequest(node_id=node_id, worker_id=worker_id, updates=updates, full_snapshot=full)


def _where(stub: Stub, *ids: str) -> dict[str, list[tuple[str, str, str, int]]]:
    resp = stub.Locate(coordinator_pb2.LocateRequest(component_ids=ids), timeout=10)
    assert [loc.component_id for loc in resp.locations] == list(ids)
    return {
        loc.component_id: [(r.node_id, r.worker_id, common_pb2.Tier.Name(r.tier), r.bytes) for r in loc.residencies]
        for loc in resp.locations
    }


# ------------------------------------------------------------------ health


def test_health_serving_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        )
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    assert SERVICE_NAME in {s.name for s in answers[0].list_services_response.service}


# ------------------------------------------------------------------ catalog


def test_register_is_idempotent_and_conflicts_are_refused(stub: Stub) -> None:
    first = stub.RegisterComponent(coordinator_pb2.RegisterComponentRequest(component=_component("cat-lora-a")), timeout=10)
    assert first.created
    assert first.component.format == common_pb2.ARTIFACT_FORMAT_SAFETENSORS  # inferred from the uri
    again = stub.RegisterComponent(coordinator_pb2.RegisterComponentRequest(component=_component("cat-lora-a")), timeout=10)
    assert not again.created
    assert again.component == first.component

    changed = _component("cat-lora-a", uri="file:///elsewhere/cat-lora-a.safetensors")
    _fails(
        stub,
        stub.RegisterComponent,
        coordinator_pb2.RegisterComponentRequest(component=changed),
        grpc.StatusCode.ALREADY_EXISTS,
        "'cat-lora-a'",
        "elsewhere",
    )
    got = stub.GetComponent(coordinator_pb2.GetComponentRequest(id="cat-lora-a"), timeout=10).component
    assert got == first.component  # the conflicting record did not overwrite


def test_get_unknown_component_names_it(stub: Stub) -> None:
    _fails(
        stub,
        stub.GetComponent,
        coordinator_pb2.GetComponentRequest(id="no-such-model"),
        grpc.StatusCode.NOT_FOUND,
        "'no-such-model'",
    )
    _fails(stub, stub.GetComponent, coordinator_pb2.GetComponentRequest(id=""), grpc.StatusCode.INVALID_ARGUMENT, "id")


@pytest.mark.parametrize(
    ("component", "field", "words"),
    [
        (None, "component", "required"),
        (_component(""), "component.id", "required"),
        (_component("bad/id"), "component.id", "[A-Za-z0-9._:-]"),
        (_component("k0", kind=common_pb2.COMPONENT_KIND_UNSPECIFIED), "component.kind", "required"),
        (_component("f0", family=""), "component.family", "required"),
        (_component("u0", uri=""), "component.uri", "required"),
        (_component("u1", uri="ftp://host/x.safetensors"), "component.uri", "scheme"),
        (_component("p0", uri="file:///models/sd15.ckpt"), "component.uri", "pickle"),
        (_component("p1", uri="https://hub.example/pytorch_model.bin"), "component.uri", "pickle"),
        (_component("p2", uri="weights/lora.pt"), "component.uri", "pickle"),
        (_component("s0", sha256="XYZ"), "component.sha256", "hex"),
        (_component("b0", bytes=-5), "component.bytes", ">= 0"),
    ],
)
def test_bad_records_are_invalid_argument_naming_the_field(
    stub: Stub, component: common_pb2.Component | None, field: str, words: str
) -> None:
    request = (
        coordinator_pb2.RegisterComponentRequest(component=component) if component else coordinator_pb2.RegisterComponentRequest()
    )
    err = _fails(stub, stub.RegisterComponent, request, grpc.StatusCode.INVALID_ARGUMENT, field, words)
    assert ("diffmesh-field", field) in tuple(err.trailing_metadata() or ())
    if component is not None and component.id and "/" not in component.id:
        _fails(
            stub, stub.GetComponent, coordinator_pb2.GetComponentRequest(id=component.id), grpc.StatusCode.NOT_FOUND, component.id
        )


def test_list_components_filters_and_pages(stub: Stub) -> None:
    ids = [f"page-{i:02d}" for i in range(7)]
    kinds = [BASE, LORA, LORA, CN, LORA, BASE, LORA]
    _register(stub, *(_component(cid, kind=k, family="pagefam") for cid, k in zip(ids, kinds, strict=True)))
    _register(stub, _component("page-other", kind=LORA, family="otherfam"))

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        resp = stub.ListComponents(
            coordinator_pb2.ListComponentsRequest(family="pagefam", page_size=3, page_token=token), timeout=10
        )
        seen += [c.id for c in resp.components]
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    assert seen == ids
    assert pages == 3

    loras = stub.ListComponents(coordinator_pb2.ListComponentsRequest(family="pagefam", kind=LORA), timeout=10)
    assert [c.id for c in loras.components] == [cid for cid, k in zip(ids, kinds, strict=True) if k == LORA]
    assert loras.next_page_token == ""
    every = stub.ListComponents(coordinator_pb2.ListComponentsRequest(page_size=1000), timeout=10)
    every_ids = [c.id for c in every.components]
    assert every_ids == sorted(every_ids)
    assert {"page-other", *ids} <= set(every_ids)

    bad = coordinator_pb2.ListComponentsRequest
    _fails(stub, stub.ListComponents, bad(page_size=1001), grpc.StatusCode.INVALID_ARGUMENT, "page_size")
    _fails(stub, stub.ListComponents, bad(page_size=-1), grpc.StatusCode.INVALID_ARGUMENT, "page_size")
    for token in ("%%%", "bm90LW91cnM="):  # garbage; valid base64 of something else
        _fails(stub, stub.ListComponents, bad(page_token=token), grpc.StatusCode.INVALID_ARGUMENT, "page_token")
    _fails(stub, stub.ListComponents, bad(kind=99), grpc.StatusCode.INVALID_ARGUMENT, "kind")  # type: ignore[arg-type]
    _fails(stub, stub.ListComponents, bad(family="no spaces"), grpc.StatusCode.INVALID_ARGUMENT, "family")


# ------------------------------------------------------------------ nodes, workers, leases


def test_nodes_workers_and_heartbeats(stub: Stub) -> None:
    assert stub.RegisterNode(_node("nw-node"), timeout=10).lease_seconds == 60
    assert stub.RegisterWorker(_worker("nw-node", "w2", 50062), timeout=10).lease_seconds == 60
    stub.RegisterWorker(_worker("nw-node", "w1", 50061), timeout=10)
    stub.RegisterWorker(_worker("nw-node", "w1", 50061), timeout=10)  # re-registering is fine
    stub.RegisterWorker(_worker("nw-orphan-node", "w9"), timeout=10)  # its node is not live: not listed

    nodes = {n.node_id: n for n in stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=10).nodes}
    assert "nw-orphan-node" not in nodes
    node = nodes["nw-node"]
    assert node.instance_manager_address == "127.0.0.1:50051"
    assert node.host_capacity_bytes == 1 << 30
    assert [(w.worker_id, w.address, w.node_id, w.device) for w in node.workers] == [
        ("w1", "127.0.0.1:50061", "nw-node", "cpu"),
        ("w2", "127.0.0.1:50062", "nw-node", "cpu"),
    ]

    beat = stub.Heartbeat(coordinator_pb2.HeartbeatRequest(node_id="nw-node"), timeout=10)
    assert not beat.reregister and beat.lease_seconds == 60
    assert not stub.Heartbeat(coordinator_pb2.HeartbeatRequest(node_id="nw-node", worker_id="w1"), timeout=10).reregister
    assert stub.Heartbeat(coordinator_pb2.HeartbeatRequest(node_id="never-seen"), timeout=10).reregister
    assert stub.Heartbeat(coordinator_pb2.HeartbeatRequest(node_id="nw-node", worker_id="w-unknown"), timeout=10).reregister

    bad_node = _node("x")
    bad_node.node.instance_manager_address = "no-port"
    _fails(stub, stub.RegisterNode, bad_node, grpc.StatusCode.INVALID_ARGUMENT, "node.instance_manager_address")
    _fails(stub, stub.RegisterNode, _node(""), grpc.StatusCode.INVALID_ARGUMENT, "node.node_id")
    _fails(stub, stub.RegisterNode, _node("a/b"), grpc.StatusCode.INVALID_ARGUMENT, "node.node_id")
    bad_worker = _worker("nw-node", "w3")
    bad_worker.worker.address = ""
    _fails(stub, stub.RegisterWorker, bad_worker, grpc.StatusCode.INVALID_ARGUMENT, "worker.address")
    _fails(stub, stub.RegisterWorker, _worker("", "w3"), grpc.StatusCode.INVALID_ARGUMENT, "worker.node_id")
    _fails(stub, stub.RegisterWorker, _worker("nw-node", ""), grpc.StatusCode.INVALID_ARGUMENT, "worker.worker_id")
    _fails(stub, stub.Heartbeat, coordinator_pb2.HeartbeatRequest(), grpc.StatusCode.INVALID_ARGUMENT, "node_id")


# ------------------------------------------------------------------ residency


def test_report_residency_and_locate(stub: Stub) -> None:
    _register(stub, _component("res-base", kind=BASE), _component("res-lora"), _component("res-cold", kind=CN))
    stub.RegisterNode(_node("res-n1"), timeout=10)
    stub.RegisterNode(_node("res-n2", 50052), timeout=10)
    stub.RegisterWorker(_worker("res-n1", "w1"), timeout=10)

    applied = stub.ReportResidency(
        _report("res-n1", "", _update("res-base", SSD), _update("res-base", HOST, size=900), _update("res-lora", HOST, size=10)),
        timeout=10,
    ).applied
    assert applied == 3
    stub.ReportResidency(_report("res-n2", "", _update("res-base", SSD)), timeout=10)
    stub.ReportResidency(_report("res-n1", "w1", _update("res-base", GPU, size=800)), timeout=10)

    where = _where(stub, "res-lora", "res-base", "res-cold")
    assert where["res-base"] == [
        ("res-n1", "w1", "TIER_GPU", 800),
        ("res-n1", "", "TIER_HOST", 900),
        ("res-n1", "", "TIER_SSD", 1000),
        ("res-n2", "", "TIER_SSD", 1000),
    ]
    assert where["res-lora"] == [("res-n1", "", "TIER_HOST", 10)]
    assert where["res-cold"] == []
    located = stub.Locate(coordinator_pb2.LocateRequest(component_ids=["res-lora"]), timeout=10).locations[0].residencies[0]
    assert located.last_used_unix == 1.7e9

    # an incremental removal
    stub.ReportResidency(_report("res-n1", "", _update("res-base", HOST, present=False)), timeout=10)
    assert ("res-n1", "", "TIER_HOST", 900) not in _where(stub, "res-base")["res-base"]

    # a full snapshot replaces everything that reporter held, and only that
    stub.ReportResidency(_report("res-n1", "", _update("res-cold", HOST, size=5), full=True), timeout=10)
    where = _where(stub, "res-base", "res-lora", "res-cold")
    assert where["res-base"] == [("res-n1", "w1", "TIER_GPU", 800), ("res-n2", "", "TIER_SSD", 1000)]
    assert where["res-lora"] == []
    assert where["res-cold"] == [("res-n1", "", "TIER_HOST", 5)]
    stub.ReportResidency(_report("res-n1", "w1", full=True), timeout=10)  # an empty snapshot clears the worker
    assert _where(stub, "res-base")["res-base"] == [("res-n2", "", "TIER_SSD", 1000)]


def test_residency_and_locate_errors(stub: Stub) -> None:
    _register(stub, _component("err-lora"))
    stub.RegisterNode(_node("err-n1"), timeout=10)
    report, locate = stub.ReportResidency, stub.Locate
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND

    _fails(stub, report, _report("ghost-node", "", _update("err-lora", HOST)), not_found, "node", "'ghost-node'")
    _fails(stub, report, _report("err-n1", "ghost-worker", _update("err-lora", GPU)), not_found, "worker", "ghost-worker")
    _fails(stub, report, _report("", "", _update("err-lora", HOST)), invalid, "node_id")
    _fails(stub, report, _report("err-n1", "", _update("err-lora", GPU)), invalid, "updates[0].tier")
    _fails(stub, report, _report("err-n1", "", _update("err-lora", common_pb2.TIER_UNSPECIFIED)), invalid, "updates[0].tier")
    _fails(
        stub,
        report,
        _report("err-n1", "", _update("err-lora", HOST), _update("bad id", HOST)),
        invalid,
        "updates[1].component_id",
    )
    _fails(stub, report, _report("err-n1", "", _update("err-lora", HOST, size=-1)), invalid, "updates[0].bytes")
    _fails(
        stub,
        report,
        _report("err-n1", "", _update("err-lora", HOST, last_used=float("nan"))),
        invalid,
        "updates[0].last_used_unix",
    )
    assert _where(stub, "err-lora")["err-lora"] == []  # nothing of the refused reports landed

    _fails(stub, locate, coordinator_pb2.LocateRequest(), invalid, "component_ids")
    _fails(stub, locate, coordinator_pb2.LocateRequest(component_ids=["err-lora"] * 65), invalid, "component_ids", "64")
    _fails(stub, locate, coordinator_pb2.LocateRequest(component_ids=["err-lora", "nope-model"]), not_found, "'nope-model'")
    _fails(stub, locate, coordinator_pb2.LocateRequest(component_ids=["err-lora", ""]), invalid, "component_ids[1]")
    assert len(stub.Locate(coordinator_pb2.LocateRequest(component_ids=["err-lora"] * 64), timeout=10).locations) == 64


def test_lease_expiry_hides_and_purges_residency(redis_url: str) -> None:
    app = CoordinatorApp(_settings(redis_url, lease_seconds=1.0, sweep_seconds=3600))
    thread = ServerThread(app)
    keys = KeyLayout(app.settings.namespace)
    db = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with grpc.insecure_channel(thread.address) as ch:
            stub = Stub(ch)
            _register(stub, _component("exp-base", kind=BASE))
            stub.RegisterNode(_node("exp-n1"), timeout=10)
            stub.RegisterNode(_node("exp-n2", 50052), timeout=10)
            stub.RegisterWorker(_worker("exp-n1", "w1"), timeout=10)
            stub.ReportResidency(_report("exp-n1", "", _update("exp-base", HOST)), timeout=10)
            stub.ReportResidency(_report("exp-n1", "w1", _update("exp-base", GPU)), timeout=10)
            stub.ReportResidency(_report("exp-n2", "", _update("exp-base", SSD)), timeout=10)
            assert len(_where(stub, "exp-base")["exp-base"]) == 3

            # exp-n1 keeps heartbeating; its worker and exp-n2 do not: their copies disappear.
            def worker_and_n2_gone() -> bool:
                assert not stub.Heartbeat(coordinator_pb2.HeartbeatRequest(node_id="exp-n1"), timeout=10).reregister
                return _where(stub, "exp-base")["exp-base"] == [("exp-n1", "", "TIER_HOST", 1000)]

            wait_for(worker_and_n2_gone, "the worker's and exp-n2's leases to lapse")
            nodes = stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=10).nodes
            assert [(n.node_id, list(n.workers)) for n in nodes] == [("exp-n1", [])]
            assert stub.Heartbeat(coordinator_pb2.HeartbeatRequest(node_id="exp-n2"), timeout=10).reregister
            assert stub.Heartbeat(coordinator_pb2.HeartbeatRequest(node_id="exp-n1", worker_id="w1"), timeout=10).reregister
            _fails(
                stub, stub.ReportResidency, _report("exp-n2", "", _update("exp-base", SSD)), grpc.StatusCode.NOT_FOUND, "exp-n2"
            )

            # now exp-n1 lapses too
            wait_for(lambda: _where(stub, "exp-base")["exp-base"] == [], "exp-n1's lease to lapse")
            assert list(stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=10).nodes) == []

            # the sweeper purges lapsed state from Redis (residency hashes and indexes)
            assert db.hlen(keys.location("exp-base")) == 3
            purged: Any = thread.call(app.store.sweep())
            assert purged > 0
            assert not db.exists(keys.location("exp-base"), keys.residency("exp-n1/"), keys.residency("exp-n1/w1"))
            assert db.smembers(keys.nodes) == set()
            assert db.smembers(keys.reporters) == set()

            # a lapsed node that registers again starts empty and re-reports
            stub.RegisterNode(_node("exp-n2", 50052), timeout=10)
            assert _where(stub, "exp-base")["exp-base"] == []
            stub.ReportResidency(_report("exp-n2", "", _update("exp-base", SSD), full=True), timeout=10)
            assert _where(stub, "exp-base")["exp-base"] == [("exp-n2", "", "TIER_SSD", 1000)]
    finally:
        thread.stop()
        db.close()


def test_reregistering_a_lapsed_node_drops_its_stale_residency(redis_url: str) -> None:
    app = CoordinatorApp(_settings(redis_url, lease_seconds=1.0, sweep_seconds=3600))
    thread = ServerThread(app)
    try:
        with grpc.insecure_channel(thread.address) as ch:
            stub = Stub(ch)
            _register(stub, _component("rr-base", kind=BASE), _component("rr-lora"))
            stub.RegisterNode(_node("rr-n1"), timeout=10)
            stub.ReportResidency(_report("rr-n1", "", _update("rr-base", HOST)), timeout=10)
            wait_for(
                lambda: not stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=10).nodes, "rr-n1's lease to lapse"
            )
            stub.RegisterNode(_node("rr-n1"), timeout=10)  # no sweep ran: registration itself drops the old state
            stub.ReportResidency(_report("rr-n1", "", _update("rr-lora", HOST)), timeout=10)  # incremental
            assert _where(stub, "rr-base", "rr-lora") == {"rr-base": [], "rr-lora": [("rr-n1", "", "TIER_HOST", 1000)]}
    finally:
        thread.stop()


# ------------------------------------------------------------------ request records


def test_record_requests_appends_to_the_stream_and_counts(stub: Stub, server: ServerThread, redis_url: str) -> None:
    keys = KeyLayout(server.service.settings.namespace)  # type: ignore[attr-defined]
    records = [
        coordinator_pb2.RequestRecord(
            request_id=f"r{i}",
            pipeline_key=key,
            component_ids=ids,
            tenant="t1",
            arrival_unix=1.7e9 + i,
            task=common_pb2.TASK_TXT2IMG,
            num_images=1,
        )
        for i, (key, ids) in enumerate(
            [
                ("rq-base||", ["rq-base"]),
                ("rq-base|rq-lora@1.00|", ["rq-base", "rq-lora"]),
                ("rq-base|rq-lora@1.00|", ["rq-base", "rq-lora"]),
            ]
        )
    ]
    assert stub.RecordRequests(coordinator_pb2.RecordRequestsRequest(records=records), timeout=10).recorded == 3
    assert stub.RecordRequests(coordinator_pb2.RecordRequestsRequest(), timeout=10).recorded == 0

    db = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        entries: Any = db.xrange(keys.requests)
        assert [fields["request_id"] for _, fields in entries] == ["r0", "r1", "r2"]
        assert entries[1][1]["component_ids"] == "rq-base,rq-lora"
        assert entries[1][1]["task"] == "TASK_TXT2IMG"
        assert db.zscore(keys.pipeline_popularity, "rq-base|rq-lora@1.00|") == 2
        assert db.zscore(keys.component_popularity, "rq-base") == 3
        assert db.zscore(keys.component_popularity, "rq-lora") == 2
    finally:
        db.close()

    def bad(**fields: Any) -> coordinator_pb2.RecordRequestsRequest:
        values: dict[str, Any] = {"request_id": "x", "pipeline_key": "rq-base||", "component_ids": ["rq-base"]}
        values.update(fields)
        return coordinator_pb2.RecordRequestsRequest(records=[records[0], coordinator_pb2.RequestRecord(**values)])

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    _fails(stub, stub.RecordRequests, bad(pipeline_key=""), invalid, "records[1].pipeline_key")
    _fails(stub, stub.RecordRequests, bad(component_ids=["ok", "not ok"]), invalid, "records[1].component_ids[1]")
    _fails(stub, stub.RecordRequests, bad(num_images=9), invalid, "records[1].num_images")
    _fails(stub, stub.RecordRequests, bad(arrival_unix=-1.0), invalid, "records[1].arrival_unix")
    too_many = coordinator_pb2.RecordRequestsRequest(records=[records[0]] * 10_001)
    _fails(stub, stub.RecordRequests, too_many, invalid, "records", "10000")
    db = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert db.xlen(keys.requests) == 3  # refused batches left no trace
    finally:
        db.close()


def test_component_popularity_ranks_recorded_requests(redis_url: str) -> None:
    # Counts decay with time: a frozen clock keeps them exact (decay itself: test_coordinator_policy.py).
    thread = ServerThread(CoordinatorApp(_settings(redis_url), clock=lambda: 1.7e9))
    channel = grpc.insecure_channel(thread.address)
    try:
        stub = coordinator_pb2_grpc.CacheCoordinatorServiceStub(channel)
        empty = stub.GetComponentPopularity(coordinator_pb2.GetComponentPopularityRequest(), timeout=10)
        assert list(empty.components) == []
        uses = [["pop-base"], ["pop-base", "pop-a"], ["pop-base", "pop-b"], ["pop-base", "pop-a"], ["pop-c"], ["pop-c"]]
        records = [
            coordinator_pb2.RequestRecord(request_id=f"p{i}", pipeline_key="|".join(ids) + "||", component_ids=ids)
            for i, ids in enumerate(uses)
        ]
        stub.RecordRequests(coordinator_pb2.RecordRequestsRequest(records=records), timeout=10)
        resp = stub.GetComponentPopularity(coordinator_pb2.GetComponentPopularityRequest(), timeout=10)
        ranked = [(c.component_id, c.requests) for c in resp.components]
        assert ranked == [("pop-base", 4.0), ("pop-a", 2.0), ("pop-c", 2.0), ("pop-b", 1.0)]  # ties by id
        top = stub.GetComponentPopularity(coordinator_pb2.GetComponentPopularityRequest(limit=1), timeout=10)
        assert [c.component_id for c in top.components] == ["pop-base"]
        for limit in (-1, 100_001):
            _fails(
                stub,
                stub.GetComponentPopularity,
                coordinator_pb2.GetComponentPopularityRequest(limit=limit),
                grpc.StatusCode.INVALID_ARGUMENT,
                "limit",
            )
    finally:
        channel.close()
        thread.stop()


# ------------------------------------------------------------------ catalog manifest at start


def _write_manifest(folder: Path, entries: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "catalog.json"
    path.write_text(json.dumps({"components": entries}))
    return path


MANIFEST: list[dict[str, Any]] = [
    {"id": "mf-base", "kind": "BASE", "family": "sd15", "uri": "bases/mf-base", "bytes": 10, "sha256": SHA},
    {"id": "mf-lora", "kind": "LORA", "family": "sd15", "uri": "loras/mf-lora.safetensors", "bytes": 5},
    {"id": "mf-cn", "kind": "CONTROLNET", "family": "sd15", "uri": "https://models.example/mf-cn", "labels": {"name": "canny"}},
]


def test_catalog_manifest_is_registered_at_start_idempotently(redis_url: str, tmp_path: Path) -> None:
    path = _write_manifest(tmp_path / "models", MANIFEST)
    settings = _settings(redis_url, catalog=str(path))
    for _ in range(2):  # a restart on the same Redis registers the same records again, quietly
        thread = ServerThread(CoordinatorApp(settings))
        try:
            with grpc.insecure_channel(thread.address) as ch:
                listed = Stub(ch).ListComponents(coordinator_pb2.ListComponentsRequest(), timeout=10).components
                by_id = {c.id: c for c in listed}
                assert sorted(by_id) == ["mf-base", "mf-cn", "mf-lora"]
                assert by_id["mf-base"].uri == (tmp_path / "models" / "bases" / "mf-base").resolve().as_uri()
                assert by_id["mf-base"].format == common_pb2.ARTIFACT_FORMAT_DIFFUSERS_FOLDER
                assert by_id["mf-lora"].format == common_pb2.ARTIFACT_FORMAT_SAFETENSORS
                assert by_id["mf-cn"].labels["name"] == "canny"
        finally:
            thread.stop()

    # the same ids with different records: refuse to start, unless told the manifest wins
    changed = [dict(MANIFEST[0], sha256="f" * 64), *MANIFEST[1:]]
    moved = _write_manifest(tmp_path / "models2", changed)
    with pytest.raises(CatalogLoadError, match="'mf-base' already exists"):
        ServerThread(CoordinatorApp(settings.model_copy(update={"catalog": str(moved)})))
    thread = ServerThread(CoordinatorApp(settings.model_copy(update={"catalog": str(moved), "catalog_replace": True})))
    try:
        with grpc.insecure_channel(thread.address) as ch:
            got = Stub(ch).GetComponent(coordinator_pb2.GetComponentRequest(id="mf-base"), timeout=10).component
            assert got.sha256 == "f" * 64
    finally:
        thread.stop()


@pytest.mark.parametrize(
    ("entries", "words"),
    [
        ([{"id": "bad-pickle", "kind": "BASE", "family": "sd15", "uri": "v1-5-pruned.ckpt"}], "components[0].uri"),
        ([{"id": "no-kind", "family": "sd15", "uri": "x.safetensors"}], "components[0].kind"),
    ],
)
def test_broken_manifest_fails_start_clearly(redis_url: str, tmp_path: Path, entries: list[dict[str, Any]], words: str) -> None:
    path = _write_manifest(tmp_path, entries)
    with pytest.raises(ManifestError) as err:
        ServerThread(CoordinatorApp(_settings(redis_url, catalog=str(path))))
    assert str(path) in str(err.value) and words in str(err.value)


def test_unreachable_redis_fails_start_clearly() -> None:
    from diffmesh.redis_server import free_port

    url = f"redis://user:secret@127.0.0.1:{free_port()}/0"
    with pytest.raises(RuntimeError, match="cannot reach Redis") as err:
        ServerThread(CoordinatorApp(_settings(url)))
    assert "secret" not in str(err.value)


# ------------------------------------------------------------------ torch-free


TORCH_FREE_MAIN = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import diffmesh_coordinator.app
from diffmesh_coordinator.__main__ import main
main()
assert sys.modules["torch"] is None
"""


def test_imports_and_serves_without_torch_as_a_process(redis_url: str, tmp_path: Path) -> None:
    """The real entry point, torch blocked: loads a manifest, serves, logs JSON, drains on SIGTERM."""
    manifest = _write_manifest(tmp_path / "models", MANIFEST)
    port_file = tmp_path / "port"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "DIFFMESH_COORDINATOR_REDIS_URL": redis_url,
        "DIFFMESH_COORDINATOR_NAMESPACE": f"tf{uuid.uuid4().hex[:8]}:",
        "DIFFMESH_COORDINATOR_CATALOG": str(manifest),
        "DIFFMESH_COORDINATOR_HOST": "127.0.0.1",
        "DIFFMESH_COORDINATOR_PORT_FILE": str(port_file),
        "DIFFMESH_COORDINATOR_GRACE_SECONDS": "1",
        "DIFFMESH_COORDINATOR_LOG_LEVEL": "DEBUG",
    }
    proc = subprocess.Popen([sys.executable, "-c", TORCH_FREE_MAIN], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (port_file.exists() and port_file.read_text() != "") or proc.poll() is not None, "the port file")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        with grpc.insecure_channel(f"127.0.0.1:{port_file.read_text()}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status
                == health_pb2.HealthCheckResponse.SERVING
            )
            stub = Stub(ch)
            listed = stub.ListComponents(coordinator_pb2.ListComponentsRequest(), timeout=10).components
            assert sorted(c.id for c in listed) == ["mf-base", "mf-cn", "mf-lora"]
            stub.RegisterNode(_node("tf-node"), timeout=10)
            _fails(stub, stub.GetComponent, coordinator_pb2.GetComponentRequest(id="tf-missing"), grpc.StatusCode.NOT_FOUND)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    messages = [json.loads(line)["msg"] for line in err.splitlines() if line.startswith("{")]
    assert "catalog manifest registered" in messages
    assert "draining" in messages and "stopped" in messages
