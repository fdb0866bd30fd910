"""The replayed request stream: the trace's first N requests, scaled to the demo models and time-compressed.

Per request the trace gives the arrival time, tenant, task, images, steps and pipeline
(``diffmesh.trace.loader`` joins its two request files by popularity rank). The replay
keeps task, tenant and pipeline (mapped by :mod:`diffmesh.replay.mapping`) and scales the
rest down so that a run takes minutes on a CPU: steps are divided by ``steps_divisor``
(10; at least ``min_steps``, 2), images are capped at ``max_images`` (2: the trace's 1
stays 1, its 2/4/8 become 2), and every image is ``size`` x ``size`` (64) pixels.

Time: idle gaps between arrivals longer than ``max_gap_s`` of trace time (one hour; the
trace's nights) are cut to that length, then all times are divided by one compression
factor chosen so that the offered load is X: the arrival rate a typical request meets
(:func:`diffmesh.sim.runner.request_weighted_rate`: hourly counts weighted by themselves,
as the simulator defines it) times the mean compute of a request equals X times the work
the mesh completes per second. The mean arrival rate over the whole span would count the
trace's quiet hours: on the shared trace's first 400 requests the busy hours run 4.8x that
mean, so X = 0.7 of the mean would overload every busy hour 3.4 times over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from diffmesh.replay.mapping import CatalogMap
from diffmesh.sim.runner import request_weighted_rate
from diffmesh.trace.model import TASKS, Workload

PROMPTS = (
    "a lighthouse on a cliff at dusk",
    "a fox in the snow",
    "a harbour with sailing boats",
    "a bowl of fruit on a wooden table",
    "a city street in the rain at night",
    "a mountain lake at sunrise",
)


@dataclass(frozen=True)
class StreamSettings:
    """How trace requests are scaled down (see the module docstring)."""

    steps_divisor: int = 10
    min_steps: int = 2
    max_images: int = 2
    size: int = 64
    max_gap_s: float = 3600.0


@dataclass(frozen=True)
class ReplayRequest:
    """One request of the replayed stream."""

    index: int
    trace_s: float
    """Arrival in trace seconds since the first request, after idle gaps were cut."""
    arrival_s: float
    """Arrival in wall seconds since the replay started (``trace_s`` / compression)."""
    base_id: str
    loras: tuple[tuple[str, float], ...]
    task: str
    """``TXT2IMG``, ``IMG2IMG`` or ``INPAINT``."""
    images: int
    steps: int
    tenant: str
    seed: int
    prompt: str
    size: int
    trace_images: int
    trace_steps: int

    @property
    def pipeline(self) -> str:
        """A readable pipeline key (base and LoRAs with scales)."""
        return self.base_id + "".join(f"+{lid}@{scale:g}" for lid, scale in self.loras)


@dataclass(frozen=True)
class ComputeModel:
    """Seconds of one warm request on an otherwise idle worker: ``a + images x (c + b x steps)``."""

    a: float
    b: float
    c: float

    def seconds(self, steps: int, images: int) -> float:
        """Predicted compute seconds (at least one millisecond)."""
        return max(1e-3, self.a + images * (self.c + self.b * steps))

    def to_json(self) -> dict[str, float]:
        """The coefficients, rounded to the microsecond."""
        return {"a_s": round(self.a, 6), "per_step_image_s": round(self.b, 6), "per_image_s": round(self.c, 6)}


def fit_compute_model(samples: Sequence[tuple[int, int, float]]) -> ComputeModel:
    """Least-squares fit of :class:`ComputeModel` to ``(steps, images, seconds)`` samples (at least 3)."""
    if len(samples) < 3:
        raise ValueError(f"need at least 3 samples to fit the compute model, got {len(samples)}")
    x = np.array([[1.0, images * steps, images] for steps, images, _ in samples])
    y = np.array([seconds for _, _, seconds in samples])
    (a, b, c), *_ = np.linalg.lstsq(x, y, rcond=None)
    return ComputeModel(float(a), float(b), float(c))


def scaled_steps(steps: int, settings: StreamSettings) -> int:
    """Trace steps divided by the divisor (rounded half up), at least ``min_steps``."""
    return max(settings.min_steps, math.floor(steps / settings.steps_divisor + 0.5))


def capped_images(images: int, settings: StreamSettings) -> int:
    """Trace images capped at ``max_images`` (at least 1)."""
    return max(1, min(settings.max_images, int(images)))


def cut_gaps(arrival_s: np.ndarray, max_gap_s: float) -> np.ndarray:
    """Arrival times with every gap between consecutive arrivals longer than ``max_gap_s`` cut to it."""
    if arrival_s.size == 0:
        return arrival_s.astype(np.float64)
    gaps = np.minimum(np.diff(arrival_s.astype(np.float64)), max_gap_s)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def compression_for_load(trace_s: np.ndarray, mean_compute_s: float, work_per_s: float, load: float) -> float:
    """The factor trace seconds are divided by so that the offered load is ``load``.

    Offered load = request-weighted arrival rate x mean compute / work the mesh completes
    per second (``work_per_s``: compute-seconds of single requests finished per wall
    second when every worker is busy). 1.0 when the stream has no rate (one request).
    """
    if load <= 0:
        raise ValueError(f"load must be positive, got {load}")
    rate = request_weighted_rate(trace_s)
    if rate <= 0 or mean_compute_s <= 0 or work_per_s <= 0:
        return 1.0
    return load * work_per_s / (rate * mean_compute_s)


def build_requests(workload: Workload, cmap: CatalogMap, n: int, settings: StreamSettings | None = None) -> list[ReplayRequest]:
    """The first ``n`` requests of ``workload`` on the demo catalog, uncompressed (``arrival_s`` = ``trace_s``)."""
    settings = settings or StreamSettings()
    n = min(n, len(workload))
    trace_s = cut_gaps(workload.arrival_s[:n], settings.max_gap_s)
    out = []
    for i in range(n):
        pipe = workload.pipelines[int(workload.pipeline[i])]
        out.append(
            ReplayRequest(
                index=i,
                trace_s=float(trace_s[i]),
                arrival_s=float(trace_s[i]),
                base_id=cmap.base_id(pipe.base),
                loras=cmap.lora_ids_of(pipe.loras, pipe.scales),
                task=TASKS[int(workload.task[i])],
                images=capped_images(int(workload.images[i]), settings),
                steps=scaled_steps(int(workload.steps[i]), settings),
                tenant=f"tenant-{int(workload.tenant[i])}",
                seed=1000 + i,
                prompt=PROMPTS[i % len(PROMPTS)],
                size=settings.size,
                trace_images=int(workload.images[i]),
                trace_steps=int(workload.steps[i]),
            )
        )
    return out


def compress(requests: Sequence[ReplayRequest], factor: float) -> list[ReplayRequest]:
    """The stream with wall arrival times ``trace_s / factor``."""
    if factor <= 0:
        raise ValueError(f"compression factor must be positive, got {factor}")
    return [replace(r, arrival_s=r.trace_s / factor) for r in requests]


def mean_compute(requests: Sequence[ReplayRequest], model: ComputeModel) -> float:
    """Mean predicted compute seconds of the stream's requests."""
    if not requests:
        return 0.0
    return float(np.mean([model.seconds(r.steps, r.images) for r in requests]))
