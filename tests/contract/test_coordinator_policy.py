"""Contract tests of the coordinator's policy plane: decayed popularity, the plan loop, its lock,
the LRU mode and the library's PlanFollower — real servers, real Redis, time moved through
the coordinator's injected clock where decay matters."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import redis
from diffmesh.pipeline_key import canonical_key, fused_id
from diffmesh.plan_follower import PlanFollower
from diffmesh.policy.prefetch import time_bucket
from diffmesh.server import ServerThread
from diffmesh.v1 import coordinator_pb2, coordinator_pb2_grpc, plan_pb2
from diffmesh_coordinator.app import CoordinatorApp
from diffmesh_coordinator.keys import KeyLayout
from diffmesh_coordinator.view_events import KIND_FIELD, entry_event

from tests.contract.test_coordinator import (
    BASE,
    CN,
    HOST,
    SSD,
    _component,
    _node,
    _register,
    _report,
    _settings,
    _update,
    _worker,
)
from tests.support.waiting import wait_for

Stub = coordinator_pb2_grpc.CacheCoordinatorServiceStub

HOT_KEY = canonical_key("pl-base", [("pl-lora", 1.0)])
WARM_KEY = canonical_key("pl-warm")


def _record(stub: Stub, key: str, ids: list[str], n: int = 1) -> None:
    records = [coordinator_pb2.RequestRecord(request_id=f"{key}-{i}", pipeline_key=key, component_ids=ids) for i in range(n)]
    stub.RecordRequests(coordinator_pb2.RecordRequestsRequest(records=records), timeout=10)


def _plan(stub: Stub) -> plan_pb2.Plan:
    return stub.GetPlan(coordinator_pb2.GetPlanRequest(), timeout=10).plan


def _popularity(stub: Stub) -> dict[str, float]:
    resp = stub.GetComponentPopularity(coordinator_pb2.GetComponentPopularityRequest(), timeout=10)
    return {c.component_id: c.requests for c in resp.components}


def _passes_later(app: CoordinatorApp, n: int = 3) -> None:
    """Waits until the plan loop made ``n`` more passes."""
    start = app.plan_loop.passes
    wait_for(lambda: app.plan_loop.passes >= start + n, f"{n} more planning passes")


class Clock:
    """A wall clock the test moves."""

    def __init__(self, now: float = 1.8e9) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def serve(redis_url: str) -> Iterator[Callable[..., tuple[CoordinatorApp, ServerThread, Stub]]]:
    """Starts coordinators (stopped at the end); ``serve(clock=None, **settings)``."""
    started: list[tuple[ServerThread, grpc.Channel]] = []

    def start(clock: Callable[[], float] | None = None, **overrides: Any) -> tuple[CoordinatorApp, ServerThread, Stub]:
        values: dict[str, Any] = {"lease_seconds": 60, "plan_seconds": 0.2}
        values.update(overrides)
        app = CoordinatorApp(_settings(redis_url, **values), clock=clock or time.time)
        thread = ServerThread(app)
        channel = grpc.insecure_channel(thread.address)
        started.append((thread, channel))
        return app, thread, Stub(channel)

    yield start
    for thread, channel in started:
        channel.close()
        thread.stop()


# ------------------------------------------------------------------ decay


def test_popularity_decays_with_its_half_life(serve: Callable[..., Any]) -> None:
    clock = Clock()
    _, _, stub = serve(clock, half_life_seconds=100, plan_seconds=3600)
    _record(stub, canonical_key("dc-old"), ["dc-old"], 4)
    clock.now += 100  # one half-life
    _record(stub, canonical_key("dc-new"), ["dc-new"], 4)
    assert _popularity(stub) == pytest.approx({"dc-new": 4.0, "dc-old": 2.0})
    clock.now += 200
    assert _popularity(stub) == pytest.approx({"dc-new": 1.0, "dc-old": 0.5})
    assert list(_popularity(stub)) == ["dc-new", "dc-old"]


def test_popularity_rebases_before_its_scores_overflow(serve: Callable[..., Any], redis_url: str) -> None:
    clock = Clock()
    app, _, stub = serve(clock, half_life_seconds=100, plan_seconds=3600)
    keys = KeyLayout(app.settings.namespace)
    db = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        _record(stub, canonical_key("rb-a"), ["rb-a"], 2)
        assert float(db.get(keys.popularity_ref)) == clock.now  # type: ignore[arg-type]
        # ln(2) x 50,000 s / 100 s ≈ 347 > the rebase exponent (300): the next write rescales everything
        clock.now += 50_000
        _record(stub, canonical_key("rb-b"), ["rb-b"], 3)
        assert float(db.get(keys.popularity_ref)) == clock.now  # type: ignore[arg-type]
        assert db.zscore(keys.component_popularity, "rb-b") == pytest.approx(3.0)
        counts = _popularity(stub)
        assert counts["rb-b"] == pytest.approx(3.0)
        assert counts["rb-a"] == pytest.approx(2.0 * 2.0 ** (-500), rel=1e-6)
        clock.now += 100
        assert _popularity(stub)["rb-b"] == pytest.approx(1.5)
    finally:
        db.close()


# ------------------------------------------------------------------ the plan loop


def test_plan_loop_bands_replicates_fuses_pins_prefetches_and_admits(serve: Callable[..., Any]) -> None:
    app, _, stub = serve()
    _register(
        stub,
        _component("pl-base", kind=BASE),
        _component("pl-lora"),
        _component("pl-warm", kind=BASE),
        _component("pl-cold-a", kind=BASE),
        _component("pl-cold-b", kind=BASE),
    )
    stub.RegisterNode(_node("pl-n1"), timeout=10)
    stub.RegisterNode(_node("pl-n2", 50052), timeout=10)
    for node_id, worker_id, port in (("pl-n1", "w1", 50061), ("pl-n1", "w2", 50062), ("pl-n2", "w1", 50063)):
        stub.RegisterWorker(_worker(node_id, worker_id, port), timeout=10)
    _record(stub, HOT_KEY, ["pl-base", "pl-lora"], 40)
    _record(stub, WARM_KEY, ["pl-warm"], 10)
    _record(stub, canonical_key("pl-cold-a"), ["pl-cold-a"])
    _record(stub, canonical_key("pl-cold-b"), ["pl-cold-b"])

    plan = wait_for(lambda: (p := _plan(stub)).hot and p, "the popular pipeline to become HOT")
    assert plan.mode == plan_pb2.POLICY_MODE_DIFFMESH
    assert [h.pipeline_key for h in plan.hot] == [HOT_KEY]
    hot = plan.hot[0]
    expected_fused = fused_id("pl-base", [("pl-lora", 1.0)])
    assert hot.fused_id == expected_fused
    assert hot.pipeline.base_id == "pl-base"
    assert [(lo.id, lo.scale) for lo in hot.pipeline.loras] == [("pl-lora", 1.0)]
    assert hot.share == pytest.approx(40 / 52, rel=1e-3)
    replicas = {(r.node_id, r.worker_id) for r in hot.replicas}
    assert len(replicas) == 2  # round(40/52 x 3 workers)
    assert replicas <= {("pl-n1", "w1"), ("pl-n1", "w2"), ("pl-n2", "w1")}

    bands = {p.pipeline_key: p.band for p in plan.pipelines}
    assert bands == {HOT_KEY: plan_pb2.BAND_HOT, WARM_KEY: plan_pb2.BAND_WARM}  # the rest is COLD
    rates = {p.pipeline_key: p.rate_per_s for p in plan.pipelines}
    assert rates[HOT_KEY] > rates[WARM_KEY] > 0
    assert list(next(p for p in plan.pipelines if p.pipeline_key == HOT_KEY).component_ids) == ["pl-base", "pl-lora"]

    nodes = {n.node_id: n for n in plan.nodes}
    assert set(nodes) == {"pl-n1", "pl-n2"}
    for node_id, directive in nodes.items():
        if node_id in {n for n, _ in replicas}:
            assert set(directive.pinned_ids) == {"pl-base", "pl-lora", expected_fused}
            assert list(directive.fuse_pipeline_keys) == [HOT_KEY]
        else:
            assert not directive.pinned_ids and not directive.fuse_pipeline_keys
    prefetching = [n for n in plan.nodes if n.prefetch_ids]
    assert [list(n.prefetch_ids) for n in prefetching] == [["pl-warm"]]

    assert list(plan.admission.admitted_ids) == sorted(["pl-base", "pl-lora", "pl-warm", expected_fused])
    assert plan.admission.cold_min_uses == 2
    assert list(plan.scaling.preferred_nodes) and not plan.scaling.scale_out

    # the version moves only when a decision does: more passes, more requests of the same mix
    _record(stub, HOT_KEY, ["pl-base", "pl-lora"], 4)
    _passes_later(app)
    assert _plan(stub).version == plan.version

    # a WARM prefetch hit: the copy shows up in HOST, then a later report shows a newer last use
    home = prefetching[0].node_id
    stub.ReportResidency(_report(home, "", _update("pl-warm", HOST, last_used=100.0)), timeout=10)
    stub.ReportResidency(_report(home, "", _update("pl-warm", HOST, present=False, last_used=250.0)), timeout=10)
    wait_for(lambda: app.plan_loop.rewards.hits == 1, "the prefetch hit to be rewarded")
    bucket = app.plan_loop.rewards.bucket
    assert app.plan_loop.rewards.bandit.posterior(bucket, WARM_KEY) == (2.0, 1.0)


def _prefetched(plan: plan_pb2.Plan) -> set[str]:
    return {cid for n in plan.nodes for cid in n.prefetch_ids}


def test_warm_pipelines_that_appear_later_are_prefetched_within_the_same_bucket(serve: Callable[..., Any]) -> None:
    clock = Clock()  # never moves: every plan below falls in one time-of-day bucket
    app, _, stub = serve(clock, hot_fraction=0.05, warm_fraction=0.95)
    _register(stub, *(_component(cid, kind=BASE) for cid in ("lw-hot", "lw-warm-a", "lw-warm-b")))
    stub.RegisterNode(_node("lw-n1"), timeout=10)
    stub.RegisterNode(_node("lw-n2", 50052), timeout=10)
    stub.RegisterWorker(_worker("lw-n1", "w1", 50061), timeout=10)
    stub.RegisterWorker(_worker("lw-n2", "w1", 50062), timeout=10)

    # cold start: the bucket's first plans have a HOT pipeline and nothing WARM to prefetch
    _record(stub, canonical_key("lw-hot"), ["lw-hot"], 40)
    plan = wait_for(lambda: (p := _plan(stub)).hot and p, "the first pipeline to become HOT")
    assert not _prefetched(plan)
    _passes_later(app)

    # a WARM pipeline appears: prefetched at once, not at the next bucket
    _record(stub, canonical_key("lw-warm-a"), ["lw-warm-a"], 10)
    plan = wait_for(lambda: "lw-warm-a" in _prefetched(p := _plan(stub)) and p, "the first WARM pipeline's prefetch")
    bucket = app.plan_loop.rewards.bucket
    assert bucket == time_bucket(clock.now, app.settings.prefetch_bucket_seconds)

    # the WARM set grows: the new one fills a free slot, the earlier pick stays
    _record(stub, canonical_key("lw-warm-b"), ["lw-warm-b"], 5)
    plan = wait_for(lambda: "lw-warm-b" in _prefetched(p := _plan(stub)) and p, "the second WARM pipeline's prefetch")
    assert _prefetched(plan) == {"lw-warm-a", "lw-warm-b"}
    assert app.plan_loop.rewards.bucket == bucket

    # nothing changes: the picks, and so the plan's version, stay
    _passes_later(app)
    assert _plan(stub).version == plan.version


def test_a_warm_pipeline_with_loras_is_fused_on_the_node_holding_its_base(serve: Callable[..., Any]) -> None:
    app, _, stub = serve()
    _register(
        stub,
        _component("fw-hot", kind=BASE),
        _component("fw-base", kind=BASE),
        _component("fw-lora"),
        _component("fw-cn", kind=CN),
        _component("fw-cold-a", kind=BASE),
        _component("fw-cold-b", kind=BASE),
    )
    stub.RegisterNode(_node("fw-n1"), timeout=10)
    stub.RegisterNode(_node("fw-n2", 50052), timeout=10)
    stub.RegisterWorker(_worker("fw-n1", "w1", 50061), timeout=10)
    stub.RegisterWorker(_worker("fw-n2", "w1", 50062), timeout=10)
    stub.ReportResidency(_report("fw-n2", "", _update("fw-base", SSD)), timeout=10)
    warm_key = canonical_key("fw-base", [("fw-lora", 0.5)], ["fw-cn"])
    _record(stub, canonical_key("fw-hot"), ["fw-hot"], 40)  # HOT, but no LoRAs: nothing to fuse
    _record(stub, warm_key, ["fw-base", "fw-lora", "fw-cn"], 10)
    _record(stub, canonical_key("fw-cold-a"), ["fw-cold-a"])
    _record(stub, canonical_key("fw-cold-b"), ["fw-cold-b"])

    def fused_and_banded() -> plan_pb2.Plan | None:
        p = _plan(stub)
        return p if p.fusions and len(p.pipelines) == 2 else None  # every record ranked: one HOT, one WARM

    plan = wait_for(fused_and_banded, "the WARM pipeline to become a fusion target")
    assert {p.pipeline_key: p.band for p in plan.pipelines} == {
        canonical_key("fw-hot"): plan_pb2.BAND_HOT,
        warm_key: plan_pb2.BAND_WARM,
    }
    assert [h.fused_id for h in plan.hot] == [""]
    (target,) = plan.fusions
    overlay = fused_id("fw-base", [("fw-lora", 0.5)])
    assert (target.pipeline_key, target.fused_id, list(target.node_ids)) == (warm_key, overlay, ["fw-n2"])
    assert target.pipeline.base_id == "fw-base" and not target.pipeline.controlnets  # ControlNets are not fused
    assert [(lo.id, lo.scale) for lo in target.pipeline.loras] == [("fw-lora", 0.5)]
    assert {n.node_id: list(n.fuse_pipeline_keys) for n in plan.nodes} == {"fw-n1": [], "fw-n2": [warm_key]}
    assert overlay in plan.admission.admitted_ids

    # the base reaches fw-n1 too: the target stays where it is and the version does not move
    stub.ReportResidency(_report("fw-n1", "", _update("fw-base", HOST)), timeout=10)
    _passes_later(app)
    assert _plan(stub).version == plan.version


def test_plan_loop_skips_pipelines_outside_the_catalog(serve: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    app, _, stub = serve()
    _register(stub, _component("sk-base", kind=BASE))
    stub.RegisterNode(_node("sk-n1"), timeout=10)
    stub.RegisterWorker(_worker("sk-n1", "w1"), timeout=10)
    with caplog.at_level(logging.WARNING, logger="diffmesh_coordinator.plan_loop"):
        _record(stub, canonical_key("sk-gone"), ["sk-gone"], 20)
        _record(stub, canonical_key("sk-base"), ["sk-base"], 5)
        plan = wait_for(lambda: (p := _plan(stub)).hot and p, "the catalogued pipeline to become HOT")
        assert [h.pipeline_key for h in plan.hot] == [canonical_key("sk-base")]
        assert canonical_key("sk-gone") not in {p.pipeline_key for p in plan.pipelines}
        wait_for(lambda: any("sk-gone" in str(r.__dict__.get("pipeline_key")) for r in caplog.records), "the skip log line")
    _passes_later(app)  # still planning


def test_one_coordinator_plans_at_a_time(serve: Callable[..., Any], redis_url: str) -> None:
    first = serve()
    second = serve(namespace=first[0].settings.namespace)
    stub = first[2]
    _register(stub, _component("lk-a", kind=BASE), _component("lk-b", kind=BASE))
    stub.RegisterNode(_node("lk-n1"), timeout=10)
    stub.RegisterWorker(_worker("lk-n1", "w1"), timeout=10)
    _record(stub, canonical_key("lk-a"), ["lk-a"], 10)
    wait_for(lambda: [h.pipeline_key for h in _plan(stub).hot] == [canonical_key("lk-a")], "lk-a to be HOT")
    leader, other = (first, second) if first[0].plan_loop.leader else (second, first)
    _passes_later(leader[0])
    assert leader[0].plan_loop.leader and not other[0].plan_loop.leader
    assert other[0].plan_loop.passes == 0

    # the leader stops (giving the lock up): the other takes over and the versions go on by one
    before = _plan(stub).version
    leader[1].stop()
    wait_for(lambda: other[0].plan_loop.leader, "the other coordinator to take the planner lock")
    _record(other[2], canonical_key("lk-b"), ["lk-b"], 30)
    wait_for(lambda: canonical_key("lk-b") in {h.pipeline_key for h in _plan(other[2]).hot}, "a plan by the new leader")
    assert _plan(other[2]).version > before

    db = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        entries: Any = db.xrange(KeyLayout(first[0].settings.namespace).view)
        versions = [entry_event(i, f).plan.version for i, f in entries if f[KIND_FIELD] == "plan"]
    finally:
        db.close()
    assert versions == list(range(1, len(versions) + 1))


def test_lru_mode_publishes_an_empty_lru_plan(serve: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFMESH_POLICY", "lru")
    app, _, stub = serve()
    _register(stub, _component("lru-base", kind=BASE))
    stub.RegisterNode(_node("lru-n1"), timeout=10)
    stub.RegisterWorker(_worker("lru-n1", "w1"), timeout=10)
    _record(stub, canonical_key("lru-base"), ["lru-base"], 20)
    plan = wait_for(lambda: (p := _plan(stub)).version and p, "the first plan")
    assert plan == plan_pb2.Plan(version=1, created_unix=plan.created_unix, mode=plan_pb2.POLICY_MODE_LRU)
    _passes_later(app)
    assert _plan(stub).version == 1


def test_a_bad_policy_switch_fails_start_naming_it(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFMESH_POLICY", "fifo")
    with pytest.raises(ValueError, match="DIFFMESH_POLICY"):
        CoordinatorApp(_settings(redis_url))


# ------------------------------------------------------------------ PlanFollower


async def _until(check: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_plan_follower_applies_each_new_version_once_and_survives_restarts(serve: Callable[..., Any]) -> None:
    app, thread, stub = serve()
    _register(stub, _component("pf-a", kind=BASE), _component("pf-b", kind=BASE), _component("pf-c", kind=BASE))
    stub.RegisterNode(_node("pf-n1"), timeout=10)
    stub.RegisterWorker(_worker("pf-n1", "w1"), timeout=10)
    address, port = thread.address, thread.port

    async def scenario() -> None:
        applied: list[int] = []
        failures = [1]

        async def on_plan(plan: plan_pb2.Plan) -> None:
            applied.append(plan.version)

        async def flaky(plan: plan_pb2.Plan) -> None:
            if failures:
                failures.pop()
                raise RuntimeError("the node could not apply the plan this time")

        follower = PlanFollower(address, on_plan, reconnect_s=0.05)
        follower.start()
        try:
            await _until(lambda: follower.version >= 1, "the current plan from the snapshot")
            _record(stub, canonical_key("pf-a"), ["pf-a"], 10)
            await _until(lambda: follower.plan is not None and len(follower.plan.hot) == 1, "the plan with pf-a HOT")
            assert follower.version == _plan(stub).version
            assert applied == sorted(set(applied))  # each version once, in order

            # the coordinator restarts on the same port: the follower reconnects and goes on
            thread.stop()
            await _until(lambda: not follower.connected, "the follower to notice")
            again = ServerThread(CoordinatorApp(app.settings), port=port)
            try:
                with grpc.insecure_channel(again.address) as channel:
                    restarted = Stub(channel)
                    _record(restarted, canonical_key("pf-b"), ["pf-b"], 40)
                    await _until(
                        lambda: (
                            follower.plan is not None and {h.pipeline_key for h in follower.plan.hot} >= {canonical_key("pf-b")}
                        ),
                        "the plan made after the restart",
                    )
                    assert applied == sorted(set(applied))
                    assert follower.version == _plan(restarted).version

                    # a node that joins now gets the current plan at once; one whose first apply
                    # fails gets it again from a fresh snapshot
                    late = PlanFollower(again.address, flaky, reconnect_s=0.05)
                    late.start()
                    try:
                        await _until(lambda: late.version == follower.version, "the late follower to apply the plan")
                        assert not failures
                    finally:
                        await late.stop()
            finally:
                again.stop()
        finally:
            await follower.stop()

    asyncio.run(scenario())
