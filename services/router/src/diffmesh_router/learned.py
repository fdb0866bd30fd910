"""What finished requests taught the router: per-worker service and compute speed, load rates per tier.

Each worker's results update two exponentially weighted means (weight :data:`WEIGHT` for
the newest request): its service time (load plus denoise seconds, the time a request holds
the device, which a queued request waits for) and its denoising speed in seconds per
megapixel-step (``denoise_seconds / (steps x images x megapixels)``). Load rates are
learned mesh-wide per source tier from the results' per-component loads: the weighted
means of bytes and of seconds, whose ratio weighs a large load more than a small one.
Before a measurement the settings' defaults apply (see :class:`LearnedEstimates`).
"""

from __future__ import annotations

from dataclasses import dataclass

from diffmesh.policy.routing import GB, Bandwidths, Source
from diffmesh.tiers import Tier
from diffmesh.v1 import common_pb2
from diffmesh.view import WorkerKey

WEIGHT = 0.2
"""Weight of the newest measurement in every running mean."""

_SOURCE_OF_TIER = {Tier.HOST: Source.HOST, Tier.SSD: Source.SSD, Tier.REMOTE: Source.REMOTE}


def megapixel_steps(steps: int, images: int, width: int, height: int) -> float:
    """The compute units of one request: steps x images x megapixels."""
    return max(1, steps) * max(1, images) * (width * height) / 1e6


@dataclass
class _Mean:
    value: float

    def add(self, x: float) -> None:
        self.value += WEIGHT * (x - self.value)


class LearnedEstimates:
    """Running means of service time and compute speed per worker, and of load rates per tier."""

    def __init__(self, defaults: Bandwidths, seconds_per_unit: float, learn_rates: bool = True) -> None:
        self.defaults = defaults
        self.default_seconds_per_unit = seconds_per_unit
        self.learn_rates = learn_rates
        self.service_s: dict[WorkerKey, float] = {}
        self.seconds_per_unit: dict[WorkerKey, float] = {}
        self._rates: dict[Source, tuple[_Mean, _Mean]] = {}
        self._bandwidths = defaults
        self.version = 0
        """Increases with every change, so callers can cache what they derive."""

    def bandwidths(self) -> Bandwidths:
        """Load rates: learned where measured (when learning is on), the defaults elsewhere."""
        return self._bandwidths

    def unit_default(self) -> float:
        """Seconds per unit for a worker without measurements: the measured workers' mean, else the setting."""
        if not self.seconds_per_unit:
            return self.default_seconds_per_unit
        return sum(self.seconds_per_unit.values()) / len(self.seconds_per_unit)

    def learn(self, worker: WorkerKey, result: common_pb2.GenerationResult, units: float) -> None:
        """Takes one finished request's timing on ``worker`` (``units``: its megapixel-steps)."""
        timing = result.timing
        service = timing.load_seconds + timing.denoise_seconds
        if service > 0:
            self._update(self.service_s, worker, service)
        if timing.denoise_seconds > 0 and units > 0:
            self._update(self.seconds_per_unit, worker, timing.denoise_seconds / units)
        if self.learn_rates:
            for load in result.loads:
                source = _SOURCE_OF_TIER.get(Tier(load.source_tier)) if load.source_tier in Tier._value2member_map_ else None
                if source is None or load.bytes <= 0 or load.seconds <= 0:
                    continue
                pair = self._rates.get(source)
                if pair is None:
                    self._rates[source] = (_Mean(float(load.bytes)), _Mean(load.seconds))
                else:
                    pair[0].add(float(load.bytes))
                    pair[1].add(load.seconds)
            self._bandwidths = self._measured_bandwidths()
        self.version += 1

    def forget(self, worker: WorkerKey) -> None:
        """Drops a worker's means (it left the mesh)."""
        self.service_s.pop(worker, None)
        self.seconds_per_unit.pop(worker, None)

    def rates_gbps(self) -> dict[str, float]:
        """The load rates in use, GB/s per source name (for logs and stats)."""
        bw = self._bandwidths
        return {s.name: bw.rate(s) / GB for s in (Source.HOST, Source.SSD, Source.PEER, Source.REMOTE)}

    def _update(self, table: dict[WorkerKey, float], worker: WorkerKey, x: float) -> None:
        held = table.get(worker)
        table[worker] = x if held is None else held + WEIGHT * (x - held)

    def _measured_bandwidths(self) -> Bandwidths:
        d = self.defaults

        def rate(source: Source, default: float) -> float:
            pair = self._rates.get(source)
            return default if pair is None else pair[0].value / pair[1].value

        return Bandwidths(
            rate(Source.HOST, d.host_bps), rate(Source.SSD, d.ssd_bps), d.peer_bps, rate(Source.REMOTE, d.remote_bps)
        )
