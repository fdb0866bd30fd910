"""The replay's statistics, comparison and table, the calibration's sizing and the LoRA rank (all pure)."""

from __future__ import annotations

import pytest
import torch
from diffmesh.replay.calibration import BLOCK, remote_rate_for, round_up, tier_sizes
from diffmesh.replay.driver import ComponentLoad, Outcome
from diffmesh.replay.models import lora_bytes_per_rank, rank_for_ratio
from diffmesh.replay.summary import (
    PLANE_KEYS,
    SYSTEM_KEYS,
    compare,
    gpu_busy,
    latency_stats,
    pct_change,
    queue_lengths,
    render,
    summarize,
)


def _ok(index: int, sent: float, done: float, queue: float = 0.0, load: float = 0.0, denoise: float = 1.0) -> Outcome:
    o = Outcome(index, scheduled_s=sent, sent_s=sent, done_s=done, ok=True, worker_id=f"w{index % 2}", node_id="n")
    o.queue_s, o.load_s, o.denoise_s = queue, load, denoise
    return o


def test_latency_stats() -> None:
    stats = latency_stats([1.0, 2.0, 3.0, 4.0])
    assert stats == {"latency_mean_s": 2.5, "latency_p50_s": 2.5, "latency_p99_s": pytest.approx(3.97)}
    assert latency_stats([]) == {"latency_mean_s": None, "latency_p50_s": None, "latency_p99_s": None}


def test_queue_lengths_sample_the_waiting_requests_at_each_arrival() -> None:
    # r0 runs 0-2 (no wait); r1 arrives at 0.5 and waits 0.5-2; r2 arrives at 1.0 and waits 1.0-3.
    outcomes = [
        _ok(0, 0.0, 2.0, denoise=2.0),
        _ok(1, 0.5, 3.0, queue=1.5, denoise=1.0),
        _ok(2, 1.0, 4.0, queue=2.0, denoise=1.0),
        _ok(3, 2.5, 5.0, queue=0.5, load=0.5, denoise=1.5),  # waits 2.5-3.0
    ]
    assert queue_lengths(outcomes) == [0, 0, 1, 1]  # at 2.5: r2 (r1 is done waiting, r3 is the arrival)
    failed = Outcome(4, scheduled_s=1.5, sent_s=1.5, done_s=1.6)
    assert queue_lengths([*outcomes, failed])[-1] == 2  # r1, r2 wait at 1.5


def test_gpu_busy_is_load_plus_denoise_over_worker_time() -> None:
    outcomes = [_ok(0, 0, 2, load=1.0, denoise=1.0), _ok(1, 0, 3, denoise=2.0)]
    assert gpu_busy(outcomes, workers=2, wall_s=4.0) == pytest.approx(4.0 / 8.0)
    assert gpu_busy(outcomes, workers=0, wall_s=4.0) is None


def test_summarize_has_the_issue_keys_and_counts_failures() -> None:
    ok = _ok(0, 0.0, 1.5, load=0.5, denoise=1.0)
    ok.loads = [ComponentLoad("b", "BASE", "REMOTE", 10, 0.5), ComponentLoad("l", "LORA", "HOST", 2, 0.1)]
    bad = Outcome(1, scheduled_s=0.2, sent_s=0.2, done_s=0.3, error="full", code="RESOURCE_EXHAUSTED")
    s = summarize([ok, bad], 2.0, 2, remote_bytes=10, peer_bytes=None, misses=1)
    assert set(SYSTEM_KEYS) <= set(s)
    assert (s["requests"], s["failed"], s["latency_mean_s"], s["remote_bytes"], s["peer_bytes"]) == (2, 1, 1.5, 10, None)
    assert s["failed_by_code"] == {"RESOURCE_EXHAUSTED": 1}
    assert s["loads_by_tier"] == {"BASE": {"REMOTE": 1}, "LORA": {"HOST": 1}}
    assert s["gpu_busy"] == pytest.approx(1.5 / 4.0)


def test_compare_and_render() -> None:
    assert pct_change(6.0, 10.0) == pytest.approx(-40.0)
    assert pct_change(1.0, 0.0) is None and pct_change(None, 1.0) is None
    plane = dict.fromkeys(PLANE_KEYS, 0) | {"spills": None}
    systems = {
        "lru": {"latency_mean_s": 10.0, "latency_p50_s": 8.0, "latency_p99_s": 40.0, "queue_mean": 2.0,
                "remote_bytes": 100, "misses": 10, "requests": 3, "failed": 0, "policy_plane": plane},
        "diffmesh": {"latency_mean_s": 5.0, "latency_p50_s": 6.0, "latency_p99_s": 30.0, "queue_mean": 1.0,
                     "remote_bytes": 50, "misses": 4, "requests": 3, "failed": 0, "policy_plane": plane},
    }
    delta = compare(systems)
    assert delta is not None
    assert (delta["latency_mean_pct"], delta["latency_p99_pct"], delta["misses_pct"]) == (-50.0, -25.0, -60.0)
    assert compare({"lru": systems["lru"]}) is None
    text = render(systems, delta)
    assert "diffmesh vs lru: mean -50.0 %" in text and "p99 -25.0 %" in text
    assert "spills" in text and "null" in text


def test_tier_sizes_add_the_workers_leases_to_the_host_cache() -> None:
    mib = 1024 * 1024
    sizes = tier_sizes(base_bytes=7 * mib, lora_bytes=1 * mib, catalog_bytes=100 * mib, max_loras=1, workers_per_node=2)
    pipeline = 8 * mib + 2 * mib  # in 2 MiB pool blocks
    assert sizes.pipeline_bytes == pipeline
    assert sizes.worker_cache_bytes == 2 * pipeline
    assert sizes.host_bytes == round_up(15 * mib) + 2 * (2 * pipeline + pipeline)
    assert sizes.ssd_bytes == 50 * mib
    small = tier_sizes(base_bytes=7 * mib, lora_bytes=0, catalog_bytes=10 * mib, max_loras=0, workers_per_node=2)
    assert small.ssd_bytes == 3 * 8 * mib  # at least workers + 1 pipelines
    assert round_up(1) == BLOCK and round_up(BLOCK) == BLOCK


def test_remote_rate_makes_a_base_take_the_ratio_of_compute() -> None:
    rate = remote_rate_for(base_bytes=6_000_000, mean_compute_s=0.5, remote_ratio=3.0)
    assert 6_000_000 / rate == pytest.approx(1.5)
    with pytest.raises(ValueError):
        remote_rate_for(6_000_000, 0.0, 3.0)


def test_lora_rank_for_a_size_ratio() -> None:
    net = torch.nn.Module()
    net.attn = torch.nn.Module()
    net.attn.to_q = torch.nn.Linear(32, 32)
    net.attn.to_k = torch.nn.Linear(16, 32)
    net.proj = torch.nn.Linear(32, 32)  # not a target
    per_rank = lora_bytes_per_rank(net, ("to_q", "to_k"))
    assert per_rank == 4 * (64 + 48)
    assert rank_for_ratio(base_bytes=per_rank * 50, per_rank_bytes=per_rank, ratio=5.0) == 10
    assert rank_for_ratio(base_bytes=10, per_rank_bytes=per_rank, ratio=5.0) == 1
