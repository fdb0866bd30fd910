"""Instance manager tiers: the HOST pool (size classes, utility eviction, pinning, stats),
the bounded SSD tier, lease expiry and the remaining bad inputs — real gRPC servers, the
real coordinator on Redis, real files and real shared memory."""

from __future__ import annotations

import json
import struct
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import pytest
from diffmesh.errors import retry_after_ms
from diffmesh.server import ServerThread
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from diffmesh_coordinator.app import CoordinatorApp
from diffmesh_coordinator.settings import CoordinatorSettings
from diffmesh_instance_manager.host import list_segments
from diffmesh_instance_manager.pool import list_pools

from tests.support.im import (
    LORA,
    Im,
    ImMesh,
    acquire,
    assert_tensors_match,
    component_state,
    im_stats,
    register_component,
    release,
    rpc_error,
    start_im,
    tier_stats,
    write_lora,
)
from tests.support.waiting import wait_for

MIB = 1024 * 1024
HOST = common_pb2.TIER_HOST
SSD = common_pb2.TIER_SSD


def _raw(path: Path, header: Mapping[str, object], data: bytes, declared_len: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if declared_len is None else declared_len) + raw + data)
    return path


@pytest.fixture(scope="module")
def extra(im_mesh: ImMesh) -> ImMesh:
    """Artifacts for this module, registered in the catalog of ``im_mesh``."""
    root = im_mesh.root / "tiers"
    root.mkdir()

    def add(cid: str, path: Path) -> None:
        im_mesh.paths[cid] = path
        register_component(im_mesh.stub, cid, LORA, path.as_uri(), path)

    for i in range(4):
        add(f"pool-{i}", write_lora(root / f"pool-{i}.safetensors", 100 + i))
    f32 = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    add("bad-headerlen", _raw(root / "bad-headerlen.safetensors", f32, b"\0" * 8, declared_len=10_000))
    f128 = {"x": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}
    add("bad-dtype", _raw(root / "bad-dtype.safetensors", f128, b"\0" * 16))
    beyond = {"x": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    add("bad-range", _raw(root / "bad-range.safetensors", beyond, b"\0" * 16))
    overlap = {
        "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    add("bad-overlap", _raw(root / "bad-overlap.safetensors", overlap, b"\0" * 12))
    return im_mesh



@pytest.fixture()
def pool_im(extra: ImMesh, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Im]:
    """An instance manager whose HOST tier is a 5 MiB pool: two 2 MiB blocks (every artifact here rounds to 2 MiB)."""
    overrides = getattr(request, "param", {})
    im, channel = start_im(extra, tmp_path / "ssd", host_capacity_bytes=5 * MIB, **overrides)
    yield im
    channel.close()
    im.thread.stop()
    assert list_segments(im.node_id) == [] and list_pools(im.node_id) == [], "shared memory leaked"


def test_pool_serves_tensors_and_reports_classes_fragmentation_and_bandwidth(pool_im: Im, extra: ImMesh) -> None:
    resp = acquire(pool_im, "pool-0")
    handle = resp.handles[0]
    assert handle.files[0].segment in list_pools(pool_im.node_id)
    assert handle.files[0].offset % (2 * MIB) == 0  # blocks are 2 MiB aligned for O_DIRECT
    assert_tensors_match(handle.files[0], extra.paths["pool-0"])
    stats = im_stats(pool_im)
    assert [(c.block_size, c.blocks, c.used) for c in stats.pool_classes] == [(2 * MIB, 2, 1)]
    wasted = stats.pool_classes[0].wasted_bytes
    assert 0 < wasted < 2 * MIB
    assert stats.fragmentation == pytest.approx(wasted / (2 * MIB))
    assert stats.pool_pinned is False  # no CUDA here
    host, ssd = tier_stats(stats, HOST), tier_stats(stats, SSD)
    assert host.capacity_bytes == 4 * MIB and host.components == 1 and host.misses == 1
    assert host.load_gbps > 0 and ssd.load_gbps > 0
    size = extra.paths["pool-0"].stat().st_size
    assert host.loaded_bytes >= size
    assert host.direct_bytes in (0, size)  # O_DIRECT, or the buffered fallback where the filesystem refuses it
    assert release(pool_im, resp.lease_id) == 1


def test_full_pool_evicts_by_utility_not_recency(pool_im: Im) -> None:
    # pool-0 is asked for three times, pool-1 once and later: LRU would evict pool-0.
    for _ in range(3):
        release(pool_im, acquire(pool_im, "pool-0").lease_id)
    release(pool_im, acquire(pool_im, "pool-1").lease_id)
    third = acquire(pool_im, "pool-2")
    stats = im_stats(pool_im)
    assert component_state(stats, "pool-0").tier == HOST  # type: ignore[union-attr]
    assert component_state(stats, "pool-1").tier == SSD  # type: ignore[union-attr]
    assert tier_stats(stats, HOST).evicted_bytes > 0
    assert acquire(pool_im, "pool-0").handles[0].source_tier == HOST
    release(pool_im, third.lease_id)


@pytest.mark.parametrize("pool_im", [{"pinned_components": ["pool-0", "pool-1"]}], indirect=True)
def test_pinned_and_leased_blocks_are_never_evicted(pool_im: Im) -> None:
    release(pool_im, acquire(pool_im, "pool-0").lease_id)  # unleased but pinned by the hot plan
    leased = acquire(pool_im, "pool-2")  # the other block, leased
    err = rpc_error(lambda: acquire(pool_im, "pool-3"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert retry_after_ms(err) == 2000
    assert "leased, pinned" in (err.details() or "")
    stats = im_stats(pool_im)
    assert component_state(stats, "pool-0").tier == HOST and component_state(stats, "pool-2").tier == HOST  # type: ignore[union-attr]
    # Still serving; once the lease ends its block is reused, the pinned copy stays.
    assert release(pool_im, leased.lease_id) == 1
    assert acquire(pool_im, "pool-3").handles[0].source_tier == SSD
    assert component_state(im_stats(pool_im), "pool-0").tier == HOST  # type: ignore[union-attr]


def test_artifact_larger_than_the_ssd_tier_is_refused_and_nothing_is_published(extra: ImMesh, tmp_path: Path) -> None:
    one = extra.paths["big-1"].stat().st_size
    im, channel = start_im(extra, tmp_path / "ssd", ssd_capacity_bytes=one // 2)
    try:
        err = rpc_error(lambda: acquire(im, "big-1"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert retry_after_ms(err) == 2000 and "SSD" in (err.details() or "")
        ssd = im.app.settings.ssd_path()
        assert list((ssd / "objects").iterdir()) == [] and list((ssd / "tmp").iterdir()) == []
        assert component_state(im_stats(im), "big-1") is None
        release(im, acquire(im, "lora-a").lease_id)  # still serving
    finally:
        channel.close()
        im.thread.stop()


def test_pinned_ssd_copies_are_not_evicted(extra: ImMesh, tmp_path: Path) -> None:
    one = extra.paths["big-1"].stat().st_size
    im, channel = start_im(extra, tmp_path / "ssd", ssd_capacity_bytes=one + one // 2, pinned_components=["big-1"])
    try:
        release(im, acquire(im, "big-1").lease_id)
        err = rpc_error(lambda: acquire(im, "big-2"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert "pinned" in (err.details() or "")
        ssd = im.app.settings.ssd_path()
        assert [p.name.split("_", 1)[1] for p in (ssd / "objects").iterdir()] == ["big-1"]
        assert list((ssd / "tmp").iterdir()) == []
        # Unpinning (the hot plan changed) lets the utility policy evict it.
        im.app.store.set_pinned([])
        assert_tensors_match(acquire(im, "big-2").handles[0].files[0], extra.paths["big-2"])
        assert component_state(im_stats(im), "big-1").tier == HOST  # type: ignore[union-attr]
    finally:
        channel.close()
        im.thread.stop()


def test_leases_of_silent_holders_expire_and_live_workers_keep_theirs(extra: ImMesh, tmp_path: Path) -> None:
    im, channel = start_im(extra, tmp_path / "ssd", lease_ttl_seconds=0.6)
    try:
        assert im.thread.call(im.app.reporter.flush())  # type: ignore[union-attr]
        worker = coordinator_pb2.WorkerInfo(worker_id="live-worker", node_id=im.node_id, address="127.0.0.1:1", device="cpu")
        extra.stub.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(worker=worker))
        ghost = acquire(im, "lora-a", holder="ghost-worker")
        assert ghost.lease_ttl_seconds == pytest.approx(0.6)
        live = acquire(im, "lora-b", holder="live-worker")
        wait_for(lambda: component_state(im_stats(im), "lora-a").leases == 0, "the ghost's lease to expire")  # type: ignore[union-attr]
        assert rpc_error(lambda: release(im, ghost.lease_id)).code() == grpc.StatusCode.NOT_FOUND
        time.sleep(1.5)  # well past the TTL: the live worker's lease is renewed by its coordinator lease
        assert component_state(im_stats(im), "lora-b").leases == 1  # type: ignore[union-attr]
        assert release(im, live.lease_id) == 1
    finally:
        channel.close()
        im.thread.stop()


@pytest.mark.parametrize(
    ("cid", "needle"),
    [
        ("bad-headerlen", "header too long"),
        ("bad-dtype", "unknown dtype"),
        ("bad-range", "offsets out of range"),
        ("bad-overlap", "overlapping offsets"),
    ],
)
def test_corrupt_safetensors_are_refused_and_the_service_keeps_serving(pool_im: Im, cid: str, needle: str) -> None:
    err = rpc_error(lambda: acquire(pool_im, cid))
    assert err.code() == grpc.StatusCode.DATA_LOSS, err.details()
    assert needle in (err.details() or "")
    stats = im_stats(pool_im)
    assert component_state(stats, cid) is None or component_state(stats, cid).tier == SSD  # type: ignore[union-attr]
    assert all(c.used == 0 for c in stats.pool_classes)  # no block was kept
    release(pool_im, acquire(pool_im, "pool-0").lease_id)


def test_pool_size_classes_follow_the_request_shares_recorded_at_the_coordinator(redis_url: str, tmp_path: Path) -> None:
    """Two tiny LoRAs and one 3.2 MB LoRA, k=2, a 24 MiB pool: classes of 2 and 4 MiB blocks.

    Equal weights (no requests yet) split the pool 12/12 MiB: 6 small and 3 large blocks.
    After 50 recorded requests of the large one its weight is 0.9 + 0.1/3 (the prior keeps
    every component some share), so the split is ∝ (0.067 x 2, 0.933 x 4): 5 large blocks,
    and the small class its floor of one block plus the 2 MiB left over.
    """
    coordinator = ServerThread(CoordinatorApp(CoordinatorSettings(redis_url=redis_url, namespace=f"imw{uuid.uuid4().hex[:8]}:")))
    channel = grpc.insecure_channel(coordinator.address)
    stub = coordinator_pb2_grpc.CacheCoordinatorServiceStub(channel)
    try:
        paths = {f"w-small-{i}": write_lora(tmp_path / f"s{i}.safetensors", 200 + i) for i in range(2)}
        paths["w-large"] = write_lora(tmp_path / "large.safetensors", 210, rows=100_000)
        for cid, path in paths.items():
            register_component(stub, cid, LORA, path.as_uri(), path)
        catalog = ImMesh(coordinator, stub, tmp_path, tmp_path, paths)

        def classes() -> list[tuple[int, int]]:
            im, im_channel = start_im(catalog, tmp_path / "ssd", host_capacity_bytes=24 * MIB, pool_classes=2)
            try:
                assert release(im, acquire(im, "w-large").lease_id) == 1  # the large block class serves
                return [(c.block_size, c.blocks) for c in im_stats(im).pool_classes]
            finally:
                im_channel.close()
                im.thread.stop()

        assert classes() == [(2 * MIB, 6), (4 * MIB, 3)]
        records = [
            coordinator_pb2.RequestRecord(request_id=f"w{i}", pipeline_key="w-large||", component_ids=["w-large"])
            for i in range(50)
        ]
        stub.RecordRequests(coordinator_pb2.RecordRequestsRequest(records=records), timeout=10)
        assert classes() == [(2 * MIB, 2), (4 * MIB, 5)]
    finally:
        channel.close()
        coordinator.stop()
