"""Fuse: LoRAs merged into a base as a FUSED overlay component in the SSD and HOST tiers,
registered with the real coordinator; the demo models' real diffusers files."""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from diffmesh.pipeline_key import canonical_key, fused_id
from diffmesh.server import ServerThread
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, instance_manager_pb2, plan_pb2
from diffmesh_coordinator.app import CoordinatorApp
from diffmesh_coordinator.settings import CoordinatorSettings
from diffmesh_instance_manager.lora_merge import fuse
from diffmesh_instance_manager.overlay_file import META_BASE, META_LORAS
from diffmesh_instance_manager.pool import list_pools
from safetensors import safe_open
from safetensors.torch import load_file

from tests.support.im import Im, ImMesh, apply_plan, component_state, host_resident, im_stats, rpc_error, start_im
from tests.support.waiting import wait_for

MIB = 1024 * 1024
BASE_ID = "sd15-tiny-a"
LORAS = [("lora-ink", 0.8), ("lora-pastel", -0.5)]


@pytest.fixture(scope="module")
def demo_mesh(redis_url: str, demo_models: Path) -> Iterator[ImMesh]:
    coordinator = ServerThread(
        CoordinatorApp(
            CoordinatorSettings(
                redis_url=redis_url, namespace=f"imf{uuid.uuid4().hex[:8]}:", catalog=str(demo_models / "catalog.json")
            )
        )
    )
    channel = grpc.insecure_channel(coordinator.address)
    yield ImMesh(coordinator, coordinator_pb2_grpc.CacheCoordinatorServiceStub(channel), demo_models, demo_models, {})
    channel.close()
    coordinator.stop()


@pytest.fixture(scope="module")
def im(demo_mesh: ImMesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Im]:
    running, channel = start_im(demo_mesh, tmp_path_factory.mktemp("im-fuse-ssd"), host_capacity_bytes=64 * MIB)
    yield running
    channel.close()
    running.thread.stop()
    assert list_pools(running.node_id) == []


def _fuse(im: Im, loras: list[tuple[str, float]] = LORAS, **kw: str) -> instance_manager_pb2.FuseResponse:
    req = instance_manager_pb2.FuseRequest(
        base_id=kw.pop("base_id", BASE_ID), loras=[common_pb2.LoraRef(id=i, scale=s) for i, s in loras], **kw
    )
    return im.stub.Fuse(req, timeout=120)


def _artifact(demo_mesh: ImMesh, cid: str) -> Path:
    rec = demo_mesh.stub.GetComponent(coordinator_pb2.GetComponentRequest(id=cid)).component
    return Path(rec.uri.removeprefix("file://"))


def test_fuse_stores_an_overlay_of_exactly_the_merged_tensors(im: Im, demo_mesh: ImMesh) -> None:
    resp = _fuse(im, holder="worker-f")
    rec, handle = resp.component, resp.handle
    expected_id = "fused-" + hashlib.sha256(canonical_key(BASE_ID, LORAS).encode()).hexdigest()[:20]
    assert rec.id == expected_id and handle.component_id == expected_id
    assert rec.kind == common_pb2.COMPONENT_KIND_FUSED and rec.base_id == BASE_ID and rec.family == "sd15"
    assert handle.kind == common_pb2.COMPONENT_KIND_FUSED and handle.base_id == BASE_ID
    assert resp.created and resp.lease_id
    assert json.loads(rec.labels["diffmesh.loras"]) == [{"id": i, "scale": s} for i, s in LORAS]

    # The overlay equals fuse() over the artifacts' files, and holds only the touched tensors.
    base_dir = _artifact(demo_mesh, BASE_ID)
    base = load_file(str(base_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    inputs = []
    for lid, scale in LORAS:
        path = _artifact(demo_mesh, lid)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        inputs.append((load_file(str(path)), meta, scale))
    expected = fuse(base, inputs)
    (shm_file,) = handle.files
    assert dict(shm_file.metadata)[META_BASE] == BASE_ID
    assert [(d["id"], d["scale"]) for d in json.loads(dict(shm_file.metadata)[META_LORAS])] == [
        (i, pytest.approx(s)) for i, s in LORAS
    ]
    assert {t.name for t in shm_file.tensors} == set(expected)
    assert 0 < len(expected) < len(base)
    blob = Path("/dev/shm", shm_file.segment).read_bytes()
    for t in shm_file.tensors:
        got = np.frombuffer(blob[t.offset : t.offset + t.length], dtype=np.float32).reshape(tuple(t.shape))
        assert torch.equal(torch.from_numpy(got.copy()), expected[t.name]), t.name
        assert not torch.equal(expected[t.name], base[t.name])

    # Registered with the coordinator, resident in SSD and HOST, leased to the holder.
    stored = demo_mesh.stub.GetComponent(coordinator_pb2.GetComponentRequest(id=rec.id)).component
    assert stored.kind == common_pb2.COMPONENT_KIND_FUSED and stored.sha256 == rec.sha256
    state = component_state(im_stats(im), rec.id)
    assert state is not None and state.tier == common_pb2.TIER_HOST and state.leases == 1
    assert im.thread.call(im.app.reporter.flush())  # type: ignore[union-attr]
    loc = demo_mesh.stub.Locate(coordinator_pb2.LocateRequest(component_ids=[rec.id])).locations[0]
    assert {r.tier for r in loc.residencies if r.node_id == im.node_id} == {common_pb2.TIER_SSD, common_pb2.TIER_HOST}

    # Asking again (in another order, scales equal to two decimals) reuses the overlay; Acquire serves it.
    again = _fuse(im, [(i, s + 0.001) for i, s in reversed(LORAS)])
    assert not again.created and not again.lease_id
    assert (again.handle.files[0].segment, again.handle.files[0].offset) == (shm_file.segment, shm_file.offset)
    acq = im.stub.Acquire(instance_manager_pb2.AcquireRequest(component_ids=[rec.id], holder="w2"))
    assert acq.handles[0].source_tier == common_pb2.TIER_HOST
    for lease in (resp.lease_id, acq.lease_id):
        im.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=lease))


