"""The router's placement from its replica of the view: ECT, bands, memory, room, lru; what results teach it."""

from __future__ import annotations

import math

import pytest
from diffmesh.policy.popularity import Band
from diffmesh.policy.routing import GB, Bandwidths, Source, component_load_s, pipeline_load_s
from diffmesh.policy_mode import PolicyMode
from diffmesh.v1 import common_pb2, plan_pb2
from diffmesh.view import View
from diffmesh_router.capacity import CapacitySignal
from diffmesh_router.learned import LearnedEstimates, megapixel_steps
from diffmesh_router.placement import InFlight
from diffmesh_router.view_placer import RequestShape, ViewPlacer
from diffmesh_router.worker_table import WorkerTable

from tests.unit.test_view import live, load, residency

GPU, HOST, SSD = common_pb2.TIER_GPU, common_pb2.TIER_HOST, common_pb2.TIER_SSD
BW = Bandwidths.from_hops(8 * GB, 2 * GB, 1 * GB, 0.25 * GB)
KEY = "base|lora@1.00|"


class Mesh:
    """A view with nodes n1 (w1, w2) and n2 (w1), and the router's table and placer on it."""

    def __init__(self, mode: PolicyMode = PolicyMode.DIFFMESH, plan: plan_pb2.Plan | None = None) -> None:
        self.view = View()
        snap = plan_pb2.ViewSnapshot(live=live(("n1", ("w1", "w2")), ("n2", ("w1",)), memory=24 * GB))
        if plan is not None:
            snap.plan.CopyFrom(plan)
        self.view.apply(plan_pb2.ViewEvent(event_id="1-0", snapshot=snap))
        self.learned = LearnedEstimates(BW, seconds_per_unit=0.5)
        self.capacity = CapacitySignal()
        self.table = WorkerTable(self.view, self.learned, self.capacity)
        self.in_flight = InFlight()
        self.in_flight.add_listener(self.table.in_flight_changed)
        self.placer = ViewPlacer(self.table, mode)

    def report(self, node: str, worker: str, *copies: tuple[str, int, bool, int]) -> None:
        self.view.apply(plan_pb2.ViewEvent(residency=residency(node, worker, *copies)))

    def order(self, shape: RequestShape) -> list[tuple[str, str]]:
        return [t.key for t in self.placer.rank(shape).targets()]


