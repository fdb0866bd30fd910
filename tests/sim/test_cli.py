"""``diffmesh sim`` and ``diffmesh trace stats`` end to end on a synthetic workload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from diffmesh.cli import main

KEYS = {
    "requests",
    "latency_mean_s",
    "latency_p50_s",
    "latency_p95_s",
    "latency_p99_s",
    "queue_mean",
    "queue_p99",
    "misses",
    "remote_bytes",
    "ssd_bytes",
    "peer_fetches",
    "peer_bytes",
    "gpu_busy",
    "wall_s",
}


def test_sim_json_shape_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIFFMESH_TRACE", raising=False)
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    assert main(["sim", "--json", str(out), "--plot", str(png), "--gpus", "16", "--requests", "1500", "--no-sweep"]) == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"systems", "oracle", "config"}
    assert set(doc["systems"]) == {"lru", "rayserve", "modelmesh", "diffmesh", "ablations"}
    for name in ("lru", "rayserve", "modelmesh", "diffmesh"):
        assert set(doc["systems"][name]) == KEYS
        assert doc["systems"][name]["requests"] == 1500
    assert set(doc["systems"]["ablations"]) == {
        "no_bands",
        "no_bandit",
        "no_fusion",
        "lru_eviction",
        "no_peer",
        "no_steal",
        "no_scale_out",
    }
    assert isinstance(doc["oracle"]["misses"], int)
    assert doc["config"]["gpus"] == 16
    assert png.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "diffmesh" in printed and "oracle" in printed


def test_trace_stats_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIFFMESH_TRACE", raising=False)
    out = tmp_path / "stats.json"
    assert main(["trace", "stats", "--json", str(out)]) == 0
    facts = json.loads(out.read_text())
    for key in ("gini_base", "top5pct_share", "top50_pipelines_share", "lora_share", "requests"):
        assert key in facts
    assert 0.8 < facts["gini_base"] < 0.95


def test_sim_days_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIFFMESH_TRACE", raising=False)
    out = tmp_path / "sim.json"
    assert main(["sim", "--json", str(out), "--gpus", "8", "--days", "1:2", "--requests", "400", "--no-sweep"]) == 0
    doc = json.loads(out.read_text())
    assert doc["systems"]["diffmesh"]["requests"] == doc["config"]["requests"] <= 400
    assert doc["config"]["compute_share_of"] == "baseline"