@pytest.mark.parametrize(
    ("kw", "loras", "code", "needle"),
    [
        ({"base_id": "lora-ink"}, [("lora-pastel", 1.0)], grpc.StatusCode.INVALID_ARGUMENT, "not a BASE"),
        ({}, [("sd15-tiny-b", 1.0)], grpc.StatusCode.INVALID_ARGUMENT, "not a LORA"),
        ({}, [("lora-ink", math.nan)], grpc.StatusCode.INVALID_ARGUMENT, "finite"),
        ({}, [("lora-ink", 5.0)], grpc.StatusCode.INVALID_ARGUMENT, "finite within"),
        ({}, [("lora-ink", 1.0), ("lora-ink", 0.5)], grpc.StatusCode.INVALID_ARGUMENT, "twice"),
        ({}, [], grpc.StatusCode.INVALID_ARGUMENT, "LoRAs are required"),
        ({}, [("no-such-lora", 1.0)], grpc.StatusCode.NOT_FOUND, "no-such-lora"),
        ({"fused_id": "lora-neon"}, [("lora-ink", 1.0)], grpc.StatusCode.INVALID_ARGUMENT, "another catalog component"),
        ({"fused_id": "bad id|x"}, [("lora-ink", 1.0)], grpc.StatusCode.INVALID_ARGUMENT, "fused_id"),
    ],
)
def test_bad_fuse_requests_are_refused_and_the_service_keeps_serving(
    im: Im, kw: dict[str, str], loras: list[tuple[str, float]], code: grpc.StatusCode, needle: str
) -> None:
    err = rpc_error(lambda: _fuse(im, loras, **kw))
    assert err.code() == code, err.details()
    assert needle in (err.details() or "")
    assert all(c.leases == 0 or c.component_id.startswith("fused-") for c in im_stats(im).components)
    assert _fuse(im, [("lora-sketch", 0.3)]).component.kind == common_pb2.COMPONENT_KIND_FUSED


def test_fuse_without_a_coordinator_fails_precondition(tmp_path: Path) -> None:
    lone, channel = start_im(None, tmp_path / "ssd")
    try:
        err = rpc_error(lambda: _fuse(lone))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        channel.close()
        lone.thread.stop()


def test_worker_runs_the_overlay_without_touching_the_base(im: Im, demo_mesh: ImMesh) -> None:
    from diffmesh_worker.assemble import DevicePlacement, build_base
    from diffmesh_worker.overlay_reader import fused_unet
    from diffmesh_worker.shm_mapping import SegmentMapper

    fused = _fuse(im, [("lora-neon", 0.7)], holder="worker-o")
    acq = im.stub.Acquire(instance_manager_pb2.AcquireRequest(component_ids=[BASE_ID], holder="worker-o"))
    mapper = SegmentMapper()
    placement = DevicePlacement.for_device("cpu")
    base = build_base(mapper, acq.handles[0], placement)
    before = {n: p.detach().clone() for n, p in base.unet.named_parameters()}
    unet = fused_unet(mapper, base, fused.handle, placement)

    path = _artifact(demo_mesh, "lora-neon")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    base_sd = {n: p.detach() for n, p in base.unet.named_parameters()}
    expected = fuse(base_sd, [(load_file(str(path)), meta, 0.7)])
    shared = 0
    for name, param in unet.named_parameters():
        if name in expected:
            assert torch.equal(param, expected[name]), name
            assert param.data_ptr() != base_sd[name].data_ptr()
        else:
            assert param.data_ptr() == base_sd[name].data_ptr(), name  # the base's tensor, not a copy
            shared += 1
    assert shared > 0 and expected
    for name, param in base.unet.named_parameters():
        assert torch.equal(param, before[name]), f"the base UNet changed: {name}"
    with pytest.raises(Exception, match="not a FUSED"):
        fused_unet(mapper, base, acq.handles[0], placement)
    mapper.forget_all()
    for lease in (fused.lease_id, acq.lease_id):
        im.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=lease))