def shape(key: str = KEY, ids: tuple[str, ...] = ("base", "lora"), sizes: tuple[int, ...] = (2 * GB, GB // 10)) -> RequestShape:
    return RequestShape(key, ids, sizes, activations=GB // 2, units=megapixel_steps(20, 1, 512, 512))


def hot_plan(replicas: tuple[tuple[str, str], ...]) -> plan_pb2.Plan:
    p = plan_pb2.Plan(version=1)
    hot = p.hot.add(
        pipeline_key=KEY,
        pipeline=common_pb2.PipelineSpec(base_id="base", loras=[common_pb2.LoraRef(id="lora", scale=1.0)]),
    )
    for node, worker in replicas:
        hot.replicas.add(node_id=node, worker_id=worker)
    p.pipelines.add(pipeline_key=KEY, band=plan_pb2.BAND_HOT)
    return p


def test_the_worker_holding_the_pipeline_wins_then_its_node_then_a_peer() -> None:
    m = Mesh()
    assert m.order(shape()) == [("n1", "w1"), ("n2", "w1"), ("n1", "w2")]  # nothing anywhere: ties by worker id
    m.report("n2", "", ("base", SSD, True, 2 * GB))
    # n2's workers read the base from their SSD; n1's stream it from n2 (PEER), still better than REMOTE.
    assert m.order(shape())[0] == ("n2", "w1")
    m.report("n1", "", ("base", HOST, True, 2 * GB))
    assert m.order(shape())[:2] == [("n1", "w1"), ("n1", "w2")]
    m.report("n1", "w2", ("base", GPU, True, 2 * GB), ("lora", GPU, True, GB // 10))
    ranking = m.placer.rank(shape())
    assert ranking.first().key == ("n1", "w2") and ranking.first().address == "n1-w2:2"
    # Its ECT is the compute alone: 20 steps x 0.262 MP x 0.5 s.
    assert ranking.ect_s() == pytest.approx(megapixel_steps(20, 1, 512, 512) * 0.5)


def test_load_estimates_use_the_policy_formula() -> None:
    m = Mesh()
    m.report("n1", "", ("base", HOST, True, 2 * GB))
    m.report("n2", "", ("lora", SSD, True, GB // 10))
    loads = m.placer._load_s(shape())
    n1 = pipeline_load_s(component_load_s(2 * GB, Source.HOST, BW), [component_load_s(GB // 10, Source.PEER, BW)])
    n2 = pipeline_load_s(component_load_s(2 * GB, Source.REMOTE, BW), [component_load_s(GB // 10, Source.SSD, BW)])
    rows = m.table.row
    assert loads[rows[("n1", "w1")]] == pytest.approx(n1)
    assert loads[rows[("n1", "w2")]] == pytest.approx(n1)
    assert loads[rows[("n2", "w1")]] == pytest.approx(n2)


def test_in_flight_requests_spread_one_pipeline_over_idle_workers() -> None:
    m = Mesh()
    m.report("n1", "w1", ("base", GPU, True, 2 * GB), ("lora", GPU, True, GB // 10))
    compute = megapixel_steps(20, 1, 512, 512) * 0.5  # 2.6 s; the service time until one is measured
    # One request in flight on the holder: 2.6 s of queue + 2.6 s beats a REMOTE load (~9 s) elsewhere.
    with m.in_flight.track(("n1", "w1")):
        ranking = m.placer.rank(shape())
        assert ranking.first().key == ("n1", "w1") and ranking.ect_s() == pytest.approx(2 * compute)
        # Once its node's HOST holds the pipeline, the idle neighbour loads it in 0.3 s and wins.
        m.report("n1", "", ("base", HOST, True, 2 * GB), ("lora", HOST, True, GB // 10))
        assert m.placer.rank(shape()).first().key == ("n1", "w2")
        with m.in_flight.track(("n1", "w2")):
            # Both busy: the holder (no load) is next again, not the REMOTE node.
            assert m.placer.rank(shape()).first().key == ("n1", "w1")
    assert m.table.in_flight.sum() == 0 and m.table.unreported.sum() == 0


def test_reported_load_and_room() -> None:
    m = Mesh()
    m.view.apply(plan_pb2.ViewEvent(load=load("n1", "w1", queue=2, measured=1.0, free=20 * GB)))  # 1 running + 2 = max
    order = m.order(shape())
    assert order[-1] == ("n1", "w1")  # no room: after everyone with room
    assert m.table.busy()[m.table.row[("n1", "w1")]] == 3


def test_a_finished_request_stops_counting_before_the_next_report() -> None:
    m = Mesh()
    m.report("n1", "w1", ("base", GPU, True, 2 * GB), ("lora", GPU, True, GB // 10))
    m.report("n1", "", ("base", HOST, True, 2 * GB), ("lora", HOST, True, GB // 10))
    # The holder's last report still shows the request that just returned its result.
    m.view.apply(plan_pb2.ViewEvent(load=load("n1", "w1", queue=0, measured=1.0, free=20 * GB)))
    row = m.table.row[("n1", "w1")]
    assert m.table.busy()[row] == 1
    assert m.placer.rank(shape()).first().key == ("n1", "w2")  # looks busy: its neighbour loads from HOST
    m.table.finished(("n1", "w1"))
    assert m.table.busy()[row] == 0
    assert m.placer.rank(shape()).first().key == ("n1", "w1")  # idle and holding the pipeline
    m.table.finished(("n1", "w1"))
    assert m.table.busy()[row] == 0  # never below zero


def test_memory_that_does_not_fit_makes_a_worker_ineligible() -> None:
    m = Mesh()
    big = plan_pb2.WorkerLoad(
        worker=plan_pb2.WorkerRef(node_id="n2", worker_id="w1"),
        device_memory_free_bytes=1 * GB,
        device_memory_total_bytes=16 * GB,
        max_queue=4,
        measured_unix=1.0,
    )
    m.view.apply(plan_pb2.ViewEvent(load=big))
    ranking = m.placer.rank(shape())
    assert len(ranking) == 2 and ("n2", "w1") not in [t.key for t in ranking.targets()]
    # Evictable device copies count as usable: 1 GB free + 2 GB of an unpinned copy fits 2.1 GB + 0.5 GB.
    m.report("n2", "w1", ("other", GPU, True, 2 * GB))
    assert len(m.placer.rank(shape())) == 3


def test_hot_pipelines_prefer_their_replicas_and_spill_only_when_slower() -> None:
    m = Mesh(plan=hot_plan((("n2", "w1"),)))
    assert m.placer.rank(shape()).band is Band.HOT
    assert m.order(shape())[0] == ("n2", "w1")  # equal ECT everywhere: the replica
    m.report("n2", "w1", ("base", GPU, True, 2 * GB), ("lora", GPU, True, GB // 10))
    with m.in_flight.track(("n2", "w1")):
        assert m.order(shape())[0] == ("n2", "w1")  # one in the queue (2.6 s) < a REMOTE load (~9 s)
        m.report("n1", "", ("base", HOST, True, 2 * GB), ("lora", HOST, True, GB // 10))
        assert m.order(shape())[0][0] == "n1"  # a 0.3 s HOST load beats 2.6 s of queue


def test_cold_requests_rank_by_ect_and_leave_the_hot_pool_only_on_a_tie() -> None:
    m = Mesh(plan=hot_plan((("n1", "w1"), ("n1", "w2"))))
    cold = shape("tail||", ("tail",), (GB,))
    assert m.placer.rank(cold).band is Band.COLD
    assert m.order(cold)[0] == ("n2", "w1")  # equal ECT everywhere: off the HOT pool
    m.report("n1", "w1", ("tail", GPU, True, GB))
    assert m.order(cold)[0] == ("n1", "w1")  # a pool worker holding it on its device finishes first
    with m.in_flight.track(("n1", "w1")), m.in_flight.track(("n1", "w1")):
        assert m.order(cold)[0] == ("n2", "w1")  # two ahead of it there: a load elsewhere is sooner


def test_lru_mode_is_least_loaded_with_ties_by_id() -> None:
    m = Mesh(PolicyMode.LRU, plan=hot_plan((("n2", "w1"),)))
    m.report("n2", "w1", ("base", GPU, True, 2 * GB), ("lora", GPU, True, GB // 10))
    assert m.order(shape()) == [("n1", "w1"), ("n2", "w1"), ("n1", "w2")]
    assert m.placer.rank(shape()).band is None
    with m.in_flight.track(("n1", "w1")):
        assert m.order(shape())[0] == ("n2", "w1")


def test_results_teach_service_compute_and_load_rates() -> None:
    learned = LearnedEstimates(BW, seconds_per_unit=0.5)
    result = common_pb2.GenerationResult()
    result.timing.load_seconds = 1.0
    result.timing.denoise_seconds = 2.0
    result.loads.add(component_id="base", source_tier=common_pb2.TIER_REMOTE, bytes=GB, seconds=4.0)
    result.loads.add(component_id="lora", source_tier=common_pb2.TIER_GPU, bytes=0, seconds=0.0)
    learned.learn(("n1", "w1"), result, units=4.0)
    assert learned.service_s[("n1", "w1")] == 3.0
    assert learned.seconds_per_unit[("n1", "w1")] == 0.5
    assert learned.unit_default() == 0.5
    assert learned.bandwidths().rate(Source.REMOTE) == pytest.approx(GB / 4.0)
    assert learned.bandwidths().rate(Source.HOST) == BW.host_bps  # not measured yet
    result.timing.denoise_seconds = 6.0
    learned.learn(("n1", "w1"), result, units=4.0)
    assert learned.seconds_per_unit[("n1", "w1")] == pytest.approx(0.5 + 0.2 * (1.5 - 0.5))
    assert not math.isnan(learned.service_s[("n1", "w1")])
