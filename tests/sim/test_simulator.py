"""The simulator on small synthetic workloads: determinism, diffmesh vs lru, the oracle."""

from __future__ import annotations

import numpy as np
import pytest
from diffmesh.sim.calibration import calibrate
from diffmesh.sim.config import ABLATIONS, SYSTEMS, ClusterConfig
from diffmesh.sim.engine import weighted_busy_fraction
from diffmesh.sim.oracle import belady_size_misses
from diffmesh.sim.runner import compare, prepare, run_system
from diffmesh.trace.stats import gini
from diffmesh.trace.synthetic import synthetic_workload, zipf_exponent_for_gini, zipf_weights


@pytest.fixture(scope="module")
def prep():  # type: ignore[no-untyped-def]
    workload = synthetic_workload(3000, n_bases=40, n_loras=120, n_lora_pipelines=80, duration_s=86400.0, seed=3)
    return prepare(workload, calibrate(None), ClusterConfig.for_gpus(16), load=0.45)


def test_same_seed_same_results(prep) -> None:  # type: ignore[no-untyped-def]
    a = run_system(prep, SYSTEMS["diffmesh"], seed=5)
    b = run_system(prep, SYSTEMS["diffmesh"], seed=5)
    assert np.array_equal(a.latency_s, b.latency_s)
    sa, sb = a.summary(), b.summary()
    sa.pop("wall_s")
    sb.pop("wall_s")
    assert sa == sb


def test_diffmesh_beats_lru(prep) -> None:  # type: ignore[no-untyped-def]
    lru = run_system(prep, SYSTEMS["lru"]).summary()
    dm = run_system(prep, SYSTEMS["diffmesh"]).summary()
    assert dm["requests"] == lru["requests"] == 3000
    assert dm["latency_mean_s"] < lru["latency_mean_s"]
    assert dm["latency_p99_s"] < lru["latency_p99_s"]
    assert dm["remote_bytes"] < lru["remote_bytes"]


def test_every_system_serves_every_request(prep) -> None:  # type: ignore[no-untyped-def]
    result = compare(prep, systems=SYSTEMS, ablations=ABLATIONS)
    for r in [*result.systems.values(), *result.ablations.values()]:
        assert r.latency_s.size == 3000
        assert (r.latency_s > 0).all()
        assert (r.queue_wait_s >= 0).all()
        s = r.summary()
        assert 0 < s["gpu_busy"] <= 1.0
        assert s["misses"] >= result.oracle_misses


def test_belady_size_hand_case() -> None:
    sizes = [10, 10, 10]
    # Capacity 20: a b c a b -> misses a, b, c (evict b? next uses: a@3, b@4 -> evict b, farther), a hit, b miss.
    assert belady_size_misses([0, 1, 2, 0, 1], sizes, 20) == 4
    assert belady_size_misses([0, 1, 2, 0, 1], sizes, 30) == 3
    # Never-again copies go first.
    assert belady_size_misses([0, 1, 2, 1], sizes, 20) == 3


def test_weighted_busy_fraction_hand_case() -> None:
    # 2 GPUs, windows of 10 s: window 0 has 10 busy GPU-s (0.5), window 1 none (0.0).
    starts, ends = np.array([0.0, 5.0]), np.array([5.0, 10.0])
    arrivals = np.array([0.0, 2.0, 3.0, 15.0])
    assert weighted_busy_fraction(starts, ends, arrivals, 10.0, 2) == pytest.approx((0.5 * 3 + 0.0) / 4)


def test_synthetic_gini_matches_target() -> None:
    s = zipf_exponent_for_gini(100, 0.88)
    assert gini(zipf_weights(100, s)) == pytest.approx(0.88, abs=1e-6)
    w = synthetic_workload(500, seed=1)
    w2 = synthetic_workload(500, seed=1)
    assert np.array_equal(w.pipeline, w2.pipeline) and np.array_equal(w.arrival_s, w2.arrival_s)


def test_compute_calibrated_to_the_baseline_share() -> None:
    from diffmesh.sim.runner import baseline_denoise_share, calibrate_to_baseline

    workload = synthetic_workload(1500, n_bases=30, n_loras=60, n_lora_pipelines=40, duration_s=86400.0, seed=11)
    cluster = ClusterConfig.for_gpus(16)
    cal = calibrate_to_baseline(workload, calibrate(None), cluster, load=0.3, share=0.25, tolerance=0.005)
    share = baseline_denoise_share(prepare(workload, cal, cluster, load=0.3))
    assert share == pytest.approx(0.25, abs=0.006)
    assert "lru baseline" in cal.source
