"""The local mesh's topology and environment (nodes x workers, per-role env), checked on the specs it would start."""

from __future__ import annotations

import json
from pathlib import Path

from diffmesh.launcher.mesh import LocalMesh, MeshConfig


def _specs(config: MeshConfig) -> dict[str, dict[str, str]]:
    """Name → environment of every service the mesh would start (nothing is started)."""
    mesh = LocalMesh(config)
    mesh.catalog_path = config.models_dir / "catalog.json"
    out = {"coordinator": mesh._coordinator_spec().env}
    index = 0
    for node_id in config.node_ids():
        im = mesh._im_spec("127.0.0.1:1", node_id)
        out[im.name] = im.env
        for _ in range(config.workers):
            index += 1
            worker = mesh._worker_spec(index, "127.0.0.1:1", im.address, node_id)
            out[worker.name] = worker.env
    out["router"] = mesh._router_spec("127.0.0.1:1").env
    return out


def test_one_node_keeps_the_names_diffmesh_run_uses(tmp_path: Path) -> None:
    config = MeshConfig(run_dir=tmp_path, models_dir=tmp_path / "models", workers=2)
    assert config.node_ids() == ["node-1"] and config.total_workers == 2
    specs = _specs(config)
    assert sorted(specs) == ["coordinator", "instance-manager", "router", "worker-1", "worker-2"]
    im = specs["instance-manager"]
    assert im["DIFFMESH_IM_SSD_DIR"] == str(tmp_path / "ssd")
    assert json.loads(im["DIFFMESH_IM_ALLOWED_ROOTS"]) == [str((tmp_path / "models").resolve())]
    assert "DIFFMESH_IM_SSD_CAPACITY_BYTES" not in im and "DIFFMESH_WORKER_CACHE_BYTES" not in specs["worker-1"]


def test_nodes_times_workers_with_their_own_dirs_and_role_env(tmp_path: Path) -> None:
    config = MeshConfig(
        run_dir=tmp_path,
        models_dir=tmp_path / "models",
        workers=2,
        nodes=2,
        node_prefix="rp",
        ssd_capacity_bytes=1000,
        worker_cache_bytes=500,
        allowed_roots=["http://127.0.0.1:9/"],
        env={"DIFFMESH_POLICY": "lru"},
        service_env={"worker": {"DIFFMESH_WORKER_TORCH_THREADS": "1"}, "coordinator": {"DIFFMESH_COORDINATOR_PLAN_SECONDS": "1"}},
    )
    assert config.node_ids() == ["rp-1", "rp-2"] and config.total_workers == 4
    specs = _specs(config)
    assert sorted(specs) == [
        "coordinator", "instance-manager-rp-1", "instance-manager-rp-2", "router", "worker-1", "worker-2", "worker-3", "worker-4",
    ]
    assert [specs[f"worker-{i}"]["DIFFMESH_WORKER_NODE_ID"] for i in range(1, 5)] == ["rp-1", "rp-1", "rp-2", "rp-2"]
    assert specs["instance-manager-rp-2"]["DIFFMESH_IM_SSD_DIR"] == str(tmp_path / "ssd" / "rp-2")
    assert specs["instance-manager-rp-1"]["DIFFMESH_IM_SSD_CAPACITY_BYTES"] == "1000"
    assert json.loads(specs["instance-manager-rp-1"]["DIFFMESH_IM_ALLOWED_ROOTS"]) == ["http://127.0.0.1:9/"]
    assert all(specs[f"worker-{i}"]["DIFFMESH_WORKER_TORCH_THREADS"] == "1" for i in range(1, 5))
    assert specs["worker-3"]["DIFFMESH_WORKER_CACHE_BYTES"] == "500"
    assert specs["coordinator"]["DIFFMESH_COORDINATOR_PLAN_SECONDS"] == "1"
    assert "DIFFMESH_COORDINATOR_PLAN_SECONDS" not in specs["router"]
    mesh = LocalMesh(config)
    assert mesh._base_env()["DIFFMESH_POLICY"] == "lru"  # every service
