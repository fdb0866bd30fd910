"""REMOTE over HTTP: a real HTTP server on loopback (Range requests, directory index pages,
a connection cut mid-body, a redirect) feeding a real instance manager."""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from diffmesh.v1 import common_pb2

from tests.support.im import (
    BASE,
    LORA,
    Im,
    ImMesh,
    acquire,
    assert_nothing_published,
    assert_refused_publishing_nothing,
    assert_tensors_match,
    component_state,
    im_stats,
    register_component,
    release,
    rpc_error,
    start_im,
    tier_stats,
    write_base,
    write_lora,
)
from tests.support.waiting import wait_for


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range ``Range`` support. Paths under ``/models/cut/`` always
    close the connection halfway through the body; under ``/models/flaky/`` only the first
    time; under ``/models/slow/`` the body waits for ``gate``; under ``/models/pair/`` a
    ranged GET waits (10 s at most) until a second one is being served at the same time;
    ``/models/moved.safetensors`` redirects."""

    counts: Counter[str]
    cut_once: set[str]
    lock: threading.Lock
    gate: threading.Event
    pair: threading.Barrier

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        with self.lock:
            self.counts[self.path] += 1
        if self.path == "/models/moved.safetensors":
            self.send_response(302)
            self.send_header("Location", "/models/lora-h.safetensors")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            super().do_GET()
            return
        if not os.path.isfile(path):
            self.send_error(404)
            return
        size = os.path.getsize(path)
        start, end = 0, size - 1
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m:
            start = int(m.group(1))
            end = min(size - 1, int(m.group(2))) if m.group(2) else size - 1
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        if self.path.startswith("/models/slow/"):
            self.gate.wait(60)
        if self.path.startswith("/models/pair/") and m:
            try:
                self.pair.wait()
            except threading.BrokenBarrierError:
                self.send_error(503)  # the ranges came one at a time
                return
        cut = self.path.startswith("/models/cut/")
        if self.path.startswith("/models/flaky/"):
            with self.lock:
                cut = self.path not in self.cut_once
                self.cut_once.add(self.path)
        if cut:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        if self.path == "/models/moved.safetensors":
            self.send_response(302)
            self.send_header("Location", "/models/lora-h.safetensors")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_HEAD()


@dataclass
class Web:
    """The HTTP server, its document root and request counts per path."""

    url: str
    root: Path
    counts: Counter[str]
    gate: threading.Event


@pytest.fixture(scope="module")
def web(im_mesh: ImMesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    root = tmp_path_factory.mktemp("web")
    models = root / "models"
    for sub in ("cut", "flaky", "slow", "pair"):
        (models / sub).mkdir(parents=True)
    (root / "private").mkdir()
    write_lora(models / "lora-h.safetensors", 40)
    write_lora(models / "lora-many.safetensors", 41)
    write_lora(models / "cut" / "lora-cut.safetensors", 42, rows=4096)
    write_lora(models / "flaky" / "lora-flaky.safetensors", 43, rows=4096)
    write_lora(root / "private" / "lora-p.safetensors", 44)
    write_lora(models / "slow" / "lora-slow.safetensors", 47)
    write_lora(models / "pair" / "lora-pair.safetensors", 48, rows=300_000)  # ~9.6 MB: two 8 MiB ranges
    write_base(models / "base-h", 45)
    (models / "base-h" / "README.md").unlink()
    write_base(models / "base-pickle", 46)
    (models / "base-pickle" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    counts: Counter[str] = Counter()
    gate = threading.Event()
    gate.set()
    pair = threading.Barrier(2, timeout=10)
    attrs = {"counts": counts, "cut_once": set(), "lock": threading.Lock(), "gate": gate, "pair": pair}
    handler = type("Handler", (_Handler,), attrs)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"

    def add(cid: str, kind: int, rel: str, uri: str | None = None) -> None:
        register_component(im_mesh.stub, cid, kind, uri or f"{url}/{rel}", root / rel)

    add("http-lora", LORA, "models/lora-h.safetensors")
    add("http-many", LORA, "models/lora-many.safetensors")
    add("http-cut", LORA, "models/cut/lora-cut.safetensors")
    add("http-flaky", LORA, "models/flaky/lora-flaky.safetensors")
    add("http-slow", LORA, "models/slow/lora-slow.safetensors")
    add("http-pair", LORA, "models/pair/lora-pair.safetensors")
    add("http-private", LORA, "private/lora-p.safetensors")
    add("http-dotdot", LORA, "private/lora-p.safetensors", uri=f"{url}/models/../private/lora-p.safetensors")
    add("http-moved", LORA, "models/lora-h.safetensors", uri=f"{url}/models/moved.safetensors")
    add("http-base", BASE, "models/base-h", uri=f"{url}/models/base-h/")
    add("http-pickle", BASE, "models/base-pickle", uri=f"{url}/models/base-pickle/")
    shutil.copy(root / "models/lora-h.safetensors", root / "models/lora-badsha.safetensors")
    badsha_uri = f"{url}/models/lora-badsha.safetensors"
    register_component(im_mesh.stub, "http-badsha", LORA, badsha_uri, root / "private/lora-p.safetensors")
    yield Web(url, root, counts, gate)
    gate.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def im(im_mesh: ImMesh, web: Web, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Im]:
    running, channel = start_im(
        im_mesh, tmp_path_factory.mktemp("im-http-ssd"), allowed_roots=[str(im_mesh.root), f"{web.url}/models/"]
    )
    yield running
    channel.close()
    running.thread.stop()




def test_http_file_is_fetched_with_range_requests_and_verified(im: Im, web: Web) -> None:
    resp = acquire(im, "http-lora")
    handle = resp.handles[0]
    assert handle.source_tier == common_pb2.TIER_REMOTE
    assert_tensors_match(handle.files[0], web.root / "models/lora-h.safetensors")
    assert web.counts["/models/lora-h.safetensors"] == 1  # one ranged GET (the file is smaller than a range)
    ssd = tier_stats(im_stats(im), common_pb2.TIER_SSD)
    assert ssd.loaded_bytes >= (web.root / "models/lora-h.safetensors").stat().st_size and ssd.load_gbps > 0
    release(im, resp.lease_id)


def test_http_folder_is_walked_through_index_pages(im: Im, web: Web) -> None:
    resp = acquire(im, "http-base")
    base = resp.handles[0]
    assert [f.relpath for f in base.files] == ["unet/diffusion_pytorch_model.safetensors"]
    assert_tensors_match(base.files[0], web.root / "models/base-h/unet/diffusion_pytorch_model.safetensors")
    assert {c.relpath for c in base.configs} == {"model_index.json", "unet/config.json", "tokenizer/vocab.json"}
    release(im, resp.lease_id)


def test_concurrent_acquires_fetch_once(im: Im, web: Web) -> None:
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: acquire(im, "http-many", holder=f"w{i}"), range(6)))
    assert len({r.handles[0].files[0].segment for r in results}) == 1
    assert web.counts["/models/lora-many.safetensors"] == 1
    for r in results:
        release(im, r.lease_id)


def test_a_transfer_cut_halfway_publishes_nothing_and_the_service_keeps_serving(im: Im, web: Web) -> None:
    err = rpc_error(lambda: acquire(im, "http-cut"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    assert "nothing was published" in (err.details() or "")
    assert web.counts["/models/cut/lora-cut.safetensors"] == 3  # each range is retried, then the fetch gives up
    assert_nothing_published(im, "http-cut")
    release(im, acquire(im, "http-lora").lease_id)


def test_a_dropped_range_is_resumed(im: Im, web: Web) -> None:
    handle = acquire(im, "http-flaky").handles[0]
    assert_tensors_match(handle.files[0], web.root / "models/flaky/lora-flaky.safetensors")
    assert web.counts["/models/flaky/lora-flaky.safetensors"] == 2


def test_ranges_of_one_file_are_read_in_parallel(im: Im, web: Web) -> None:
    # The server answers each of the two ranges only while the other is in flight too.
    resp = acquire(im, "http-pair")
    assert_tensors_match(resp.handles[0].files[0], web.root / "models/pair/lora-pair.safetensors")
    assert web.counts["/models/pair/lora-pair.safetensors"] == 2
    release(im, resp.lease_id)


def test_a_slow_lora_never_delays_the_base(im: Im, web: Web) -> None:
    web.gate.clear()
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(acquire, im, "http-slow", "base-a")
            # The base becomes HOST-resident while the LoRA's transfer is still held back.
            wait_for(
                lambda: (s := component_state(im_stats(im), "base-a")) is not None and s.tier == common_pb2.TIER_HOST, "the base"
            )
            assert not pending.done()
            assert component_state(im_stats(im), "http-slow") is None
            web.gate.set()
            resp = pending.result(timeout=60)
    finally:
        web.gate.set()
    assert [h.component_id for h in resp.handles] == ["http-slow", "base-a"]
    release(im, resp.lease_id)


@pytest.mark.parametrize(
    ("cid", "code", "needle"),
    [
        ("http-private", grpc.StatusCode.PERMISSION_DENIED, "outside the allowed roots"),
        ("http-dotdot", grpc.StatusCode.INVALID_ARGUMENT, "'..'"),
        ("http-moved", grpc.StatusCode.PERMISSION_DENIED, "redirects are not followed"),
        ("http-badsha", grpc.StatusCode.DATA_LOSS, "sha256 mismatch"),
        ("http-pickle", grpc.StatusCode.INVALID_ARGUMENT, "pickle"),
    ],
)
def test_bad_http_sources_are_refused(im: Im, web: Web, cid: str, code: grpc.StatusCode, needle: str) -> None:
    assert_refused_publishing_nothing(im, cid, code, needle)
    assert web.counts["/private/lora-p.safetensors"] == 0
    release(im, acquire(im, "http-lora").lease_id)

