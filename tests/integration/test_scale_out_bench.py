"""``bench/scale_out_bench.py`` at its smallest: real redis, coordinator, instance managers and workers as processes.

Checks the JSON's shape and what does not depend on the machine's speed (the tiers each
route's components came from, a clean shutdown); no time is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from diffmesh.launcher.processes import shm_segments
from diffmesh.shm import node_prefix

pytestmark = pytest.mark.e2e

BENCH = Path(__file__).resolve().parents[2] / "bench" / "scale_out_bench.py"
PHASES = {"start_to_serving_s", "serving_to_first_result_s", "total_s", "worker_load_s", "worker_denoise_s"}


def test_scale_out_bench_smallest_run(tmp_path: Path) -> None:
    out = tmp_path / "scale-out.json"
    shm_before = shm_segments()
    cmd = [
        sys.executable, str(BENCH), "--width", "32", "--lora-rank", "4", "--repeats", "1", "--steps", "1",
        "--models-dir", str(tmp_path / "models"), "--run-dir", str(tmp_path / "run"), "--json", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env={**os.environ, "REDIS_URL": ""})
    assert out.exists(), f"no JSON written; stderr:\n{proc.stderr[-4000:]}"
    doc = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {"config", "models", "warm_node", "routes", "targets", "b_over_a", "clean_shutdown", "problems"} <= set(doc)
    assert doc["models"]["pipeline_bytes"] == doc["models"]["base"]["bytes"] + doc["models"]["lora"]["bytes"] > 0
    assert set(doc["routes"]) == {"A", "A_standby", "B"}
    for route, tier in (("A", "HOST"), ("A_standby", "HOST"), ("B", "REMOTE")):
        data = doc["routes"][route]
        assert data["failed"] == 0, data["samples"]
        assert PHASES <= set(data["median"]) and all(data["median"][p] is not None for p in PHASES)
        assert data["source_tiers"] == [tier] and data["tiers_as_expected"], data["samples"]
        (sample,) = data["samples"]
        assert {load["component_id"] for load in sample["loads"]} == {"scale-out-base", "scale-out-lora"}
    assert doc["routes"]["B"]["samples"][0]["instance_manager_start_s"] is not None
    assert set(doc["targets"]) == {
        "A_serving_to_first_result", "A_total", "A_standby_serving_to_first_result", "A_standby_total"
    }
    assert all(isinstance(t["met"], bool) for t in doc["targets"].values())
    assert doc["clean_shutdown"] and doc["problems"] == []
    assert "target A_total" in proc.stdout
    nodes = {doc["warm_node"]["node_id"], *(s["node_id"] for r in doc["routes"].values() for s in r["samples"])}
    ours = tuple(node_prefix(node) for node in nodes)
    assert not {s for s in shm_segments() - shm_before if s.startswith(ours)}
