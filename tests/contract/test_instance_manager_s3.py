"""REMOTE over S3: a real S3-compatible store (SeaweedFS on loopback, SigV4-signed requests)
feeding a real instance manager through s3fs. A TCP proxy between the two counts the
requests and cuts transfers halfway, the way a dropped connection does."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from diffmesh.errors import FailedPrecondition, NotFound, PermissionDenied, Unavailable
from diffmesh.v1 import common_pb2
from diffmesh_instance_manager.fetch_options import S3Options
from diffmesh_instance_manager.remote_access import RemoteAccess
from diffmesh_instance_manager.s3_fetch import S3Fetcher
from diffmesh_instance_manager.settings import InstanceManagerSettings

from tests.support.cutting_proxy import CuttingProxy
from tests.support.im import (
    BASE,
    LORA,
    Im,
    ImMesh,
    acquire,
    assert_nothing_published,
    assert_refused_publishing_nothing,
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
from tests.support.s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3

BIG_ROWS = 300_000  # two fp32 factors of 300k x 4: ~9.6 MB, two 8 MiB ranges


@dataclass
class S3:
    """The bucket, the local originals of its objects, and the proxy in front of the store."""

    bucket: str
    private: str
    local: Path
    proxy: CuttingProxy
    server: SeaweedS3

    def get_count(self, key: str, bucket: str | None = None) -> int:
        return self.proxy.count("GET", f"/{bucket or self.bucket}/{key}")


@pytest.fixture(scope="module")
def s3(im_mesh: ImMesh, s3_server: SeaweedS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    tag = uuid.uuid4().hex[:8]
    bucket, private = f"models-{tag}", f"private-{tag}"
    fs = s3_server.filesystem()
    fs.mkdir(bucket)
    fs.mkdir(private)
    local = tmp_path_factory.mktemp("s3-originals")
    files = {
        "models/lora-s.safetensors": write_lora(local / "lora-s.safetensors", 60),
        "models/lora-many.safetensors": write_lora(local / "lora-many.safetensors", 61),
        "models/lora-cut.safetensors": write_lora(local / "lora-cut.safetensors", 62, rows=4096),
        "models/lora-big.safetensors": write_lora(local / "lora-big.safetensors", 63, rows=BIG_ROWS),
        "models/lora-badsha.safetensors": write_lora(local / "lora-badsha.safetensors", 64),
        "other/lora-o.safetensors": write_lora(local / "lora-o.safetensors", 65),
    }
    base = write_base(local / "base-s", 66)
    (base / "README.md").unlink()
    (base / ".hidden-marker").write_text("hidden files are not part of an artifact")
    pickled = write_base(local / "base-pickle", 67)
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    for key, path in files.items():
        fs.put_file(str(path), f"{bucket}/{key}")
    fs.put(str(base) + "/", f"{bucket}/models/base-s/", recursive=True)
    fs.put(str(pickled) + "/", f"{bucket}/models/base-pickle/", recursive=True)
    fs.put_file(str(local / "lora-o.safetensors"), f"{private}/models/lora-p.safetensors")
    (base / ".hidden-marker").unlink()  # the catalog digest of the folder, as registered, skips hidden files

    def add(cid: str, kind: int, uri: str, original: Path) -> None:
        register_component(im_mesh.stub, cid, kind, uri, original)

    add("s3-lora", LORA, f"s3://{bucket}/models/lora-s.safetensors", files["models/lora-s.safetensors"])
    add("s3-many", LORA, f"s3://{bucket}/models/lora-many.safetensors", files["models/lora-many.safetensors"])
    add("s3-cut", LORA, f"s3://{bucket}/models/lora-cut.safetensors", files["models/lora-cut.safetensors"])
    add("s3-big", LORA, f"s3://{bucket}/models/lora-big.safetensors", files["models/lora-big.safetensors"])
    add("s3-base", BASE, f"s3://{bucket}/models/base-s/", base)
    add("s3-pickle", BASE, f"s3://{bucket}/models/base-pickle/", pickled)
    # Registered with the digest of another file: the bytes in the bucket do not match the catalog.
    add("s3-badsha", LORA, f"s3://{bucket}/models/lora-badsha.safetensors", files["models/lora-s.safetensors"])
    add("s3-missing", LORA, f"s3://{bucket}/models/never-uploaded.safetensors", files["models/lora-s.safetensors"])
    add("s3-other-prefix", LORA, f"s3://{bucket}/other/lora-o.safetensors", files["other/lora-o.safetensors"])
    add("s3-private", LORA, f"s3://{private}/models/lora-p.safetensors", files["other/lora-o.safetensors"])
    add("s3-dotdot", LORA, f"s3://{bucket}/models/../other/lora-o.safetensors", files["other/lora-o.safetensors"])
    add("s3-empty", BASE, f"s3://{bucket}/models/no-such-folder/", base)
    proxy = CuttingProxy("127.0.0.1", s3_server.ports["s3"])
    yield S3(bucket, private, local, proxy, s3_server)
    proxy.close()


@pytest.fixture(scope="module")
def im(im_mesh: ImMesh, s3: S3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Im]:
    running, channel = start_im(
        im_mesh,
        tmp_path_factory.mktemp("im-s3-ssd"),
        allowed_roots=[str(im_mesh.root), f"s3://{s3.bucket}/models/"],
        s3_endpoint_url=s3.proxy.endpoint,
        s3_region="us-east-1",
        s3_access_key_id=ACCESS_KEY,
        s3_secret_access_key=SECRET_KEY,
    )
    yield running
    channel.close()
    running.thread.stop()




def _still_serving(im: Im) -> None:
    release(im, acquire(im, "s3-lora").lease_id)


def test_s3_object_is_fetched_with_ranged_gets_and_verified(im: Im, s3: S3) -> None:
    resp = acquire(im, "s3-lora")
    handle = resp.handles[0]
    assert handle.source_tier == common_pb2.TIER_REMOTE
    assert_tensors_match(handle.files[0], s3.local / "lora-s.safetensors")
    assert s3.get_count("models/lora-s.safetensors") == 1  # one ranged GET: the object is smaller than a range
    ssd = tier_stats(im_stats(im), common_pb2.TIER_SSD)
    assert ssd.loaded_bytes >= (s3.local / "lora-s.safetensors").stat().st_size and ssd.load_gbps > 0
    release(im, resp.lease_id)
    again = acquire(im, "s3-lora")
    assert again.handles[0].source_tier == common_pb2.TIER_HOST
    assert s3.get_count("models/lora-s.safetensors") == 1
    release(im, again.lease_id)


def test_s3_folder_prefix_is_listed_and_fetched(im: Im, s3: S3) -> None:
    resp = acquire(im, "s3-base")
    base = resp.handles[0]
    assert [f.relpath for f in base.files] == ["unet/diffusion_pytorch_model.safetensors"]
    assert_tensors_match(base.files[0], s3.local / "base-s/unet/diffusion_pytorch_model.safetensors")
    assert {c.relpath for c in base.configs} == {"model_index.json", "unet/config.json", "tokenizer/vocab.json"}
    assert s3.get_count("models/base-s/.hidden-marker") == 0
    release(im, resp.lease_id)


def test_concurrent_acquires_fetch_once(im: Im, s3: S3) -> None:
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: acquire(im, "s3-many", holder=f"w{i}"), range(6)))
    assert len({r.handles[0].files[0].segment for r in results}) == 1
    assert s3.get_count("models/lora-many.safetensors") == 1
    for r in results:
        release(im, r.lease_id)


def test_a_transfer_cut_halfway_publishes_nothing_and_the_service_keeps_serving(im: Im, s3: S3) -> None:
    size = (s3.local / "lora-cut.safetensors").stat().st_size
    cuts = s3.proxy.cuts
    s3.proxy.cut("/models/lora-cut.safetensors", after_bytes=size // 2)
    try:
        err = rpc_error(lambda: acquire(im, "s3-cut"))
    finally:
        s3.proxy.clear()
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    assert "nothing was published" in (err.details() or "")
    assert s3.get_count("models/lora-cut.safetensors") == 3  # the range is retried, then the fetch gives up
    assert s3.proxy.cuts - cuts == 3
    assert_nothing_published(im, "s3-cut")
    _still_serving(im)
    # Once the network is whole again the same component loads.
    handle = acquire(im, "s3-cut").handles[0]
    assert_tensors_match(handle.files[0], s3.local / "lora-cut.safetensors")


def test_a_dropped_range_is_resumed_from_that_range(im: Im, s3: S3) -> None:
    key = "models/lora-big.safetensors"
    size = (s3.local / "lora-big.safetensors").stat().st_size
    assert 8 * 1024 * 1024 < size <= 16 * 1024 * 1024  # two ranges
    # The second range's first attempt is cut halfway; only that range is read again.
    cuts = s3.proxy.cuts
    s3.proxy.cut("/" + key, after_bytes=1024 * 1024, times=1, skip=1)
    try:
        resp = acquire(im, "s3-big")
    finally:
        s3.proxy.clear()
    assert_tensors_match(resp.handles[0].files[0], s3.local / "lora-big.safetensors")
    assert s3.get_count(key) == 3  # range 1, range 2 cut, range 2 again — not the whole object twice
    assert s3.proxy.cuts - cuts == 1
    release(im, resp.lease_id)


@pytest.mark.parametrize(
    ("cid", "code", "needle"),
    [
        ("s3-private", grpc.StatusCode.PERMISSION_DENIED, "outside the allowed roots"),
        ("s3-other-prefix", grpc.StatusCode.PERMISSION_DENIED, "outside the allowed roots"),
        ("s3-dotdot", grpc.StatusCode.INVALID_ARGUMENT, "'..'"),
        ("s3-badsha", grpc.StatusCode.DATA_LOSS, "sha256 mismatch"),
        ("s3-pickle", grpc.StatusCode.INVALID_ARGUMENT, "pickle"),
        ("s3-missing", grpc.StatusCode.NOT_FOUND, "never-uploaded.safetensors"),
        ("s3-empty", grpc.StatusCode.NOT_FOUND, "no-such-folder"),
    ],
)
def test_bad_s3_sources_are_refused(im: Im, s3: S3, cid: str, code: grpc.StatusCode, needle: str) -> None:
    assert_refused_publishing_nothing(im, cid, code, needle)
    assert s3.get_count("models/lora-p.safetensors", bucket=s3.private) == 0
    assert s3.get_count("other/lora-o.safetensors") == 0
    _still_serving(im)


def _fetch_source(s3: S3, key: str) -> tuple[object, str]:
    from diffmesh_instance_manager.fetch_common import Source

    uri = f"s3://{s3.bucket}/{key}"
    source = RemoteAccess([f"s3://{s3.bucket}"]).resolve("c", uri)
    assert isinstance(source, Source) and source.url == uri
    return source, uri


def test_wrong_credentials_are_permission_denied(s3: S3, tmp_path: Path) -> None:
    source, _ = _fetch_source(s3, "models/lora-s.safetensors")
    wrong = S3Fetcher(S3Options(endpoint_url=s3.server.endpoint, region="us-east-1", access_key_id=ACCESS_KEY,
                                secret_access_key="not-the-secret"))  # fmt: skip
    with pytest.raises(PermissionDenied, match="S3 refused"):
        wrong.fetch(source, "0" * 64, tmp_path / "out")  # type: ignore[arg-type]
    anonymous = S3Fetcher(S3Options(endpoint_url=s3.server.endpoint, region="us-east-1", anonymous=True))
    with pytest.raises(PermissionDenied):
        anonymous.fetch(source, "0" * 64, tmp_path / "out2")  # type: ignore[arg-type]


def test_no_credentials_at_all_is_a_clear_precondition(s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup off this machine
    source, _ = _fetch_source(s3, "models/lora-s.safetensors")
    fetcher = S3Fetcher(S3Options(endpoint_url=s3.server.endpoint, region="us-east-1"))
    with pytest.raises(FailedPrecondition, match="DIFFMESH_IM_S3_ACCESS_KEY_ID"):
        fetcher.fetch(source, "0" * 64, tmp_path / "out")  # type: ignore[arg-type]


def test_an_unreachable_endpoint_is_unavailable(s3: S3, tmp_path: Path) -> None:
    from diffmesh.redis_server import free_port

    source, _ = _fetch_source(s3, "models/lora-s.safetensors")
    dead = S3Fetcher(S3Options(endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1",
                               access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY, connect_timeout_s=2))  # fmt: skip
    with pytest.raises(Unavailable, match="S3 request"):
        dead.fetch(source, "0" * 64, tmp_path / "out")  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_a_missing_bucket_is_not_found(s3: S3, tmp_path: Path) -> None:
    uri = "s3://no-such-bucket-dm/models/x.safetensors"
    source = RemoteAccess(["s3://no-such-bucket-dm/models/"]).resolve("c", uri)
    fetcher = S3Fetcher(S3Options(endpoint_url=s3.server.endpoint, region="us-east-1", access_key_id=ACCESS_KEY,
                                  secret_access_key=SECRET_KEY))  # fmt: skip
    with pytest.raises(NotFound, match="no-such-bucket-dm"):
        fetcher.fetch(source, "0" * 64, tmp_path / "out")


def test_s3_settings_need_key_and_secret_together() -> None:
    with pytest.raises(ValueError, match="together"):
        InstanceManagerSettings(node_id="n", s3_access_key_id="AKIA")
    settings = InstanceManagerSettings(node_id="n", s3_access_key_id="AKIA", s3_secret_access_key="s")
    options = settings.s3_options()
    assert options.access_key_id == "AKIA" and options.secret_access_key == "s"
    assert "SecretStr('**********')" in repr(settings)  # the secret never lands in logs


def test_s3_access_rules() -> None:
    from diffmesh.errors import InvalidArgument

    access = RemoteAccess(["s3://models/sd15/", "s3://whole-bucket"])
    ok = access.resolve("c", "s3://models/sd15/lora.safetensors")
    assert ok.url == "s3://models/sd15/lora.safetensors" and not ok.is_dir
    assert access.resolve("c", "s3://models/sd15/base/").is_dir
    assert access.resolve("c", "s3://whole-bucket/any/key.safetensors").url
    for uri, exc, needle in [
        ("s3://models/sd15-other/lora.safetensors", PermissionDenied, "outside the allowed roots"),
        ("s3://models/lora.safetensors", PermissionDenied, "outside the allowed roots"),
        ("s3://other-bucket/sd15/lora.safetensors", PermissionDenied, "outside the allowed roots"),
        ("s3://models/sd15/../secret/lora.safetensors", InvalidArgument, "'..'"),
        ("s3://models/sd15/%2e%2e/secret/lora.safetensors", InvalidArgument, "'..'"),
        ("s3://models/sd15/lora.ckpt", InvalidArgument, "pickle"),
        ("s3://models/sd15/lora.safetensors?versionId=1", InvalidArgument, "query"),
        ("s3:///sd15/lora.safetensors", InvalidArgument, "no bucket"),
    ]:
        with pytest.raises(exc, match=needle):
            access.resolve("c", uri)
