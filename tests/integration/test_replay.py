"""``diffmesh replay --policy all`` on the shared trace: two fresh meshes (lru, then diffmesh) as real
processes, a real bandwidth-capped REMOTE store, the trace's first 12 requests through the router."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from diffmesh.launcher.processes import shm_segments
from diffmesh.replay.summary import PLANE_KEYS, SYSTEM_KEYS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TRACE = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "alibaba-genai-2026"
REQUESTS = 12


@pytest.mark.skipif(not TRACE.is_dir(), reason=f"the shared trace is absent ({TRACE}); download it to run this test")
def test_replay_all_policies_on_the_shared_trace(tmp_path: Path) -> None:
    out = tmp_path / "replay.json"
    plot = tmp_path / "replay.png"
    shm_before = shm_segments()
    prefix = f"replay-test-{os.getpid()}"
    cmd = [
        sys.executable, "-m", "diffmesh.cli", "replay",
        "--trace", str(TRACE), "--json", str(out), "--plot", str(plot), "--policy", "all",
        "--requests", str(REQUESTS), "--out", str(tmp_path / "run"), "--models", str(tmp_path / "models"),
        "--node-prefix", prefix,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env={**os.environ, "REDIS_URL": ""})
    assert out.exists(), f"no JSON written; stderr:\n{proc.stderr[-4000:]}"
    doc = json.loads(out.read_text())
    systems = doc["systems"]
    assert set(systems) == {"lru", "diffmesh"}, proc.stderr[-4000:]
    for name, system in systems.items():
        assert "error" not in system, f"{name}: {system.get('error')}"
        assert set(SYSTEM_KEYS) <= set(system), name
        assert system["requests"] == REQUESTS and system["failed"] == 0, (name, system.get("failed_by_code"))
        assert system["mesh_problems"] == [], system["mesh_problems"]
        assert set(PLANE_KEYS) <= set(system["policy_plane"])
        assert system["remote_bytes"] > 0  # every mesh starts empty: its first requests load from REMOTE
    assert systems["diffmesh"]["policy_plane"]["workers_used"] >= 1
    assert doc["calibration"]["base_remote_over_compute"] >= 2.0
    # traffic time constants follow the stream's compression; workers' queues are short (spills)
    half_life = next(r for r in doc["calibration"]["time_constants"] if r["env"].endswith("COORDINATOR_HALF_LIFE_SECONDS"))
    assert half_life["replay_s"] == pytest.approx(3600 / doc["calibration"]["compression"], rel=1e-4)
    assert doc["mesh"]["worker_max_queue"] == 2
    assert doc["comparison"]["diffmesh_vs_lru"]["latency_mean_pct"] is not None
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "diffmesh vs lru:" in proc.stdout
    assert plot.exists()
    # Every process stopped and no shared memory of the replay's nodes is left behind.
    assert not [s for s in shm_segments() - shm_before if prefix in s]
