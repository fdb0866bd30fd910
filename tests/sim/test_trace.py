"""The production trace: loader join, facts, and a full replay (skips without the trace)."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffmesh.sim.calibration import calibrate
from diffmesh.sim.config import SYSTEMS, ClusterConfig
from diffmesh.sim.runner import prepare, run_system
from diffmesh.trace.loader import load_trace
from diffmesh.trace.stats import workload_stats


@pytest.fixture(scope="module")
def workload(trace_dir: Path):  # type: ignore[no-untyped-def]
    return load_trace(trace_dir)


def test_loader_joins_by_popularity_rank(trace_dir: Path, workload) -> None:  # type: ignore[no-untyped-def]
    facts = workload_stats(workload)
    assert facts["requests"] == len(workload) > 1000
    assert facts["gini_base"] > 0.8
    assert 0.05 < facts["lora_share"] < 0.4
    assert (workload.arrival_s[1:] >= workload.arrival_s[:-1]).all()
    for c in workload.components:
        lo, hi = {"BASE": (1e9, 20e9), "LORA": (0.1e9, 1e9)}[c.kind]
        assert lo <= c.nbytes <= hi
    # Joined twice, the same pipelines.
    again = load_trace(trace_dir)
    assert [p.key for p in again.pipelines] == [p.key for p in workload.pipelines]


def test_calibration_reads_latency_files(trace_dir: Path, workload) -> None:  # type: ignore[no-untyped-def]
    cal = calibrate(trace_dir, workload)
    assert 15 < cal.median_s["BASE"] < 30
    assert 2 < cal.median_s["LORA"] < 8
    assert "lora_request_trace exec_time" in cal.source


@pytest.mark.slow
def test_full_trace_replay_diffmesh_vs_lru(trace_dir: Path, workload) -> None:  # type: ignore[no-untyped-def]
    prep = prepare(workload, calibrate(trace_dir, workload), ClusterConfig(), load=0.4)
    lru = run_system(prep, SYSTEMS["lru"]).summary()
    dm = run_system(prep, SYSTEMS["diffmesh"]).summary()
    assert dm["latency_mean_s"] < lru["latency_mean_s"]
    assert dm["latency_p99_s"] < lru["latency_p99_s"]
    assert dm["remote_bytes"] < 0.5 * lru["remote_bytes"]
