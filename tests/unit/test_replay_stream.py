"""The replay's pure parts: trace → demo catalog mapping, the request stream and its time compression."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from diffmesh.cli import main as cli_main
from diffmesh.replay.mapping import map_catalog, slot_for_rank, tail_slots
from diffmesh.replay.stream import (
    ComputeModel,
    StreamSettings,
    build_requests,
    capped_images,
    compress,
    compression_for_load,
    cut_gaps,
    fit_compute_model,
    mean_compute,
    scaled_steps,
)
from diffmesh.trace.model import Component, Pipeline, Workload


def _workload(pipes: list[int], arrivals: list[float] | None = None) -> Workload:
    """Bases b0..b5, LoRAs l0..l2; pipelines: 0-5 plain bases, 6 = b0+l0+l1, 7 = b1+l1+l2 (scales 0.5, 0.8)."""
    comps = [Component(f"b{i}", "BASE", "sd15", 1) for i in range(6)]
    comps += [Component(f"l{i}", "LORA", "sd15", 1) for i in range(3)]
    pipelines = [Pipeline(f"p{i}", i) for i in range(6)]
    pipelines += [Pipeline("p6", 0, (6, 7), (1.0, 0.7)), Pipeline("p7", 1, (7, 8), (0.5, 0.8))]
    n = len(pipes)
    return Workload(
        name="t",
        components=comps,
        pipelines=pipelines,
        arrival_s=np.array(arrivals if arrivals is not None else [10.0 * i for i in range(n)]),
        pipeline=np.array(pipes, dtype=np.int32),
        images=np.array([1, 8, 4, 2] * (n // 4) + [1] * (n % 4), dtype=np.int16),
        steps=np.array([30, 40, 25, 5] * (n // 4) + [30] * (n % 4), dtype=np.int16),
        tenant=np.arange(n, dtype=np.int32) % 3,
        task=np.array([0, 1, 2, 0] * (n // 4) + [0] * (n % 4), dtype=np.int8),
    )


def test_tail_ranks_fold_round_robin_onto_the_last_quarter() -> None:
    assert [slot_for_rank(r, 12) for r in range(12)] == list(range(12))
    assert tail_slots(12) == 3
    assert [slot_for_rank(r, 12) for r in range(12, 18)] == [9, 10, 11, 9, 10, 11]
    assert [slot_for_rank(r, 2) for r in range(2, 5)] == [1, 1, 1]  # at least one tail slot
    with pytest.raises(ValueError):
        slot_for_rank(0, 0)


def test_catalog_ranks_by_use_and_folds_the_tail() -> None:
    # b1: 4 uses (p1 x3 + p7), b0: 3 (p0 x2 + p6), b2: 2, b3, b4, b5: 1 each (ties by first use).
    w = _workload([1, 0, 1, 2, 6, 7, 1, 2, 3, 4, 5, 0])
    cmap = map_catalog(w, requests=12, max_bases=4, max_loras=8)
    assert cmap.base_ids == ["replay-base-00", "replay-base-01", "replay-base-02", "replay-base-03"]
    assert [cmap.base_id(c) for c in (1, 0, 2, 3)] == cmap.base_ids  # rank order
    assert cmap.base_id(4) == cmap.base_id(5) == "replay-base-03"  # ranks 4, 5 → the one tail slot
    assert cmap.requests_per_base == [4, 3, 2, 3]
    assert sum(cmap.requests_per_base) == 12
    assert (cmap.trace_bases, cmap.trace_loras) == (6, 3)
    # LoRA l1 (index 7) is used twice, l0 and l2 once (l0 first).
    assert cmap.lora_ids == ["replay-lora-00", "replay-lora-01", "replay-lora-02"]
    assert cmap.lora_ids_of((6, 7), (1.0, 0.7)) == (("replay-lora-01", 1.0), ("replay-lora-00", 0.7))


def test_only_the_first_n_requests_count_and_duplicate_loras_apply_once() -> None:
    w = _workload([3, 3, 6, 7, 0, 0, 0, 0])
    cmap = map_catalog(w, requests=4, max_bases=8, max_loras=1)
    assert cmap.base_id(3) == "replay-base-00"
    assert cmap.requests_per_base == [2, 1, 1]
    # one LoRA slot: l0, l1, l2 all map onto it; a set of two becomes one adapter (first scale kept)
    assert cmap.lora_ids_of((7, 8), (0.5, 0.8)) == (("replay-lora-00", 0.5),)


def test_steps_images_and_gaps_are_scaled() -> None:
    s = StreamSettings()
    assert [scaled_steps(x, s) for x in (30, 40, 25, 35, 5, 100)] == [3, 4, 3, 4, 2, 10]
    assert [capped_images(x, s) for x in (1, 2, 4, 8, 0)] == [1, 2, 2, 2, 1]
    cut = cut_gaps(np.array([0.0, 10.0, 20_000.0, 20_005.0]), 3600.0)
    assert cut.tolist() == [0.0, 10.0, 3610.0, 3615.0]
    assert cut_gaps(np.array([]), 1.0).size == 0


def test_build_requests_keeps_task_tenant_and_pipeline() -> None:
    w = _workload([6, 7, 0, 1])
    reqs = build_requests(w, map_catalog(w, 4), 4)
    assert [r.task for r in reqs] == ["TXT2IMG", "IMG2IMG", "INPAINT", "TXT2IMG"]
    assert [r.images for r in reqs] == [1, 2, 2, 2]
    assert [r.steps for r in reqs] == [3, 4, 3, 2]
    assert [r.tenant for r in reqs] == ["tenant-0", "tenant-1", "tenant-2", "tenant-0"]
    assert reqs[0].loras and reqs[2].loras == ()
    assert [r.arrival_s for r in reqs] == [r.trace_s for r in reqs] == [0.0, 10.0, 20.0, 30.0]
    assert len({r.seed for r in reqs}) == 4


def test_compression_makes_the_offered_load() -> None:
    # 60 requests in one hour: the request-weighted rate is 60/h. Mean compute 2 s, the mesh
    # completes 1.5 work-seconds per second: load 0.5 needs 0.5 x 1.5 / (60/3600 x 2) = 22.5x.
    trace_s = np.arange(60) * 60.0
    factor = compression_for_load(trace_s, mean_compute_s=2.0, work_per_s=1.5, load=0.5)
    assert factor == pytest.approx(22.5)
    w = _workload([0, 1, 2, 3])
    squeezed = compress(build_requests(w, map_catalog(w, 4), 4), 10.0)
    assert [r.arrival_s for r in squeezed] == [0.0, 1.0, 2.0, 3.0]
    assert compression_for_load(np.array([0.0]), 1.0, 1.0, 0.7) == pytest.approx(0.7 * 3600)  # one request: 1/h
    with pytest.raises(ValueError):
        compression_for_load(trace_s, 1.0, 1.0, 0.0)


def test_compute_model_fit_recovers_its_coefficients() -> None:
    truth = ComputeModel(0.05, 0.1, 0.02)
    samples = [(s, i, truth.seconds(s, i)) for s, i in ((2, 1), (8, 1), (2, 2), (8, 2))]
    fitted = fit_compute_model(samples)
    assert (fitted.a, fitted.b, fitted.c) == pytest.approx((0.05, 0.1, 0.02))
    w = _workload([0, 1, 2, 3])
    reqs = build_requests(w, map_catalog(w, 4), 4)  # (steps, images): (3, 1), (4, 2), (3, 2), (2, 2)
    assert mean_compute(reqs, truth) == pytest.approx((0.37 + 0.89 + 0.69 + 0.49) / 4)
    with pytest.raises(ValueError):
        fit_compute_model(samples[:2])


def test_cli_refuses_a_missing_trace_and_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    assert cli_main(["replay", "--json", str(out), "--trace", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["replay", "--json", str(out), "--trace", str(tmp_path), "--requests", "0"]) == 2
    assert cli_main(["replay", "--json", str(out), "--trace", str(tmp_path), "--node-prefix", "bad prefix"]) == 2
    assert not out.exists()
