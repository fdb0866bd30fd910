"""Contract tests of the instance manager: its real gRPC server in-process, the real
coordinator on a real Redis, real safetensors files and real POSIX shared memory."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from diffmesh.artifacts import artifact_bytes, artifact_sha256
from diffmesh.errors import retry_after_ms
from diffmesh.server import ServerThread
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, instance_manager_pb2, instance_manager_pb2_grpc
from diffmesh_coordinator.app import CoordinatorApp
from diffmesh_coordinator.settings import CoordinatorSettings
from diffmesh_instance_manager.app import InstanceManagerApp
from diffmesh_instance_manager.host import list_segments
from diffmesh_instance_manager.pool import list_pools
from diffmesh_instance_manager.settings import InstanceManagerSettings
from safetensors.numpy import load_file, save_file

DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
BASE = common_pb2.COMPONENT_KIND_BASE
LORA = common_pb2.COMPONENT_KIND_LORA
CONTROLNET = common_pb2.COMPONENT_KIND_CONTROLNET


@dataclass
class Mesh:
    """The coordinator and the artifacts registered with it."""

    coordinator: ServerThread
    stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub
    root: Path
    outside: Path
    paths: dict[str, Path]


def _lora(path: Path, seed: int, rows: int = 8) -> Path:
    rng = np.random.default_rng(seed)
    save_file(
        {
            "unet.down.lora_A.weight": rng.standard_normal((4, rows), dtype=np.float32),
            "unet.down.lora_B.weight": rng.standard_normal((rows, 4), dtype=np.float32),
            "unet.scale": rng.standard_normal(3).astype(np.float16),
        },
        str(path),
        metadata={"format": "pt", "lora_alpha": "4"},
    )
    return path


def _base(folder: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    (folder / "unet").mkdir(parents=True)
    (folder / "tokenizer").mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": 8}))
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (folder / "README.md").write_text("not a config, not loaded")
    save_file(
        {"conv_in.weight": rng.standard_normal((8, 4, 3, 3), dtype=np.float32), "steps": np.arange(6, dtype=np.int64)},
        str(folder / "unet" / "diffusion_pytorch_model.safetensors"),
    )
    return folder


def _register(
    stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub, cid: str, kind: int, uri: str, path: Path, sha: str = ""
) -> None:
    component = common_pb2.Component(
        id=cid,
        kind=kind,  # type: ignore[arg-type]
        family="sd15",
        uri=uri,
        bytes=artifact_bytes(path),
        sha256=sha or artifact_sha256(path),
    )
    stub.RegisterComponent(coordinator_pb2.RegisterComponentRequest(component=component))


@pytest.fixture(scope="module")
def mesh(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("im-artifacts")
    outside = tmp_path_factory.mktemp("im-outside")
    coordinator = ServerThread(CoordinatorApp(CoordinatorSettings(redis_url=redis_url, namespace=f"imt{uuid.uuid4().hex[:8]}:")))
    channel = grpc.insecure_channel(coordinator.address)
    stub = coordinator_pb2_grpc.CacheCoordinatorServiceStub(channel)
    paths: dict[str, Path] = {}

    def add(cid: str, kind: int, path: Path, uri: str | None = None, sha: str = "") -> None:
        paths[cid] = path
        _register(stub, cid, kind, uri or path.as_uri(), path, sha)

    add("base-a", BASE, _base(root / "base-a", 1))
    add("lora-a", LORA, _lora(root / "lora-a.safetensors", 2))
    add("lora-b", LORA, _lora(root / "lora-b.safetensors", 3))
    add("lora-c", LORA, _lora(root / "lora-c.safetensors", 4))
    add("lora-d", LORA, _lora(root / "lora-d.safetensors", 5))
    add("lora-restart", LORA, _lora(root / "lora-restart.safetensors", 6))
    # Bad artifacts, each registered with the digest of its actual bytes unless noted.
    add("lora-badsha", LORA, _lora(root / "lora-badsha.safetensors", 7), sha="0" * 64)
    truncated = _lora(root / "lora-truncated.safetensors", 8)
    truncated.write_bytes(truncated.read_bytes()[:-10])
    add("lora-truncated", LORA, truncated)
    malformed = root / "lora-malformed.safetensors"
    raw = b'{"x": {"dtype": "F32", '
    malformed.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 16)
    add("lora-malformed", LORA, malformed)
    pickled = _base(root / "cn-pickle", 9)
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    add("cn-pickle", CONTROLNET, pickled)
    add("lora-outside", LORA, _lora(outside / "lora-outside.safetensors", 10))
    (root / "sub").mkdir()
    add("lora-dotdot", LORA, root / "lora-a.safetensors", uri=f"file://{root}/sub/../lora-a.safetensors")
    os.symlink(outside / "lora-outside.safetensors", root / "lora-link.safetensors")
    add("lora-symlink", LORA, root / "lora-link.safetensors")
    # Two ~1 MiB LoRAs for the capacity test.
    add("big-1", LORA, _lora(root / "big-1.safetensors", 11, rows=32768))
    add("big-2", LORA, _lora(root / "big-2.safetensors", 12, rows=32768))
    yield Mesh(coordinator, stub, root, outside, paths)
    channel.close()
    coordinator.stop()


@dataclass
class Im:
    """A running instance manager and a client stub."""

    thread: ServerThread
    app: InstanceManagerApp
    stub: instance_manager_pb2_grpc.InstanceManagerServiceStub
    node_id: str


def _start_im(mesh: Mesh | None, ssd_dir: Path, node_id: str | None = None, **overrides: Any) -> tuple[Im, grpc.Channel]:
    node_id = node_id or f"imt-{uuid.uuid4().hex[:8]}"
    overrides.setdefault("allowed_roots", [str(mesh.root)] if mesh else [])
    settings = InstanceManagerSettings(
        node_id=node_id,
        coordinator=mesh.coordinator.address if mesh else "",
        ssd_dir=str(ssd_dir),
        **overrides,
    )
    app = InstanceManagerApp(settings)
    thread = ServerThread(app)
    channel = grpc.insecure_channel(thread.address)
    return Im(thread, app, instance_manager_pb2_grpc.InstanceManagerServiceStub(channel), node_id), channel


@pytest.fixture(scope="module")
def im(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Im]:
    running, channel = _start_im(mesh, tmp_path_factory.mktemp("im-ssd"))
    yield running
    channel.close()
    running.thread.stop()
    assert list_segments(running.node_id) == [], "shared-memory segments leaked after stop"


def _acquire(im: Im, *ids: str, holder: str = "worker-0") -> instance_manager_pb2.AcquireResponse:
    return im.stub.Acquire(instance_manager_pb2.AcquireRequest(component_ids=list(ids), holder=holder), timeout=60)


def _error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value


def _stats(im: Im) -> instance_manager_pb2.StatsResponse:
    return im.stub.Stats(instance_manager_pb2.StatsRequest())


def _tier(stats: instance_manager_pb2.StatsResponse, tier: int) -> instance_manager_pb2.TierStats:
    return next(t for t in stats.tiers if t.tier == tier)


def _state(stats: instance_manager_pb2.StatsResponse, cid: str) -> instance_manager_pb2.ComponentState | None:
    return next((c for c in stats.components if c.component_id == cid), None)


def _segment_bytes(segment: str) -> bytes:
    return Path("/dev/shm", segment).read_bytes()


def _assert_tensors_match(shm_file: instance_manager_pb2.ShmFile, source: Path) -> None:
    blob = _segment_bytes(shm_file.segment)
    region = blob[shm_file.offset : shm_file.offset + shm_file.length]
    assert region == source.read_bytes()
    expected = load_file(str(source))
    assert {t.name for t in shm_file.tensors} == set(expected)
    for t in shm_file.tensors:
        arr = np.frombuffer(blob[t.offset : t.offset + t.length], dtype=DTYPES[t.dtype]).reshape(tuple(t.shape))
        np.testing.assert_array_equal(arr, expected[t.name])


def test_acquire_loads_into_shared_memory_with_a_correct_tensor_index(im: Im, mesh: Mesh) -> None:
    resp = _acquire(im, "lora-a", "base-a")
    assert [h.component_id for h in resp.handles] == ["lora-a", "base-a"]
    assert resp.lease_id
    lora, base = resp.handles
    assert lora.kind == LORA and lora.family == "sd15" and lora.source_tier == common_pb2.TIER_REMOTE
    assert len(lora.files) == 1 and lora.files[0].relpath == ""
    assert lora.files[0].segment.startswith(f"dm_{im.node_id}_")
    assert dict(lora.files[0].metadata) == {"format": "pt", "lora_alpha": "4"}
    _assert_tensors_match(lora.files[0], mesh.paths["lora-a"])
    assert lora.bytes == sum(t.length for t in lora.files[0].tensors)

    assert [f.relpath for f in base.files] == ["unet/diffusion_pytorch_model.safetensors"]
    _assert_tensors_match(base.files[0], mesh.paths["base-a"] / "unet" / "diffusion_pytorch_model.safetensors")
    configs = {c.relpath: c.content for c in base.configs}
    assert set(configs) == {"model_index.json", "unet/config.json", "tokenizer/vocab.json"}
    assert json.loads(configs["unet/config.json"]) == {"sample_size": 8}

    again = _acquire(im, "base-a", holder="worker-1")
    assert again.handles[0].source_tier == common_pb2.TIER_HOST
    assert again.handles[0].files[0].segment == base.files[0].segment
    stats = _stats(im)
    assert stats.node_id == im.node_id
    assert _state(stats, "base-a").leases == 2  # type: ignore[union-attr]
    assert _state(stats, "base-a").tier == common_pb2.TIER_HOST  # type: ignore[union-attr]
    assert _tier(stats, common_pb2.TIER_HOST).hits >= 1
    assert im.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=again.lease_id)).released == 0
    assert im.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=resp.lease_id)).released == 2
    assert _state(_stats(im), "base-a").leases == 0  # type: ignore[union-attr]


def test_concurrent_acquires_of_one_component_fetch_it_once(im: Im, mesh: Mesh) -> None:
    before = _tier(_stats(im), common_pb2.TIER_SSD)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: _acquire(im, "lora-b", holder=f"w{i}"), range(6)))
    segments = {r.handles[0].files[0].segment for r in results}
    assert len(segments) == 1
    after = _tier(_stats(im), common_pb2.TIER_SSD)
    assert after.misses - before.misses == 1
    assert after.loaded_bytes - before.loaded_bytes == mesh.paths["lora-b"].stat().st_size
    for r in results:
        im.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=r.lease_id))


def test_residency_and_node_registration_reach_the_coordinator(im: Im, mesh: Mesh) -> None:
    _acquire(im, "lora-c")
    assert im.thread.call(im.app.reporter.flush())  # type: ignore[union-attr]
    nodes = mesh.stub.ListNodes(coordinator_pb2.ListNodesRequest()).nodes
    node = next(n for n in nodes if n.node_id == im.node_id)
    assert node.instance_manager_address == im.thread.address
    loc = mesh.stub.Locate(coordinator_pb2.LocateRequest(component_ids=["lora-c"])).locations[0]
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
    lease = _acquire(im, "lora-a").lease_id
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
    err = _error(lambda: _acquire(im, "lora-a", cid))
    assert err.code() == code, err.details()
    assert needle in (err.details() or "")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert ("diffmesh-field", "uri") in tuple(err.trailing_metadata() or ())
    stats = _stats(im)
    assert _state(stats, cid) is None or _state(stats, cid).tier == common_pb2.TIER_SSD  # type: ignore[union-attr]
    assert _state(stats, "lora-a").leases == 0  # type: ignore[union-attr]  # the failed Acquire kept no lease
    ok = _acquire(im, "lora-a")
    im.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=ok.lease_id))


def test_sha_mismatch_publishes_nothing(im: Im) -> None:
    _error(lambda: _acquire(im, "lora-badsha"))
    ssd = im.app.settings.ssd_path()
    assert not any("lora-badsha" in p.name for p in (ssd / "objects").iterdir())
    assert list((ssd / "tmp").iterdir()) == []
    assert _state(_stats(im), "lora-badsha") is None


def test_request_errors(im: Im) -> None:
    assert _error(lambda: _acquire(im, "lora-a", holder="")).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _error(lambda: _acquire(im)).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _error(lambda: _acquire(im, *[f"x{i}" for i in range(17)])).code() == grpc.StatusCode.INVALID_ARGUMENT
    missing = _error(lambda: im.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id="nope")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND and "nope" in (missing.details() or "")
    empty = _error(lambda: im.stub.Release(instance_manager_pb2.ReleaseRequest()))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
    gpu = _error(
        lambda: im.stub.Prefetch(instance_manager_pb2.PrefetchRequest(component_ids=["lora-a"], target_tier=common_pb2.TIER_GPU))
    )
    assert gpu.code() == grpc.StatusCode.INVALID_ARGUMENT
    unknown = _error(lambda: im.stub.Prefetch(instance_manager_pb2.PrefetchRequest(component_ids=["ghost"])))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and "ghost" in (unknown.details() or "")
    assert _stats(im).node_id == im.node_id


def _release(im: Im, lease_id: str) -> int:
    return im.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=lease_id)).released


def _nothing_published(im: Im, cid: str) -> None:
    """No SSD object, no temporary file and no tier state of ``cid`` is left behind."""
    ssd = im.app.settings.ssd_path()
    assert not any(p.name.endswith(f"_{cid}") for p in (ssd / "objects").iterdir())
    assert list((ssd / "tmp").iterdir()) == []
    assert _state(_stats(im), cid) is None


def _refused_publishing_nothing(im: Im, cid: str, code: grpc.StatusCode, needle: str) -> None:
    """Acquire of ``cid`` fails with ``code`` and a message containing ``needle``, leaving nothing behind."""
    err = _error(lambda: _acquire(im, cid))
    assert err.code() == code, err.details()
    assert needle in (err.details() or "")
    _nothing_published(im, cid)


def _wait_for(predicate: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_prefetch_to_ssd_then_host(im: Im) -> None:
    req = instance_manager_pb2.PrefetchRequest(component_ids=["lora-d"], target_tier=common_pb2.TIER_SSD)
    assert list(im.stub.Prefetch(req).accepted_ids) == ["lora-d"]
    _wait_for(lambda: _state(_stats(im), "lora-d") is not None, "lora-d on SSD")
    assert _state(_stats(im), "lora-d").tier == common_pb2.TIER_SSD  # type: ignore[union-attr]
    assert list(im.stub.Prefetch(req).accepted_ids) == []
    to_host = instance_manager_pb2.PrefetchRequest(component_ids=["lora-d"])
    assert list(im.stub.Prefetch(to_host).accepted_ids) == ["lora-d"]
    _wait_for(lambda: _state(_stats(im), "lora-d").tier == common_pb2.TIER_HOST, "lora-d in HOST")  # type: ignore[union-attr]
    assert _acquire(im, "lora-d").handles[0].source_tier == common_pb2.TIER_HOST


MIB = 1024 * 1024


def test_full_host_tier_evicts_unleased_copies_or_says_when_to_retry(mesh: Mesh, tmp_path: Path) -> None:
    # Every catalog artifact rounds up to one 2 MiB size class: a 3 MiB pool holds one block.
    small, channel = _start_im(mesh, tmp_path / "ssd", host_capacity_bytes=3 * MIB)
    try:
        first = _acquire(small, "big-1")
        err = _error(lambda: _acquire(small, "big-2"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry_after_ms(err) == 2000
        assert "leased" in (err.details() or "")
        # The HOST tier still serves what it holds, and frees the copy once every lease is gone.
        again = _acquire(small, "big-1", holder="w2")
        assert again.handles[0].source_tier == common_pb2.TIER_HOST
        assert small.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=first.lease_id)).released == 0
        assert small.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=again.lease_id)).released == 1
        # The failed attempt had already verified big-2 into the SSD tier.
        assert _acquire(small, "big-2").handles[0].source_tier == common_pb2.TIER_SSD
    finally:
        channel.close()
        small.thread.stop()
    assert list_segments(small.node_id) == [] and list_pools(small.node_id) == []


def test_eviction_of_released_copies(mesh: Mesh, tmp_path: Path) -> None:
    small, channel = _start_im(mesh, tmp_path / "ssd", host_capacity_bytes=3 * MIB)
    try:
        first = _acquire(small, "big-1")
        assert small.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=first.lease_id)).released == 1
        second = _acquire(small, "big-2")
        _assert_tensors_match(second.handles[0].files[0], mesh.paths["big-2"])
        stats = _stats(small)
        host = _tier(stats, common_pb2.TIER_HOST)
        assert host.evicted_bytes > 0 and host.components == 1
        assert host.used_bytes <= host.capacity_bytes
        assert _state(stats, "big-1").tier == common_pb2.TIER_SSD  # type: ignore[union-attr]
        # The pool's only block was reused in place.
        before, after = first.handles[0].files[0], second.handles[0].files[0]
        assert (after.segment, after.offset) == (before.segment, before.offset)
        assert after.segment in list_pools(small.node_id)
    finally:
        channel.close()
        small.thread.stop()
    assert list_segments(small.node_id) == [] and list_pools(small.node_id) == []


def test_without_coordinator_acquire_fails_precondition_and_stats_serve(tmp_path: Path) -> None:
    lone, channel = _start_im(None, tmp_path / "ssd")
    try:
        err = _error(lambda: _acquire(lone, "lora-a"))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "coordinator" in (err.details() or "")
        assert _stats(lone).node_id == lone.node_id
    finally:
        channel.close()
        lone.thread.stop()


def test_stale_segments_are_removed_at_start_and_ssd_index_survives_restart(mesh: Mesh, tmp_path: Path) -> None:
    node_id = f"imt-{uuid.uuid4().hex[:8]}"
    stale = Path("/dev/shm") / f"dm_{node_id}_{hashlib.sha256(b'x').hexdigest()[:12]}"
    stale.write_bytes(b"left by a crash")
    first, channel = _start_im(mesh, tmp_path / "ssd", node_id=node_id)
    try:
        assert not stale.exists()
        assert _acquire(first, "lora-restart").handles[0].source_tier == common_pb2.TIER_REMOTE
    finally:
        channel.close()
        first.thread.stop()
    assert list_segments(node_id) == []
    second, channel = _start_im(mesh, tmp_path / "ssd", node_id=node_id)
    try:
        assert _state(_stats(second), "lora-restart").tier == common_pb2.TIER_SSD  # type: ignore[union-attr]
        handle = _acquire(second, "lora-restart").handles[0]
        assert handle.source_tier == common_pb2.TIER_SSD
        _assert_tensors_match(handle.files[0], mesh.paths["lora-restart"])
    finally:
        channel.close()
        second.thread.stop()
    assert list_segments(node_id) == []


def test_full_ssd_tier_evicts_copies_nobody_reads(mesh: Mesh, tmp_path: Path) -> None:
    one = mesh.paths["big-1"].stat().st_size
    small, channel = _start_im(mesh, tmp_path / "ssd", ssd_capacity_bytes=one + one // 2)
    try:
        first = _acquire(small, "big-1")
        second = _acquire(small, "big-2")  # HOST is unbounded; SSD drops big-1 (its HOST copy stays)
        _assert_tensors_match(second.handles[0].files[0], mesh.paths["big-2"])
        stats = _stats(small)
        ssd = _tier(stats, common_pb2.TIER_SSD)
        assert ssd.evicted_bytes == one and ssd.components == 1 and ssd.used_bytes <= ssd.capacity_bytes
        assert _state(stats, "big-1").tier == common_pb2.TIER_HOST  # type: ignore[union-attr]
        _assert_tensors_match(first.handles[0].files[0], mesh.paths["big-1"])
    finally:
        channel.close()
        small.thread.stop()
    assert list_segments(small.node_id) == []


def test_process_entry_point_serves_and_drains_on_sigterm(mesh: Mesh, tmp_path: Path) -> None:
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
        "DIFFMESH_IM_COORDINATOR": mesh.coordinator.address,
        "DIFFMESH_IM_SSD_DIR": str(tmp_path / "ssd"),
        "DIFFMESH_IM_ALLOWED_ROOTS": str(mesh.root),
        "DIFFMESH_IM_GRACE_SECONDS": "1",
    }
    proc = subprocess.Popen([sys.executable, "-m", "diffmesh_instance_manager"], env=env, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: port_file.exists() and port_file.read_text().strip(), "the port file")
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
    from diffmesh_instance_manager.remote import RemoteAccess

    _lora(tmp_path / "ok.safetensors", 1)
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
