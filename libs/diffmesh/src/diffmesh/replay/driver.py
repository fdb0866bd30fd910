"""Sends the stream through the router, open loop: each request leaves at its arrival time.

A scheduler thread sleeps until each request's arrival and hands it to a pool of
``max_in_flight`` sender threads (one blocking ``Generate`` each). When every sender is
busy the request waits for one; its latency still counts from its scheduled arrival, so a
saturated client cannot hide queueing. UNAVAILABLE is retried for a few seconds (a
router that has just started may not know every worker yet). RESOURCE_EXHAUSTED (every
worker's queue stayed full through the router's wait for room) is retried as its retry
hint asks, as a production client does, for up to :data:`BUSY_RETRY_S` from the first
attempt; the latency keeps counting and the retries are counted (``busy_retries``).
Every other error is the request's outcome.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from diffmesh.catalog import kind_name
from diffmesh.client import Client, DiffmeshClientError, GenerationOptions, Lora, ResourceExhaustedError, UnavailableError
from diffmesh.launcher.demo_requests import edges_image, encode_png
from diffmesh.replay.stream import ReplayRequest
from diffmesh.tiers import Tier
from diffmesh.v1 import common_pb2

UNAVAILABLE_RETRY_S = 10.0
BUSY_RETRY_S = 300.0
"""How long a request keeps retrying RESOURCE_EXHAUSTED before it counts as failed."""
BUSY_RETRY_MIN_S = 0.5
"""The shortest wait before such a retry (a hint below it, or none, waits this long)."""
DEFAULT_MAX_IN_FLIGHT = 48


@dataclass(frozen=True)
class ComponentLoad:
    """How one component of a request's pipeline was made ready (from ``GenerationResult.loads``)."""

    component_id: str
    kind: str
    tier: str
    bytes: int
    seconds: float


@dataclass
class Outcome:
    """What happened to one request; times are seconds since the stream's start."""

    index: int
    scheduled_s: float
    sent_s: float = 0.0
    done_s: float = 0.0
    ok: bool = False
    error: str = ""
    code: str = ""
    worker_id: str = ""
    node_id: str = ""
    queue_s: float = 0.0
    load_s: float = 0.0
    denoise_s: float = 0.0
    retries: int = 0
    """UNAVAILABLE retries."""
    busy_retries: int = 0
    """RESOURCE_EXHAUSTED retries (each after the router's retry hint)."""
    loads: list[ComponentLoad] = field(default_factory=list)

    @property
    def latency_s(self) -> float:
        """Seconds from the scheduled arrival to the answer."""
        return self.done_s - self.scheduled_s


def mask_image(size: int) -> bytes:
    """A mask PNG: the centre half of the image white (repainted), the rest black."""
    pixels = bytearray(size * size * 3)
    lo, hi = size // 4, size - size // 4
    for y in range(lo, hi):
        pixels[(y * size + lo) * 3 : (y * size + hi) * 3] = b"\xff" * ((hi - lo) * 3)
    return encode_png(size, size, bytes(pixels))


TASK_CODES = {"TXT2IMG": common_pb2.TASK_TXT2IMG, "IMG2IMG": common_pb2.TASK_IMG2IMG, "INPAINT": common_pb2.TASK_INPAINT}


def generate_options(req: ReplayRequest) -> GenerationOptions:
    """Keyword options of ``Client.generate`` for ``req`` (images for IMG2IMG and INPAINT included)."""
    options: GenerationOptions = {
        "steps": req.steps,
        "seed": req.seed,
        "width": req.size,
        "height": req.size,
        "num_images": req.images,
        "task": TASK_CODES[req.task],
    }
    if req.task in ("IMG2IMG", "INPAINT"):
        options["init_image"] = edges_image(req.size, req.size)
    if req.task == "INPAINT":
        options["mask_image"] = mask_image(req.size)
    return options


def fill_from_result(outcome: Outcome, result: common_pb2.GenerationResult) -> None:
    """Copies worker, node, timing and per-component loads of ``result`` into ``outcome``."""
    outcome.ok = True
    outcome.worker_id = result.worker_id
    outcome.node_id = result.node_id
    outcome.queue_s = result.timing.queue_seconds
    outcome.load_s = result.timing.load_seconds
    outcome.denoise_s = result.timing.denoise_seconds
    outcome.loads = [
        ComponentLoad(
            load.component_id, kind_name(load.kind), _tier_label(load.source_tier), int(load.bytes), float(load.seconds)
        )
        for load in result.loads
    ]


def _tier_label(value: int) -> str:
    try:
        return Tier(value).label
    except ValueError:
        return str(value)


class Sender:
    """Runs one stream against the router at ``address``."""

    def __init__(
        self,
        address: str,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        timeout_s: float = 600.0,
        on_done: Callable[[Outcome], None] | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.address = address
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.on_done = on_done or (lambda _o: None)
        self._lock = threading.Lock()
        self.in_flight = 0

    def run(self, requests: Sequence[ReplayRequest], lead_s: float = 0.5) -> tuple[list[Outcome], float]:
        """Sends every request at its ``arrival_s``; returns the outcomes (stream order) and the wall seconds
        from the stream's start to the last answer."""
        outcomes = [Outcome(r.index, r.arrival_s) for r in requests]
        client = Client(self.address, timeout=self.timeout_s)
        pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="replay-send")
        try:
            t0 = time.monotonic() + lead_s
            futures = []
            for req, outcome in zip(requests, outcomes, strict=True):
                delay = t0 + req.arrival_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                futures.append(pool.submit(self._one, client, req, outcome, t0))
            for future in futures:
                future.result()
        except BaseException:
            # Interrupted: drop what has not been sent; closing the channel ends the calls in flight.
            pool.shutdown(wait=False, cancel_futures=True)
            client.close()
            raise
        pool.shutdown()
        client.close()
        end = max((o.done_s for o in outcomes), default=0.0)
        return outcomes, end

    def _one(self, client: Client, req: ReplayRequest, outcome: Outcome, t0: float) -> None:
        with self._lock:
            self.in_flight += 1
        outcome.sent_s = time.monotonic() - t0
        deadline = time.monotonic() + UNAVAILABLE_RETRY_S
        busy_deadline = time.monotonic() + BUSY_RETRY_S
        try:
            while True:
                try:
                    result = client.generate(
                        req.base_id,
                        req.prompt,
                        loras=[Lora(lid, scale) for lid, scale in req.loras],
                        tenant=req.tenant,
                        request_id=f"replay-{req.index}",
                        **generate_options(req),
                    )
                    fill_from_result(outcome, result)
                    break
                except UnavailableError as err:
                    if time.monotonic() > deadline:
                        outcome.error, outcome.code = str(err), grpc.StatusCode.UNAVAILABLE.name
                        break
                    outcome.retries += 1
                    time.sleep(0.2)
                except ResourceExhaustedError as err:
                    wait = max(BUSY_RETRY_MIN_S, err.retry_after_s or 0.0)
                    if time.monotonic() + wait > busy_deadline:
                        outcome.error, outcome.code = str(err), err.code.name
                        break
                    outcome.busy_retries += 1
                    time.sleep(wait)
                except DiffmeshClientError as err:
                    outcome.error = str(err)
                    outcome.code = err.code.name
                    break
        finally:
            outcome.done_s = time.monotonic() - t0
            with self._lock:
                self.in_flight -= 1
            self.on_done(outcome)
