"""Synthetic workloads: Zipf popularity with a chosen Gini, for runs without a trace.

Base models are drawn from a Zipf law whose exponent is solved (bisection) so that the
expected request counts have the requested Gini coefficient. A ``lora_share`` of the
requests use one of a pool of LoRA pipelines (1-3 LoRAs, mostly 1), itself Zipf-ranked;
a ``controlnet_share`` add a ControlNet. Arrivals are Poisson with a day/night cycle;
images per request follow the trace's mix (1: 55 %, 4: 23 %, 8: 15 %, 2: 7 %). Everything
is drawn from one seeded generator, so a seed gives the same workload.
"""

from __future__ import annotations

import numpy as np

from diffmesh.pipeline_key import canonical_key
from diffmesh.trace.model import Component, Pipeline, Workload
from diffmesh.trace.sizes import base_bytes, base_family, controlnet_bytes, lora_bytes
from diffmesh.trace.stats import gini

IMAGE_MIX = ((1, 0.55), (2, 0.07), (4, 0.23), (8, 0.15))


def zipf_weights(n: int, s: float) -> np.ndarray:
    """Normalised Zipf weights ``rank^-s`` for ranks 1..n."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -s
    return w / w.sum()


def zipf_exponent_for_gini(n: int, target: float) -> float:
    """The Zipf exponent whose weights over ``n`` keys have Gini ``target`` (bisection)."""
    lo, hi = 0.0, 8.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if gini(zipf_weights(n, mid)) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def synthetic_workload(
    n_requests: int = 20_000,
    *,
    n_bases: int = 100,
    gini_target: float = 0.88,
    lora_share: float = 0.22,
    n_loras: int = 600,
    n_lora_pipelines: int = 400,
    n_controlnets: int = 12,
    controlnet_share: float = 0.03,
    duration_s: float = 4 * 86400.0,
    diurnal_amplitude: float = 0.7,
    seed: int = 0,
) -> Workload:
    """A deterministic synthetic workload (see the module docstring)."""
    rng = np.random.default_rng(seed)
    components: list[Component] = []

    def add(cid: str, kind: str, family: str) -> int:
        nbytes = base_bytes(cid, family) if kind == "BASE" else lora_bytes(cid) if kind == "LORA" else controlnet_bytes(cid)
        components.append(Component(cid, kind, family, nbytes))
        return len(components) - 1

    bases = []
    for i in range(n_bases):
        cid = f"syn-base-{seed}-{i}"
        bases.append(add(cid, "BASE", base_family(cid)))
    loras = [add(f"syn-lora-{seed}-{i}", "LORA", "sd15") for i in range(n_loras)]
    cns = [add(f"syn-cn-{seed}-{i}", "CONTROLNET", "sd15") for i in range(n_controlnets)]

    base_w = zipf_weights(n_bases, zipf_exponent_for_gini(n_bases, gini_target))
    lora_w = zipf_weights(n_loras, 1.0)
    pipelines: list[Pipeline] = []
    index: dict[str, int] = {}

    def pipeline(b: int, ls: tuple[int, ...], scales: tuple[float, ...], cs: tuple[int, ...]) -> int:
        key = canonical_key(
            components[b].cid, [(components[x].cid, s) for x, s in zip(ls, scales, strict=True)], [components[c].cid for c in cs]
        )
        if key not in index:
            index[key] = len(pipelines)
            pipelines.append(Pipeline(key, b, ls, scales, cs))
        return index[key]

    plain = [pipeline(b, (), (), ()) for b in bases]
    lora_pipes = []
    for _ in range(n_lora_pipelines):
        b = bases[int(rng.choice(n_bases, p=base_w))]
        k = int(rng.choice([1, 2, 3], p=[0.9, 0.07, 0.03]))
        ls = tuple(sorted({loras[int(x)] for x in rng.choice(n_loras, size=k, p=lora_w)}))
        scales = tuple(float(x) for x in rng.choice([1.0, 0.8, 0.7, 0.5], size=len(ls)))
        lora_pipes.append(pipeline(b, ls, scales, ()))
    lp_w = zipf_weights(len(lora_pipes), 1.1)

    # Poisson arrivals with a daily cycle, by thinning.
    rate = n_requests / duration_s
    peak = rate * (1 + diurnal_amplitude)
    times: list[float] = []
    t = 0.0
    while len(times) < n_requests:
        t += float(rng.exponential(1.0 / peak))
        if rng.random() * peak <= rate * (1 + diurnal_amplitude * np.sin(2 * np.pi * t / 86400.0)):
            times.append(t)
    arrival = np.array(times) - times[0]

    kind = rng.random(n_requests)
    base_pick = rng.choice(n_bases, size=n_requests, p=base_w)
    lp_pick = rng.choice(len(lora_pipes), size=n_requests, p=lp_w)
    pipe = np.empty(n_requests, dtype=np.int32)
    for i in range(n_requests):
        if kind[i] < lora_share:
            pipe[i] = lora_pipes[int(lp_pick[i])]
        elif kind[i] < lora_share + controlnet_share and cns:
            pipe[i] = pipeline(bases[int(base_pick[i])], (), (), (cns[i % len(cns)],))
        else:
            pipe[i] = plain[int(base_pick[i])]
    imgs, probs = zip(*IMAGE_MIX, strict=True)
    return Workload(
        name=f"synthetic(gini={gini_target}, seed={seed})",
        components=components,
        pipelines=pipelines,
        arrival_s=arrival,
        pipeline=pipe,
        images=rng.choice(np.array(imgs, dtype=np.int16), size=n_requests, p=np.array(probs)),
        steps=rng.choice(np.array([30, 40], dtype=np.int16), size=n_requests, p=[0.9, 0.1]),
        tenant=rng.integers(0, max(1, n_requests // 10), size=n_requests).astype(np.int32),
        task=(kind >= lora_share).astype(np.int8) * (kind < lora_share + controlnet_share).astype(np.int8),
        start_epoch_s=0.0,
        notes={"zipf_gini": gini_target},
    )
