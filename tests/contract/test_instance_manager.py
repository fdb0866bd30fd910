"""Contract tests of the instance manager: its real gRPC server in-process, the real
coordinator on a real Redis, real safetensors files and real POSIX shared memory."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from diffmesh.errors import retry_after_ms
from diffmesh.v1 import common_pb2, coordinator_pb2, instance_manager_pb2, instance_manager_pb2_grpc
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
    rpc_error,
    start_im,
    tier_stats,
    write_lora,
)
from tests.support.waiting import wait_for


@pytest.fixture(scope="module")
def im(im_mesh: ImMesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Im]:
    running, channel = start_im(im_mesh, tmp_path_factory.mktemp("im-ssd"))
    yield running
    channel.close()
    running.thread.stop()
    assert list_segments(running.node_id) == [], "shared-memory segments leaked after stop"


def test_acquire_loads_into_shared_memory_with_a_correct_tensor_index(im: Im, im_mesh: ImMesh) -> None:
    resp = acquire(im, "lora-a", "base-a")
    assert [h.component_id for h in resp.handles] == ["lora-a", "base-a"]
    assert resp.lease_id
    lora, base = resp.handles
    assert lora.kind == LORA and lora.family == "sd15" and lora.source_tier == common_pb2.TIER_REMOTE
    assert len(lora.files) == 1 and lora.files[0].relpath == ""
    assert lora.files[0].segment.startswith(f"dm_{im.node_id}_")
    assert dict(lora.files[0].metadata) == {"format": "pt", "lora_alpha": "4"}
    assert_tensors_match(lora.files[0], im_mesh.paths["lora-a"])
    assert lora.bytes == sum(t.length for t in lora.files[0].tensors)

    assert [f.relpath for f in base.files] == ["unet/diffusion_pytorch_model.safetensors"]
    assert_tensors_match(base.files[0], im_mesh.paths["base-a"] / "unet" / "diffusion_pytorch_model.safetensors")
    configs = {c.relpath: c.content for c in base.configs}
    assert set(configs) == {"model_index.json", "unet/config.json", "tokenizer/vocab.json"}
    assert json.loads(configs["unet/config.json"]) == {"sample_size": 8}

    again = acquire(im, "base-a", holder="worker-1")
    assert again.handles[0].source_tier == common_pb2.TIER_HOST
    assert again.handles[0].files[0].segment == base.files[0].segment
    stats = im_stats(im)
    assert stats.node_id == im.node_id
    assert component_state(stats, "base-a").leases == 2  # type: ignore[union-attr]
    assert component_state(stats, "base-a").tier == common_pb2.TIER_HOST  # type: ignore[union-attr]
    assert tier_stats(stats, common_pb2.TIER_HOST).hits >= 1
    assert im.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=again.lease_id)).released == 0
    assert im.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=resp.lease_id)).released == 2
    assert component_state(im_stats(im), "base-a").leases == 0  # type: ignore[union-attr]


def test_concurrent_acquires_of_one_component_fetch_it_once(im: Im, im_mesh: ImMesh) -> None:
    before = tier_stats(im_stats(im), common_pb2.TIER_SSD)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: acquire(im, "lora-b", holder=f"w{i}"), range(6)))
    segments = {r.handles[0].files[0].segment for r in results}
    assert len(segments) == 1
    after = tier_stats(im_stats(im), common_pb2.TIER_SSD)
    assert after.misses - before.misses == 1
    assert after.loaded_bytes - before.loaded_bytes == im_mesh.paths["lora-b"].stat().st_size
    for r in results:
        im.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=r.lease_id))


def test_residency_and_node_registration_reach_the_coordinator(im: Im, im_mesh: ImMesh) -> None:
    acquire(im, "lora-c")
    assert im.thread.call(im.app.reporter.flush())  # type: ignore[union-attr]
    nodes = im_mesh.stub.ListNodes(coordinator_pb2.ListNodesRequest()).nodes
    node = next(n for n in nodes if n.node_id == im.node_id)
    assert node.instance_manager_address == im.thread.address
    loc = im_mesh.stub.Locate(coordinator_pb2.LocateRequest(component_ids=["lora-c"])).locations[0]
    tiers = {r.tier for r in loc.residencies if r.node_id == im.node_id}
    assert tiers == {common_pb2.TIER_SSD, common_pb2.TIER_HOST}


def test_acquire_component_span_is_recorded(im: Im) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    lease = acquire(im, "lora-a").lease_id
    im.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=lease))
    spans = [s for s in exporter.get_finished_spans() if s.name == "im.acquire.component"]
    assert spans, "no im.acquire.component span"
    attrs = dict(spans[-1].attributes or {})
    assert attrs["component_id"] == "lora-a"
    assert attrs["source_tier"] in ("TIER_HOST", "TIER_SSD", "TIER_REMOTE")
    assert isinstance(attrs["bytes"], int) and attrs["bytes"] > 0


@pytest.mark.parametrize(
    ("cid", "code", "needle"),
    [
        ("no-such-model", grpc.StatusCode.NOT_FOUND, "no-such-model"),
        ("lora-badsha", grpc.StatusCode.DATA_LOSS, "sha256 mismatch"),
        ("lora-truncated", grpc.StatusCode.DATA_LOSS, "not a valid safetensors file"),
        ("lora-malformed", grpc.StatusCode.DATA_LOSS, "malformed header"),
        ("cn-pickle", grpc.StatusCode.INVALID_ARGUMENT, "pickle"),
        ("lora-outside", grpc.StatusCode.PERMISSION_DENIED, "outside the allowed roots"),
        ("lora-symlink", grpc.StatusCode.PERMISSION_DENIED, "outside the allowed roots"),
        ("lora-dotdot", grpc.StatusCode.INVALID_ARGUMENT, "'..'"),
    ],
)
def test_bad_artifacts_are_refused_and_the_service_keeps_serving(im: Im, cid: str, code: grpc.StatusCode, needle: str) -> None:
    err = rpc_error(lambda: acquire(im, "lora-a", cid))
    assert err.code() == code, err.details()
    assert needle in (err.details() or "")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert ("diffmesh-field", "uri") in tuple(err.trailing_metadata() or ())
    stats = im_stats(im)
    assert component_state(stats, cid) is None or component_state(stats, cid).tier == common_pb2.TIER_SSD  # type: ignore[union-attr]
    assert component_state(stats, "lora-a").leases == 0  # type: ignore[union-attr]  # the failed Acquire kept no lease
    ok = acquire(im, "lora-a")
    im.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=ok.lease_id))


def test_sha_mismatch_publishes_nothing(im: Im) -> None:
    rpc_error(lambda: acquire(im, "lora-badsha"))
    ssd = im.app.settings.ssd_path()
    assert not any("lora-badsha" in p.name for p in (ssd / "objects").iterdir())
    assert list((ssd / "tmp").iterdir()) == []
    assert component_state(im_stats(im), "lora-badsha") is None


def test_request_errors(im: Im) -> None:
    assert rpc_error(lambda: acquire(im, "lora-a", holder="")).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error(lambda: acquire(im)).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error(lambda: acquire(im, *[f"x{i}" for i in range(17)])).code() == grpc.StatusCode.INVALID_ARGUMENT
    missing = rpc_error(lambda: im.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id="nope")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND and "nope" in (missing.details() or "")
    empty = rpc_error(lambda: im.stub.Release(instance_manager_pb2.ReleaseRequest()))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
    gpu = rpc_error(
        lambda: im.stub.Prefetch(instance_manager_pb2.PrefetchRequest(component_ids=["lora-a"], target_tier=common_pb2.TIER_GPU))
    )
    assert gpu.code() == grpc.StatusCode.INVALID_ARGUMENT
    unknown = rpc_error(lambda: im.stub.Prefetch(instance_manager_pb2.PrefetchRequest(component_ids=["ghost"])))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and "ghost" in (unknown.details() or "")
    assert im_stats(im).node_id == im.node_id


def test_prefetch_to_ssd_then_host(im: Im) -> None:
    req = instance_manager_pb2.PrefetchRequest(component_ids=["lora-d"], target_tier=common_pb2.TIER_SSD)
    assert list(im.stub.Prefetch(req).accepted_ids) == ["lora-d"]
    wait_for(lambda: component_state(im_stats(im), "lora-d") is not None, "lora-d on SSD")
    assert component_state(im_stats(im), "lora-d").tier == common_pb2.TIER_SSD  # type: ignore[union-attr]
    assert list(im.stub.Prefetch(req).accepted_ids) == []
    to_host = instance_manager_pb2.PrefetchRequest(component_ids=["lora-d"])
    assert list(im.stub.Prefetch(to_host).accepted_ids) == ["lora-d"]
    wait_for(lambda: component_state(im_stats(im), "lora-d").tier == common_pb2.TIER_HOST, "lora-d in HOST")  # type: ignore[union-attr]
    assert acquire(im, "lora-d").handles[0].source_tier == common_pb2.TIER_HOST


MIB = 1024 * 1024


def test_full_host_tier_evicts_unleased_copies_or_says_when_to_retry(im_mesh: ImMesh, tmp_path: Path) -> None:
    # Every catalog artifact rounds up to one 2 MiB size class: a 3 MiB pool holds one block.
    small, channel = start_im(im_mesh, tmp_path / "ssd", host_capacity_bytes=3 * MIB)
    try:
        first = acquire(small, "big-1")
        err = rpc_error(lambda: acquire(small, "big-2"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry_after_ms(err) == 2000
        assert "leased" in (err.details() or "")
        # The HOST tier still serves what it holds, and frees the copy once every lease is gone.
        again = acquire(small, "big-1", holder="w2")
        assert again.handles[0].source_tier == common_pb2.TIER_HOST
        assert small.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=first.lease_id)).released == 0
        assert small.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=again.lease_id)).released == 1
        # The failed attempt had already verified big-2 into the SSD tier.
        assert acquire(small, "big-2").handles[0].source_tier == common_pb2.TIER_SSD
    finally:
        channel.close()
        small.thread.stop()
    assert list_segments(small.node_id) == [] and list_pools(small.node_id) == []


def test_eviction_of_released_copies(im_mesh: ImMesh, tmp_path: Path) -> None:
    small, channel = start_im(im_mesh, tmp_path / "ssd", host_capacity_bytes=3 * MIB)
    try:
        first = acquire(small, "big-1")
        assert small.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=first.lease_id)).released == 1
        second = acquire(small, "big-2")
        assert_tensors_match(second.handles[0].files[0], im_mesh.paths["big-2"])
        stats = im_stats(small)
        host = tier_stats(stats, common_pb2.TIER_HOST)
        assert host.evicted_bytes > 0 and host.components == 1
        assert host.used_bytes <= host.capacity_bytes
        assert component_state(stats, "big-1").tier == common_pb2.TIER_SSD  # type: ignore[union-attr]
        # The pool's only block was reused in place.
        before, after = first.handles[0].files[0], second.handles[0].files[0]
        assert (after.segment, after.offset) == (before.segment, before.offset)
        assert after.segment in list_pools(small.node_id)
    finally:
        channel.close()
        small.thread.stop()
    assert list_segments(small.node_id) == [] and list_pools(small.node_id) == []


def test_without_coordinator_acquire_fails_precondition_and_stats_serve(tmp_path: Path) -> None:
    lone, channel = start_im(None, tmp_path / "ssd")
    try:
        err = rpc_error(lambda: acquire(lone, "lora-a"))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "coordinator" in (err.details() or "")
        assert im_stats(lone).node_id == lone.node_id
    finally:
        channel.close()
        lone.thread.stop()


def test_stale_segments_are_removed_at_start_and_ssd_index_survives_restart(im_mesh: ImMesh, tmp_path: Path) -> None:
    node_id = f"imt-{uuid.uuid4().hex[:8]}"
    stale = Path("/dev/shm") / f"dm_{node_id}_{hashlib.sha256(b'x').hexdigest()[:12]}"
    stale.write_bytes(b"left by a crash")
    first, channel = start_im(im_mesh, tmp_path / "ssd", node_id=node_id)
    try:
        assert not stale.exists()
        assert acquire(first, "lora-restart").handles[0].source_tier == common_pb2.TIER_REMOTE
    finally:
        channel.close()
        first.thread.stop()
    assert list_segments(node_id) == []
    second, channel = start_im(im_mesh, tmp_path / "ssd", node_id=node_id)
    try:
        assert component_state(im_stats(second), "lora-restart").tier == common_pb2.TIER_SSD  # type: ignore[union-attr]
        handle = acquire(second, "lora-restart").handles[0]
        assert handle.source_tier == common_pb2.TIER_SSD
        assert_tensors_match(handle.files[0], im_mesh.paths["lora-restart"])
    finally:
        channel.close()
        second.thread.stop()
    assert list_segments(node_id) == []


def test_full_ssd_tier_evicts_copies_nobody_reads(im_mesh: ImMesh, tmp_path: Path) -> None:
    one = im_mesh.paths["big-1"].stat().st_size
    small, channel = start_im(im_mesh, tmp_path / "ssd", ssd_capacity_bytes=one + one // 2)
    try:
        first = acquire(small, "big-1")
        second = acquire(small, "big-2")  # HOST is unbounded; SSD drops big-1 (its HOST copy stays)
        assert_tensors_match(second.handles[0].files[0], im_mesh.paths["big-2"])
        stats = im_stats(small)
        ssd = tier_stats(stats, common_pb2.TIER_SSD)
        assert ssd.evicted_bytes == one and ssd.components == 1 and ssd.used_bytes <= ssd.capacity_bytes
        assert component_state(stats, "big-1").tier == common_pb2.TIER_HOST  # type: ignore[union-attr]
        assert_tensors_match(first.handles[0].files[0], im_mesh.paths["big-1"])
    finally:
        channel.close()
        small.thread.stop()
    assert list_segments(small.node_id) == []


def test_process_entry_point_serves_and_drains_on_sigterm(im_mesh: ImMesh, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    node_id = f"imt-{uuid.uuid4().hex[:8]}"
    port_file = tmp_path / "port"
    env = {
        **os.environ,
        "DIFFMESH_IM_NODE_ID": node_id,
        "DIFFMESH_IM_HOST": "127.0.0.1",
        "DIFFMESH_IM_PORT_FILE": str(port_file),
        "DIFFMESH_IM_COORDINATOR": im_mesh.coordinator.address,
        "DIFFMESH_IM_SSD_DIR": str(tmp_path / "ssd"),
        "DIFFMESH_IM_ALLOWED_ROOTS": str(im_mesh.root),
        "DIFFMESH_IM_GRACE_SECONDS": "1",
    }
    proc = subprocess.Popen([sys.executable, "-m", "diffmesh_instance_manager"], env=env, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), "the port file")
        with grpc.insecure_channel(f"127.0.0.1:{port_file.read_text().strip()}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = instance_manager_pb2_grpc.InstanceManagerServiceStub(channel)
            req = instance_manager_pb2.AcquireRequest(component_ids=["lora-a"], holder="w")
            handle = stub.Acquire(req, timeout=60).handles[0]
            assert list_segments(node_id) == [handle.files[0].segment]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr.decode()[-2000:]
        assert b"leaked shared_memory" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list_segments(node_id) == []


def test_remote_access_rules_that_the_catalog_cannot_express(tmp_path: Path) -> None:
    """URIs the coordinator already refuses at registration are refused by the IM as well."""
    from diffmesh.errors import InvalidArgument, NotFound, PermissionDenied
    from diffmesh_instance_manager.remote_access import RemoteAccess

    write_lora(tmp_path / "ok.safetensors", 1)
    access = RemoteAccess([f"file://{tmp_path}"])
    assert access.resolve("c", (tmp_path / "ok.safetensors").as_uri()).path == tmp_path / "ok.safetensors"
    assert access.resolve("c", str(tmp_path / "ok.safetensors")).is_dir is False
    for uri, exc in [
        (f"file://{tmp_path}/model.ckpt", InvalidArgument),
        (f"file://{tmp_path}/weights.pt", InvalidArgument),
        (f"file://{tmp_path}/a/%2e%2e/ok.safetensors", InvalidArgument),
        (f"file://otherhost{tmp_path}/ok.safetensors", InvalidArgument),
        ("relative/ok.safetensors", InvalidArgument),
        ("https://example.com/ok.safetensors", PermissionDenied),
        ("s3://bucket/ok.safetensors", PermissionDenied),
        ("file:///etc/passwd", PermissionDenied),
        (f"file://{tmp_path}/missing.safetensors", NotFound),
    ]:
        with pytest.raises(exc):
            access.resolve("c", uri)
    with pytest.raises(PermissionDenied):
        RemoteAccess([]).resolve("c", (tmp_path / "ok.safetensors").as_uri())