def _overlay_bytes(handle: instance_manager_pb2.HostHandle) -> bytes:
    (shm_file,) = handle.files
    return Path("/dev/shm", shm_file.segment).read_bytes()[shm_file.offset : shm_file.offset + shm_file.length]


def test_the_overlay_is_an_ssd_copy_bounded_like_any_other(im: Im) -> None:
    resp = _fuse(im, [("lora-neon", 0.25)])
    rec = resp.component
    ssd_dir = im.app.settings.ssd_path()
    path = Path(rec.uri.removeprefix("file://"))
    assert path.parent == ssd_dir / "objects" and path.stat().st_size == rec.bytes  # one copy, in the SSD tier
    assert not (ssd_dir / "derived").exists()
    entry = im.app.store.ssd_entries[rec.id]
    assert entry.kind == common_pb2.COMPONENT_KIND_FUSED and entry.sha256 == rec.sha256
    ssd = next(t for t in im_stats(im).tiers if t.tier == common_pb2.TIER_SSD)
    assert ssd.used_bytes == sum(e.bytes for e in im.app.store.ssd_entries.values()) >= rec.bytes
    assert list((ssd_dir / "tmp").iterdir()) == []


def test_another_node_derives_a_registered_overlay_again(im: Im, demo_mesh: ImMesh, tmp_path: Path) -> None:
    first = _fuse(im, [("lora-ink", 0.4), ("lora-sketch", 0.9)])
    # Without peer copies: the overlay's tier below SSD is the computation (with them it comes from `im`, see below).
    other, channel = start_im(demo_mesh, tmp_path / "other-ssd", host_capacity_bytes=64 * MIB, peer_fetch=False)
    try:
        acq = other.stub.Acquire(
            instance_manager_pb2.AcquireRequest(component_ids=[first.component.id], holder="w-other"), timeout=120
        )
        handle = acq.handles[0]
        assert handle.source_tier == common_pb2.TIER_REMOTE and handle.kind == common_pb2.COMPONENT_KIND_FUSED
        assert _overlay_bytes(handle) == _overlay_bytes(first.handle)  # bit-identical to where it was fused
        entry = other.app.store.ssd_entries[first.component.id]
        assert entry.sha256 == first.component.sha256
        other.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=acq.lease_id))
    finally:
        channel.close()
        other.thread.stop()


def test_another_node_takes_an_overlay_from_its_peer(im: Im, demo_mesh: ImMesh, tmp_path: Path) -> None:
    first = _fuse(im, [("lora-neon", 0.5), ("lora-watercolor", 0.7)])
    fid = first.component.id
    wait_for(lambda: _on_ssd_of(demo_mesh, fid, im.node_id), "the overlay on the first node's SSD in the view")
    other, channel = start_im(demo_mesh, tmp_path / "other-ssd", host_capacity_bytes=64 * MIB)
    try:
        acq = other.stub.Acquire(instance_manager_pb2.AcquireRequest(component_ids=[fid], holder="w-peer"), timeout=120)
        handle = acq.handles[0]
        assert handle.source_tier == common_pb2.TIER_SSD  # a peer's copy: SSD-resident here, not derived again
        assert _overlay_bytes(handle) == _overlay_bytes(first.handle)
        stats = im_stats(other)
        assert stats.peer_fetches == 1 and stats.peer_bytes == first.component.bytes
        assert other.app.store.ssd_entries[fid].sha256 == first.component.sha256  # checked against the record
        other.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=acq.lease_id))
    finally:
        channel.close()
        other.thread.stop()


def _on_ssd_of(demo_mesh: ImMesh, cid: str, node_id: str) -> bool:
    resp = demo_mesh.stub.Locate(coordinator_pb2.LocateRequest(component_ids=[cid]))
    return any(r.node_id == node_id and r.tier == common_pb2.TIER_SSD for loc in resp.locations for r in loc.residencies)


