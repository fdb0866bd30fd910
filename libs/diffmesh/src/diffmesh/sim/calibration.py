"""Load and compute costs, calibrated from the trace's latency files.

* REMOTE→GPU load of a component of kind K: ``init_K + transfer_K x bytes / median
  bytes of kind K``, where ``init_K`` is the 1st percentile of ``*_update_latency`` for K
  (the fixed work of any load: building the pipeline, applying an adapter) and
  ``init_K + transfer_K`` is its median. A median-sized component so costs the median.
* SSD→GPU and HOST→GPU divide the transfer part by the bandwidth ratios ``ssd_speedup``
  (NVMe vs. object-store throughput, default 8) and ``host_speedup`` (pinned PCIe copy,
  default 40); the init part stays. A PEER copy (another node's HOST/SSD copy over the
  cluster network, for systems with a global view of copies) divides it by
  ``peer_speedup`` (default 4: half the NVMe ratio, a node-to-node stream limited by the
  peer's disk read and a shared network).
* REMOTE loads carry per-load jitter: the empirical ratio ``sample / median`` of the
  kind's file (ratios outside [0.25, 4] dropped: those are cached switches or outliers),
  picked by a hash of (component, request), so every system sees the same draw.
* Compute: ``steps x step_s x family weight x (1 + image_coef x (images - 1))``.
  image_coef comes from the 10th percentile of the request file's end-to-end time per
  image count (30-step requests without LoRAs: the warm runs); step_s makes the mean
  compute 22.5 % of the mean observed end-to-end time (the study: denoising is 15-30 %
  of it). Family weights are normalised to mean 1 over the family mix.

Without the files, the medians of the trace README are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffmesh.trace.loader import read_rows
from diffmesh.trace.model import Workload
from diffmesh.trace.sizes import FAMILIES

LATENCY_FILES = {
    "BASE": "basemodel_update_latency_anon.csv.gz",
    "LORA": "lora_update_latency_anon.csv.gz",
    "CONTROLNET": "controlnet_latency_data_anon.csv.gz",
}
DEFAULT_MEDIAN_S = {"BASE": 22.7, "LORA": 4.4, "CONTROLNET": 3.9}
DEFAULT_INIT_S = {"BASE": 1.5, "LORA": 0.8, "CONTROLNET": 0.4}
DEFAULT_STEP_S = 0.19
DEFAULT_IMAGE_COEF = 0.04


@dataclass(frozen=True)
class Calibration:
    """Cost model parameters (seconds)."""

    median_s: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MEDIAN_S))
    init_s: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_INIT_S))
    jitter: dict[str, np.ndarray] = field(default_factory=dict)
    step_s: float = DEFAULT_STEP_S
    image_coef: float = DEFAULT_IMAGE_COEF
    ssd_speedup: float = 8.0
    host_speedup: float = 40.0
    source: str = "defaults"
    peer_speedup: float = 4.0

    def summary(self) -> dict[str, object]:
        """JSON-friendly description."""
        return {
            "source": self.source,
            "remote_median_s": {k: round(v, 3) for k, v in self.median_s.items()},
            "init_s": {k: round(v, 3) for k, v in self.init_s.items()},
            "jitter_samples": {k: int(v.size) for k, v in self.jitter.items()},
            "step_s": round(self.step_s, 4),
            "image_coef": round(self.image_coef, 4),
            "ssd_speedup": self.ssd_speedup,
            "host_speedup": self.host_speedup,
            "peer_speedup": self.peer_speedup,
        }


def _values(path: Path) -> np.ndarray:
    vals = []
    for row in read_rows(path):
        try:
            vals.append(float(row["value"]))
        except (KeyError, ValueError):
            continue
    return np.asarray(vals, dtype=np.float64) / 1000.0


COMPUTE_SHARE = 0.225
"""Share of end-to-end time that is denoising, per the study (15-30 %; midpoint)."""


def fit_compute(workload: Workload) -> tuple[float, float] | None:
    """(step_s, image_coef) from the workload's observed end-to-end times, or None.

    The image coefficient is the slope/intercept ratio of a line through the 10th
    percentile of end-to-end time per image count (30-step requests without LoRAs). The
    step time is then scaled so that the mean compute over all requests is
    :data:`COMPUTE_SHARE` of their mean observed end-to-end time: the study measured that
    denoising is only 15-30 % of it, the rest being loading, switching and queueing.
    """
    if workload.exec_time_s is None:
        return None
    has_lora = np.array([len(p.loras) > 0 for p in workload.pipelines], dtype=bool)[workload.pipeline]
    ok = (~has_lora) & (workload.steps == 30) & np.isfinite(workload.exec_time_s) & (workload.exec_time_s > 0)
    xs, ys, ws = [], [], []
    for img in (1, 2, 4, 8):
        sel = ok & (workload.images == img)
        if sel.sum() >= 20:
            xs.append(img)
            ys.append(float(np.percentile(workload.exec_time_s[sel], 10)))
            ws.append(float(sel.sum()))
    if len(xs) < 2:
        return None
    slope, intercept = np.polyfit(np.array(xs, float), np.array(ys), 1, w=np.sqrt(ws))
    one = intercept + slope
    if one <= 0:
        return None
    image_coef = float(max(0.0, slope / one))
    finite = np.isfinite(workload.exec_time_s) & (workload.exec_time_s > 0)
    shape = workload.steps.astype(np.float64) * (1.0 + image_coef * (workload.images.astype(np.float64) - 1.0))
    step_s = COMPUTE_SHARE * float(workload.exec_time_s[finite].mean()) / float(shape[finite].mean())
    return step_s, image_coef


def calibrate(
    folder: Path | None, workload: Workload | None = None, ssd_speedup: float = 8.0, host_speedup: float = 40.0
) -> Calibration:
    """Calibration from a trace folder's latency files (defaults for what is missing)."""
    median = dict(DEFAULT_MEDIAN_S)
    init = dict(DEFAULT_INIT_S)
    jitter: dict[str, np.ndarray] = {}
    used = []
    if folder is not None:
        for kind, name in LATENCY_FILES.items():
            path = folder / name
            if not path.exists():
                continue
            v = _values(path)
            v = v[np.isfinite(v) & (v > 0)]
            if v.size < 20:
                continue
            med = float(np.median(v))
            median[kind] = med
            init[kind] = min(float(np.percentile(v, 1)), 0.5 * med)
            ratio = v / med
            jitter[kind] = np.sort(ratio[(ratio >= 0.25) & (ratio <= 4.0)])
            used.append(name)
    step_s, image_coef = DEFAULT_STEP_S, DEFAULT_IMAGE_COEF
    fitted = fit_compute(workload) if workload is not None else None
    if fitted:
        step_s, image_coef = fitted
        used.append("lora_request_trace exec_time")
    return Calibration(median, init, jitter, step_s, image_coef, ssd_speedup, host_speedup, ", ".join(used) or "defaults")


def family_step_weights() -> dict[str, float]:
    """Step-cost weight per family, normalised to mean 1 over the family mix."""
    mean = sum(f.mix * f.step_weight for f in FAMILIES.values()) / sum(f.mix for f in FAMILIES.values())
    return {name: f.step_weight / mean for name, f in FAMILIES.items()}


def compute_s(cal: Calibration, steps: int, images: int, family: str) -> float:
    """Denoising seconds of one request."""
    return steps * cal.step_s * family_step_weights()[family] * (1.0 + cal.image_coef * (max(1, images) - 1))


def jitter_factor(cal: Calibration, kind: str, component: int, request: int) -> float:
    """The REMOTE-load jitter multiplier for (component, request); 1 without samples."""
    samples = cal.jitter.get(kind)
    if samples is None or samples.size == 0:
        return 1.0
    h = (component * 2654435761 + request * 40503 + 12345) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0x5BD1E995) & 0xFFFFFFFF
    return float(samples[h % samples.size])
