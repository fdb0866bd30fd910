"""The PEER tier: an instance manager fetches a component from another node's instance manager
(``ReadArtifact``) instead of REMOTE when the coordinator's view says that node's SSD holds it —
real instance managers, the real coordinator on Redis, a real loopback HTTP REMOTE store that
counts its requests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from diffmesh.v1 import common_pb2, coordinator_pb2, instance_manager_pb2

from tests.support.im import (
    BASE,
    LORA,
    Im,
    ImMesh,
    acquire,
    assert_tensors_match,
    im_stats,
    register_component,
    release,
    rpc_error,
    start_im,
    tier_stats,
    write_base,
    write_lora,
)
from tests.support.ranged_http import RangedHttp, ranged_http
from tests.support.waiting import wait_for

SSD = common_pb2.TIER_SSD
LORAS = [f"peer-lora-{i}" for i in range(6)]


@pytest.fixture(scope="module")
def web(im_mesh: ImMesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RangedHttp]:
    """The REMOTE store: LoRAs ``peer-lora-<i>`` and a base folder ``peer-base``, registered over HTTP."""
    root = tmp_path_factory.mktemp("peer-web")
    models = root / "models"
    models.mkdir()
    with ranged_http(root) as server:
        for i, cid in enumerate(LORAS):
            path = write_lora(models / f"{cid}.safetensors", 300 + i, rows=20_000)  # ~640 KB: one stream chunk
            register_component(im_mesh.stub, cid, LORA, f"{server.url}/models/{cid}.safetensors", path)
        base = write_base(models / "peer-base", 310)
        register_component(im_mesh.stub, "peer-base", BASE, f"{server.url}/models/peer-base/", base)
        big = write_lora(models / "peer-big.safetensors", 311, rows=100_000)  # ~3.2 MB: four stream chunks
        register_component(im_mesh.stub, "peer-big", LORA, f"{server.url}/models/peer-big.safetensors", big)
        yield server


def _start(im_mesh: ImMesh, web: RangedHttp, ssd: Path, **overrides: object) -> tuple[Im, grpc.Channel]:
    return start_im(im_mesh, ssd, allowed_roots=[str(im_mesh.root), f"{web.url}/models/"], **overrides)


@pytest.fixture(scope="module")
def node_a(im_mesh: ImMesh, web: RangedHttp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Im]:
    im, channel = _start(im_mesh, web, tmp_path_factory.mktemp("peer-a"))
    yield im
    channel.close()
    im.thread.stop()


@pytest.fixture()
def node_b(im_mesh: ImMesh, web: RangedHttp, tmp_path: Path) -> Iterator[Im]:
    im, channel = _start(im_mesh, web, tmp_path / "ssd-b")
    yield im
    channel.close()
    im.thread.stop()


def _holds_on_ssd(im_mesh: ImMesh, cid: str, node_id: str) -> bool:
    resp = im_mesh.stub.Locate(coordinator_pb2.LocateRequest(component_ids=[cid]))
    return any(r.node_id == node_id and r.tier == SSD for loc in resp.locations for r in loc.residencies)


def _load_on(im: Im, im_mesh: ImMesh, cid: str) -> None:
    """``cid`` loaded on ``im`` and its SSD copy visible in the coordinator's view."""
    release(im, acquire(im, cid).lease_id)
    wait_for(lambda: _holds_on_ssd(im_mesh, cid, im.node_id), f"{cid} on {im.node_id}'s SSD in the view")


def test_a_copy_on_a_peer_is_fetched_from_it_with_no_remote_read(
    node_a: Im, node_b: Im, im_mesh: ImMesh, web: RangedHttp
) -> None:
    for cid in ("peer-lora-0", "peer-base", "peer-big"):
        _load_on(node_a, im_mesh, cid)
    remote_before = web.gets("/models/")
    resp = acquire(node_b, "peer-lora-0", "peer-base", "peer-big")
    assert web.gets("/models/") == remote_before  # zero REMOTE reads: every byte came from node A
    lora, base, big = resp.handles
    assert_tensors_match(lora.files[0], web.root / "models/peer-lora-0.safetensors")
    assert_tensors_match(big.files[0], web.root / "models/peer-big.safetensors")
    assert_tensors_match(base.files[0], web.root / "models/peer-base/unet/diffusion_pytorch_model.safetensors")
    assert {c.relpath for c in base.configs} == {"model_index.json", "unet/config.json", "tokenizer/vocab.json"}
    # The copy's residency here is SSD (the wire Tier has no PEER); the peer is counted apart.
    assert {h.source_tier for h in resp.handles} == {SSD}
    stats = im_stats(node_b)
    sizes = sum(node_a.app.store.ssd_entries[c].bytes for c in ("peer-lora-0", "peer-base", "peer-big"))
    assert stats.peer_fetches == 3 and stats.peer_bytes == sizes and stats.remote_bytes == 0
    # Checked like REMOTE: the published copy has the catalog's digest and the folder all its files.
    for cid in ("peer-lora-0", "peer-base", "peer-big"):
        assert node_b.app.store.ssd_entries[cid].sha256 == node_a.app.store.ssd_entries[cid].sha256
    base_dir = node_b.app.store.ssd.path(node_b.app.store.ssd_entries["peer-base"])
    assert (base_dir / "README.md").read_text() == "not a config, not loaded"
    assert list((node_b.app.settings.ssd_path() / "tmp").iterdir()) == []
    assert tier_stats(stats, SSD).loaded_bytes == sizes
    release(node_b, resp.lease_id)