def test_a_plan_has_its_hot_pipelines_fused_once(im: Im, demo_mesh: ImMesh) -> None:
    loras = [("lora-pixel", 0.3), ("lora-sketch", 0.6)]
    key = canonical_key(BASE_ID, loras)
    fid = fused_id(BASE_ID, loras)
    before = im_stats(im).fusions_done

    def plan(version: int) -> plan_pb2.Plan:
        spec = common_pb2.PipelineSpec(base_id=BASE_ID, loras=[common_pb2.LoraRef(id=i, scale=s) for i, s in loras])
        return plan_pb2.Plan(
            version=version,
            hot=[plan_pb2.HotPipelinePlan(pipeline_key=key, pipeline=spec, fused_id=fid)],
            nodes=[plan_pb2.NodeDirective(node_id=im.node_id, fuse_pipeline_keys=[key])],
        )

    assert apply_plan(im, plan(1 << 40))
    wait_for(lambda: host_resident(im, fid) and im_stats(im).fusions_done == before + 1, "the plan's overlay fused")
    rec = demo_mesh.stub.GetComponent(coordinator_pb2.GetComponentRequest(id=fid)).component
    assert rec.kind == common_pb2.COMPONENT_KIND_FUSED and rec.base_id == BASE_ID
    assert json.loads(rec.labels["diffmesh.loras"]) == [{"id": i, "scale": s} for i, s in loras]
    # The next plan names the same fusion: already HOST-resident, nothing is done again.
    assert apply_plan(im, plan((1 << 40) + 1))
    assert im_stats(im).fusions_done == before + 1


def _register_fused(demo_mesh: ImMesh, cid: str, sha256: str, labels: dict[str, str]) -> None:
    demo_mesh.stub.RegisterComponent(
        coordinator_pb2.RegisterComponentRequest(
            component=common_pb2.Component(
                id=cid,
                kind=common_pb2.COMPONENT_KIND_FUSED,
                family="sd15",
                uri=f"file:///nowhere/{cid}.safetensors",
                bytes=1,
                sha256=sha256,
                base_id=BASE_ID,
                labels=labels,
            )
        )
    )


@pytest.mark.parametrize(
    ("labels", "code", "needle"),
    [
        ({"diffmesh.loras": json.dumps([{"id": "lora-ink", "scale": 0.6}])}, grpc.StatusCode.DATA_LOSS, "derived again"),
        ({}, grpc.StatusCode.FAILED_PRECONDITION, "cannot be derived"),
        ({"diffmesh.loras": "not json"}, grpc.StatusCode.FAILED_PRECONDITION, "cannot be derived"),
    ],
)
def test_an_overlay_that_cannot_be_derived_as_registered_is_refused(
    im: Im, demo_mesh: ImMesh, labels: dict[str, str], code: grpc.StatusCode, needle: str
) -> None:
    cid = f"fused-bad-{uuid.uuid4().hex[:8]}"
    _register_fused(demo_mesh, cid, "0" * 64, labels)
    err = rpc_error(lambda: im.stub.Acquire(instance_manager_pb2.AcquireRequest(component_ids=[cid], holder="w"), timeout=120))
    assert err.code() == code, err.details()
    assert needle in (err.details() or "")
    assert cid not in im.app.store.ssd_entries and component_state(im_stats(im), cid) is None
    assert list((im.app.settings.ssd_path() / "tmp").iterdir()) == []
    assert _fuse(im, [("lora-sketch", 0.3)]).component.kind == common_pb2.COMPONENT_KIND_FUSED  # still serving


def test_fuse_into_a_full_ssd_tier_is_resource_exhausted_and_publishes_nothing(demo_mesh: ImMesh, tmp_path: Path) -> None:
    from diffmesh.errors import retry_after_ms

    inputs = [BASE_ID, "lora-pastel"]
    sizes = {
        c.id: c.bytes
        for c in demo_mesh.stub.ListComponents(coordinator_pb2.ListComponentsRequest(page_size=1000)).components
        if c.id in inputs
    }
    # Room for the pinned inputs and nothing more: the overlay cannot be given space.
    tight, channel = start_im(
        demo_mesh,
        tmp_path / "ssd",
        ssd_capacity_bytes=sum(sizes.values()) + 1024,
        pinned_components=inputs,
    )
    try:
        err = rpc_error(lambda: _fuse(tight, [("lora-pastel", 0.5)], fused_id="fused-no-room"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert "SSD tier full" in (err.details() or "") and (retry_after_ms(err) or 0) > 0
        assert "fused-no-room" not in tight.app.store.ssd_entries
        assert list((tmp_path / "ssd" / "tmp").iterdir()) == []
        with pytest.raises(grpc.RpcError):
            demo_mesh.stub.GetComponent(coordinator_pb2.GetComponentRequest(id="fused-no-room"))  # never registered
        lease = tight.stub.Acquire(instance_manager_pb2.AcquireRequest(component_ids=["lora-pastel"], holder="w"))
        tight.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=lease.lease_id))
    finally:
        channel.close()
        tight.thread.stop()
