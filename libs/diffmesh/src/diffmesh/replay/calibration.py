"""Calibration: what a warm request costs on this machine, and the sizes and rates that follow from it.

On a fresh mesh of the replay's topology (``DIFFMESH_POLICY=lru``, REMOTE uncapped), with
requests sent straight to the workers (``WorkerService.Run``: no routing involved):

1. every worker builds the first base and runs it twice (warm-up, not measured);
2. one worker alone runs each shape (steps, images) of :data:`SHAPES` twice; the faster
   ``denoise_seconds`` of each shape feeds a least-squares
   :class:`~diffmesh.replay.stream.ComputeModel` ``a + images x (c + b x steps)``;
3. every worker at once runs :data:`BURST_PER_WORKER` requests shaped like the stream's
   first ones, back to back; the predicted single-request seconds of all of them divided
   by the wall time is the work the mesh completes per second when every worker is busy
   (on 2 cores shared by 4 workers: about 2).

:func:`remote_rate_for` then sets the REMOTE bandwidth cap: a base alone takes
``remote_ratio`` (default 3) x the stream's mean warm compute to come from REMOTE (the
issue asks for at least 2x). :func:`tier_sizes` sets, from the model set's bytes only:

- per node, HOST = ``host_fraction`` (15 %) of the catalog's bytes as a cache, plus room for
  what the node's workers hold leased: on a CPU mesh a worker's device copy *is* a leased
  HOST copy (zero-copy), so each worker's device budget (``device_pipelines`` of the
  largest pipeline, default 2) and the pipeline it is loading are added on top; on a GPU
  they would live in device memory;
- per node, SSD = ``ssd_fraction`` (50 %) of the catalog, at least workers + 1 pipelines.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import grpc

from diffmesh.client import build_params, build_pipeline
from diffmesh.replay.stream import ComputeModel, ReplayRequest, fit_compute_model
from diffmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc

SHAPES = ((2, 1), (8, 1), (2, 2), (8, 2))
"""(steps, images) measured alone: the stream's steps run 2-10, images 1-2."""
REPEATS = 2
BURST_PER_WORKER = 3
BLOCK = 2 * 1024 * 1024
"""The HOST pool's block granularity: sizes are rounded up to it."""


@dataclass(frozen=True)
class Measurement:
    """What the calibration measured."""

    model: ComputeModel
    samples: list[tuple[int, int, float]]
    """(steps, images, fastest denoise seconds) per shape."""
    burst_requests: int
    burst_wall_s: float
    work_per_s: float
    """Single-request compute seconds the mesh completes per wall second with every worker busy."""
    wall_s: float


@dataclass(frozen=True)
class TierSizes:
    """Tier capacities of every node and worker of the replay's meshes."""

    host_bytes: int
    ssd_bytes: int
    worker_cache_bytes: int
    pipeline_bytes: int
    """Bytes of the largest pipeline of the stream (base + its LoRAs, in pool blocks)."""

    def to_json(self) -> dict[str, int]:
        """Plain dict."""
        return asdict(self)


def round_up(nbytes: float, block: int = BLOCK) -> int:
    """``nbytes`` rounded up to a multiple of ``block``."""
    return int(math.ceil(nbytes / block) * block)


def tier_sizes(
    *,
    base_bytes: int,
    lora_bytes: int,
    catalog_bytes: int,
    max_loras: int,
    workers_per_node: int,
    host_fraction: float = 0.15,
    ssd_fraction: float = 0.5,
    device_pipelines: int = 2,
) -> TierSizes:
    """HOST, SSD and device capacities (see the module docstring)."""
    pipeline = round_up(base_bytes) + max_loras * round_up(lora_bytes)
    device = device_pipelines * pipeline
    leased = workers_per_node * (device + pipeline)
    return TierSizes(
        host_bytes=round_up(host_fraction * catalog_bytes) + leased,
        ssd_bytes=max(round_up(ssd_fraction * catalog_bytes), (workers_per_node + 1) * pipeline),
        worker_cache_bytes=device,
        pipeline_bytes=pipeline,
    )


def remote_rate_for(base_bytes: int, mean_compute_s: float, remote_ratio: float) -> float:
    """The REMOTE cap (bytes/s) at which one base alone takes ``remote_ratio`` x ``mean_compute_s``."""
    if mean_compute_s <= 0 or remote_ratio <= 0 or base_bytes <= 0:
        raise ValueError("base_bytes, mean_compute_s and remote_ratio must be positive")
    return base_bytes / (remote_ratio * mean_compute_s)


def _run(address: str, base_id: str, steps: int, images: int, size: int, seed: int) -> common_pb2.GenerationResult:
    """One request straight to a worker; the result (raises grpc.RpcError on failure)."""
    request = worker_pb2.RunRequest(
        request_id=f"calibrate-{seed}",
        pipeline=build_pipeline(base_id),
        params=build_params("calibration", steps=steps, seed=seed, width=size, height=size, num_images=images),
        tenant="calibration",
    )
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        for event in stub.Run(request, timeout=600):
            if event.WhichOneof("event") == "result":
                return event.result
    raise RuntimeError(f"worker {address} ended the stream without a result")


def measure(
    workers: Sequence[str], base_id: str, stream: Sequence[ReplayRequest], size: int, report: Callable[[str], None] = print
) -> Measurement:
    """Runs the calibration on ``workers`` (addresses) with ``base_id``; ``stream`` gives the burst's shapes."""
    started = time.monotonic()
    with ThreadPoolExecutor(len(workers)) as pool:
        def warm(address: str) -> None:
            for k in range(2):
                _run(address, base_id, SHAPES[-1][0], SHAPES[-1][1], size, 1 + k)

        list(pool.map(warm, workers))
        report(f"calibration: {len(workers)} workers warm ({time.monotonic() - started:.1f} s)")

        samples = []
        for steps, images in SHAPES:
            best = min(_run(workers[0], base_id, steps, images, size, 10 + k).timing.denoise_seconds for k in range(REPEATS))
            samples.append((steps, images, best))
        model = fit_compute_model(samples)
        report("calibration: warm compute alone " + ", ".join(f"{s} steps x {i} img {t:.3f} s" for s, i, t in samples))

        shapes = [(r.steps, r.images) for r in stream] or [SHAPES[0]]
        jobs = [[shapes[(w * BURST_PER_WORKER + k) % len(shapes)] for k in range(BURST_PER_WORKER)] for w in range(len(workers))]

        def burst(args: tuple[str, list[tuple[int, int]]]) -> None:
            address, mine = args
            for k, (steps, images) in enumerate(mine):
                _run(address, base_id, steps, images, size, 100 + k)

        t0 = time.monotonic()
        list(pool.map(burst, zip(workers, jobs, strict=True)))
        burst_wall = time.monotonic() - t0
    work = sum(model.seconds(s, i) for mine in jobs for s, i in mine)
    n = sum(len(mine) for mine in jobs)
    report(f"calibration: {n} requests on all workers at once in {burst_wall:.2f} s: {work / burst_wall:.2f} work-s per s")
    return Measurement(model, samples, n, burst_wall, work / burst_wall, time.monotonic() - started)