def test_a_peer_copy_that_does_not_match_the_catalog_falls_back_to_remote(
    node_a: Im, node_b: Im, im_mesh: ImMesh, web: RangedHttp
) -> None:
    _load_on(node_a, im_mesh, "peer-lora-1")
    entry = node_a.app.store.ssd_entries["peer-lora-1"]
    path = node_a.app.store.ssd.path(entry)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the peer's file rots after it was verified
    path.write_bytes(bytes(data))
    resp = acquire(node_b, "peer-lora-1")
    assert web.counts["/models/peer-lora-1.safetensors"] == 2  # node A's fetch, then node B's fallback
    assert_tensors_match(resp.handles[0].files[0], web.root / "models/peer-lora-1.safetensors")
    assert resp.handles[0].source_tier == common_pb2.TIER_REMOTE
    stats = im_stats(node_b)
    assert stats.peer_fetches == 0 and stats.peer_bytes == 0 and stats.remote_bytes == entry.bytes
    assert list((node_b.app.settings.ssd_path() / "tmp").iterdir()) == []
    release(node_b, resp.lease_id)


def test_a_peer_that_is_gone_falls_back_to_remote(im_mesh: ImMesh, web: RangedHttp, node_b: Im, tmp_path: Path) -> None:
    gone, channel = _start(im_mesh, web, tmp_path / "ssd-gone")
    _load_on(gone, im_mesh, "peer-lora-2")
    channel.close()
    gone.thread.stop()  # its lease at the coordinator outlives it: the view still says it holds the copy
    assert _holds_on_ssd(im_mesh, "peer-lora-2", gone.node_id)
    resp = acquire(node_b, "peer-lora-2")
    assert web.counts["/models/peer-lora-2.safetensors"] == 2
    assert resp.handles[0].source_tier == common_pb2.TIER_REMOTE
    assert im_stats(node_b).peer_fetches == 0
    release(node_b, resp.lease_id)


def test_peer_fetch_off_reads_remote(node_a: Im, im_mesh: ImMesh, web: RangedHttp, tmp_path: Path) -> None:
    _load_on(node_a, im_mesh, "peer-lora-3")
    off, channel = _start(im_mesh, web, tmp_path / "ssd-off", peer_fetch=False)
    try:
        release(off, acquire(off, "peer-lora-3").lease_id)
        assert web.counts["/models/peer-lora-3.safetensors"] == 2
        assert im_stats(off).peer_fetches == 0
    finally:
        channel.close()
        off.thread.stop()


def test_lru_mode_takes_no_peer_copies(
    node_a: Im, im_mesh: ImMesh, web: RangedHttp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _load_on(node_a, im_mesh, "peer-lora-4")
    monkeypatch.setenv("DIFFMESH_POLICY", "lru")
    lru, channel = _start(im_mesh, web, tmp_path / "ssd-lru")
    try:
        release(lru, acquire(lru, "peer-lora-4").lease_id)
        assert web.counts["/models/peer-lora-4.safetensors"] == 2
        stats = im_stats(lru)
        assert stats.peer_fetches == 0 and stats.remote_bytes > 0
    finally:
        channel.close()
        lru.thread.stop()


def test_read_artifact_streams_only_verified_ssd_copies(node_a: Im, im_mesh: ImMesh, web: RangedHttp) -> None:
    _load_on(node_a, im_mesh, "peer-lora-5")
    chunks = _read(node_a, "peer-lora-5")
    assert b"".join(c.data for c in chunks) == (web.root / "models/peer-lora-5.safetensors").read_bytes()
    assert {c.relpath for c in chunks} == {""} and not any(c.is_dir for c in chunks)
    assert chunks[0].sha256 == node_a.app.store.ssd_entries["peer-lora-5"].sha256
    # In the catalog but not on this node's SSD, and not in the catalog at all: NOT_FOUND naming the id.
    for cid in ("lora-d", "no-such-component"):
        err = rpc_error(lambda cid=cid: _read(node_a, cid))  # type: ignore[misc]
        assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
        assert repr(cid) in (err.details() or "")
    assert rpc_error(lambda: _read(node_a, "")).code() == grpc.StatusCode.INVALID_ARGUMENT


def _read(im: Im, cid: str) -> list[instance_manager_pb2.ReadArtifactResponse]:
    return list(im.stub.ReadArtifact(instance_manager_pb2.ReadArtifactRequest(component_id=cid), timeout=30))
