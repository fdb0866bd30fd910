"""The peer tier, the exact ECT short-list, late binding (work stealing) and metric definitions."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from diffmesh.sim.calibration import calibrate
from diffmesh.sim.config import DIFFMESH, GB, SYSTEMS, ClusterConfig, SystemSpec
from diffmesh.sim.engine import PreparedWorkload, Simulator
from diffmesh.sim.runner import prepare, run_system
from diffmesh.trace.model import Component, Pipeline, Workload
from diffmesh.trace.synthetic import synthetic_workload


def tiny_workload(arrivals: list[float], pipes: list[int], steps: list[int]) -> Workload:
    """Two 2 GB SD1.5 bases, one pipeline each; requests at ``arrivals``."""
    n = len(arrivals)
    return Workload(
        name="tiny",
        components=[Component("a", "BASE", "sd15", 2 * GB), Component("b", "BASE", "sd15", 2 * GB)],
        pipelines=[Pipeline("a", 0), Pipeline("b", 1)],
        arrival_s=np.asarray(arrivals, dtype=np.float64),
        pipeline=np.asarray(pipes, dtype=np.int64),
        images=np.ones(n, dtype=np.int64),
        steps=np.asarray(steps, dtype=np.int64),
        tenant=np.zeros(n, dtype=np.int64),
        task=np.zeros(n, dtype=np.int64),
    )


def two_nodes() -> ClusterConfig:
    return ClusterConfig(nodes=2, gpus_per_node=1, host_gb=100.0, ssd_gb=100.0)


def test_second_node_copies_from_its_peer_instead_of_remote() -> None:
    # Request 0 starts on node 0 (REMOTE fetch). Request 1 of the same base arrives while
    # worker 0 is busy for long: it goes to node 1 and copies the base from node 0.
    prep = PreparedWorkload(tiny_workload([0.0, 0.5], [0, 0], [300, 30]), calibrate(None), two_nodes(), 1.0)
    ect = SystemSpec("ect", "ect", "lru", peer=True)
    r = Simulator(prep, ect).run()
    assert r.misses == 1 and r.remote_bytes == 2 * GB
    assert r.peer_fetches == 1 and r.peer_bytes == 2 * GB
    # Without the peer tier the second node fetches from REMOTE as well.
    r2 = Simulator(prep, replace(ect, peer=False)).run()
    assert r2.misses == 2 and r2.remote_bytes == 4 * GB and r2.peer_fetches == 0
    # The peer copy waits for the source copy to be complete, and is faster than REMOTE.
    assert r.latency_s[1] <= r2.latency_s[1]


def test_peer_cost_lies_between_ssd_and_remote() -> None:
    prep = PreparedWorkload(tiny_workload([0.0], [0], [30]), calibrate(None), two_nodes(), 1.0)
    for c in range(2):
        assert prep.ssd_cost[c] < prep.peer_cost[c] < prep.remote_cost[c]


def test_baselines_never_use_peers() -> None:
    for name in ("lru", "rayserve", "modelmesh"):
        assert not SYSTEMS[name].peer and not SYSTEMS[name].steal
    assert DIFFMESH.peer and DIFFMESH.steal


@pytest.fixture(scope="module")
def synth() -> PreparedWorkload:
    workload = synthetic_workload(2500, n_bases=40, n_loras=120, n_lora_pipelines=80, duration_s=86400.0, seed=7)
    return prepare(workload, calibrate(None), ClusterConfig.for_gpus(16), load=0.5)


def test_branch_and_bound_routing_equals_scoring_every_worker(synth: PreparedWorkload) -> None:
    fast = run_system(synth, DIFFMESH)
    full = run_system(synth, replace(DIFFMESH, exhaustive=True))
    assert np.array_equal(fast.latency_s, full.latency_s)
    a, b = fast.summary(), full.summary()
    a.pop("wall_s")
    b.pop("wall_s")
    assert a == b


def test_misses_count_one_remote_fetch_per_node_copy(synth: PreparedWorkload) -> None:
    r = run_system(synth, SYSTEMS["lru"])
    # Every component is fetched at least once; a miss is one REMOTE fetch, so the bytes
    # are at least the catalog's bytes used and misses bound the distinct components.
    used = {c for p in synth.req_pipe for c in synth.comps[p]}
    assert r.misses >= len(used)
    assert r.remote_bytes >= sum(synth.nbytes[c] for c in used)
    dm = run_system(synth, DIFFMESH)
    # With peers a component comes from REMOTE only when no node holds it.
    assert dm.misses <= r.misses and dm.remote_bytes <= r.remote_bytes


def test_idle_worker_steals_a_queued_request() -> None:
    # Worker 1 is idle; a request queued behind a long job on worker 0 moves to it when
    # loading there ends sooner than waiting.
    prep = PreparedWorkload(tiny_workload([0.0, 0.1], [0, 1], [30, 30]), calibrate(None), two_nodes(), 1.0)
    sim = Simulator(prep, DIFFMESH)
    sim._start(0, 0, 0.0)  # request 0 runs on worker 0
    sim.outstanding[0] = 2
    sim.run_end[0] = 1000.0  # ... for a long time
    sim.est_service[1] = 10.0
    sim.est_free[0] = 1010.0
    sim.queue[0].append(1)
    sim.queued.add(0)
    sim.waiting = 1
    sim._steal(1, 0.1)
    assert not sim.queue[0] and not sim.queued and sim.waiting == 0
    assert sim.running[1] and sim.outstanding == [1, 1] and sim.steals == 1
    assert sim.est_free[0] == pytest.approx(1000.0)


def test_scale_out_warms_an_idle_gpu_from_node_tiers_or_peers_only() -> None:
    prep = PreparedWorkload(tiny_workload([0.0, 0.1], [0, 0], [300, 30]), calibrate(None), two_nodes(), 1.0)
    sim = Simulator(prep, DIFFMESH)
    sim._start(0, 0, 0.0)  # request 0 fetches base 0 from REMOTE to node 0 and runs on worker 0
    assert sim.misses == 1 and not sim.running[1]
    sim._scale_out(1, 0, 0.1)  # request 1 of the same pipeline had to queue
    assert sim.scale_outs == 1 and sim.running[1]
    assert 0 in sim.gpu[1].sizes and 1 in sim.gpu_holders[0]
    assert sim.misses == 1 and sim.peer_fetches == 1  # copied from node 0, not fetched again


def test_scale_out_never_fetches_from_remote() -> None:
    prep = PreparedWorkload(tiny_workload([0.0, 0.1], [0, 1], [300, 30]), calibrate(None), two_nodes(), 1.0)
    sim = Simulator(prep, DIFFMESH)
    sim._start(0, 0, 0.0)
    sim._scale_out(1, 1, 0.1)  # base 1 is on no node: left to on-demand loading
    assert sim.scale_outs == 0 and not sim.running[1] and sim.misses == 1


def test_workload_window_rebases_arrivals() -> None:
    w = tiny_workload([0.0, 10.0, 20.0, 30.0], [0, 1, 0, 1], [30, 30, 30, 30])
    part = w.window(10.0, 30.0)
    assert len(part) == 2
    assert part.arrival_s.tolist() == [0.0, 10.0]
    assert part.pipeline.tolist() == [1, 0]
    assert part.start_epoch_s == w.start_epoch_s + 10.0


def test_cached_node_costs_match_a_full_recomputation(synth: PreparedWorkload) -> None:
    sim = Simulator(synth, DIFFMESH)
    sim.run()
    for n in range(sim.nodes):
        assert sim.ncost[n] == [sim.node_cost(n, c) for c in range(len(synth.nbytes))]
    assert sim.min_cost == [min(sim.ncost[n][c] for n in range(sim.nodes)) for c in range(len(synth.nbytes))]
