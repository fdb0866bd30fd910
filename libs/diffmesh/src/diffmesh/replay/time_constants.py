"""The services' time constants that model traffic time, compressed like the replayed stream.

The replay divides the trace's times by one compression factor (about 250 on the shared
trace). Constants that describe how traffic evolves — how fast popularity decays, how wide
the prefetch bandit's time buckets are, how far ahead eviction looks — are in trace time,
so they are divided by the same factor; otherwise a few-minute replay would see popularity
that never decays and a time bucket that never changes. Timeouts, leases, heartbeats and
network timings stay in wall seconds: they model the machines, not the traffic.

Defaults here mirror the services' settings (a unit test checks they agree); a value set
with ``--env`` for one of these variables is kept as given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrafficConstant:
    """One service setting in traffic seconds."""

    env: str
    """Environment variable of the setting."""
    default_s: float
    """The service's default (production, uncompressed)."""
    what: str


TRAFFIC_CONSTANTS = (
    TrafficConstant("DIFFMESH_COORDINATOR_HALF_LIFE_SECONDS", 3600.0, "coordinator popularity half-life"),
    TrafficConstant("DIFFMESH_COORDINATOR_PREFETCH_BUCKET_SECONDS", 3600.0, "prefetch bandit time bucket"),
    TrafficConstant("DIFFMESH_WORKER_POPULARITY_HALF_LIFE_SECONDS", 600.0, "worker device-tier popularity half-life"),
    TrafficConstant("DIFFMESH_WORKER_EVICTION_HORIZON_SECONDS", 300.0, "worker device-tier eviction horizon"),
)


@dataclass(frozen=True)
class CompressedConstants:
    """The environment the replay's services get, and how each value came about."""

    env: dict[str, str]
    rows: list[dict[str, Any]]

    def describe(self) -> str:
        """One line for the calibration report."""
        parts = [f"{r['env'].removeprefix('DIFFMESH_')} {r['default_s']:g} -> {r['replay_s']:.3g} s" for r in self.rows]
        return "time constants follow the compression: " + ", ".join(parts)


def compress(factor: float, overrides: Mapping[str, str] | None = None) -> CompressedConstants:
    """Each traffic constant divided by ``factor``; one set in ``overrides`` (``--env``) keeps its value."""
    if factor <= 0:
        raise ValueError("the compression factor must be positive")
    overrides = overrides or {}
    env: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    for c in TRAFFIC_CONSTANTS:
        given = overrides.get(c.env)
        if given is None:
            env[c.env] = f"{c.default_s / factor:.6g}"
            value, source = float(env[c.env]), f"default / {factor:.1f}"
        else:
            value, source = _seconds(given, c.env), "--env"
        rows.append({"env": c.env, "what": c.what, "default_s": c.default_s, "replay_s": value, "source": source})
    return CompressedConstants(env, rows)


def _seconds(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--env {name}={text!r}: not a number of seconds") from None
