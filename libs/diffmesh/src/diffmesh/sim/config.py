"""Simulator settings: the cluster, the diffmesh policy knobs, and the systems compared."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from diffmesh.policy.popularity import BandThresholds

GB = 1_000_000_000


@dataclass(frozen=True)
class ClusterConfig:
    """Nodes x GPUs with per-node HOST and SSD tiers.

    HOST and SSD capacities default to fractions of the workload's catalog bytes (a
    node's shared-memory pool holds ~15 % of the catalog, its SSD cache half), so the
    same defaults mean the same pressure on any trace; ``host_gb``/``ssd_gb`` override.
    """

    nodes: int = 8
    gpus_per_node: int = 8
    gpu_gb: float = 24.0
    host_gb: float | None = None
    ssd_gb: float | None = None
    host_fraction: float = 0.15
    ssd_fraction: float = 0.5

    @property
    def gpus(self) -> int:
        """Total GPUs (one worker each)."""
        return self.nodes * self.gpus_per_node

    @classmethod
    def for_gpus(cls, gpus: int, gpus_per_node: int = 8, **kw: float | None) -> ClusterConfig:
        """A cluster of ``gpus`` GPUs, ``gpus_per_node`` per node (fewer on one small node)."""
        if gpus <= 0:
            raise ValueError("gpus must be positive")
        per = min(gpus_per_node, gpus)
        return cls(nodes=math.ceil(gpus / per), gpus_per_node=per, **kw)  # type: ignore[arg-type]

    def host_bytes(self, catalog_bytes: int) -> int:
        """HOST pool bytes per node."""
        return int(self.host_gb * GB) if self.host_gb is not None else int(self.host_fraction * catalog_bytes)

    def ssd_bytes(self, catalog_bytes: int) -> int:
        """SSD cache bytes per node."""
        return int(self.ssd_gb * GB) if self.ssd_gb is not None else int(self.ssd_fraction * catalog_bytes)


@dataclass(frozen=True)
class PolicySettings:
    """diffmesh's policy knobs (simulated seconds). None of them is fitted to a trace."""

    half_life_s: float = 600.0
    plan_interval_s: float = 60.0
    replan_every: int = 5
    """Re-plan HOT replicas every this many ticks (and whenever the HOT set changes)."""
    thresholds: BandThresholds = field(default_factory=BandThresholds)
    fusion_top_k: int = 50
    pin_budget_fraction: float = 0.5
    """Share of a GPU's memory the HOT plan may pin (the rest: activations, COLD work)."""
    horizon_gpu_s: float = 120.0
    horizon_host_s: float = 600.0
    horizon_ssd_s: float = 3600.0
    prefetch_per_bucket: int = 4
    """WARM pipelines the bandit prefetches into HOST at each time-of-day bucket."""
    bucket_s: float = 3600.0
    """Time-of-day bucket width, in the workload's own clock."""
    min_count: float = 0.05
    """Decayed count below which a pipeline is not ranked at all."""


@dataclass(frozen=True)
class SystemSpec:
    """One system compared: its routing, its eviction and which diffmesh features it uses."""

    name: str
    routing: str
    """``least_loaded`` | ``rayserve`` | ``modelmesh`` | ``ect``"""
    eviction: str = "lru"
    """``lru`` | ``utility``"""
    bands: bool = False
    fusion: bool = False
    bandit: bool = False
    admission: bool = False
    asymmetric: bool = False
    peer: bool = False
    """Copy a component from another node's HOST/SSD over the cluster network before
    fetching it from REMOTE. Needs a global view of every node's copies (diffmesh's
    coordinator); the baselines' routers only know their own node, so they never use it."""
    steal: bool = False
    """Late binding: a worker that falls idle takes a request queued elsewhere when loading
    it there finishes it sooner (needs the global view of queues)."""
    scale_out: bool = False
    """When a HOT/WARM request has to queue, warm the pipeline on the idle GPU where it loads
    fastest (from node tiers or peers) for the rest of the burst."""
    exhaustive: bool = False
    """ECT routing: score every worker instead of the exact branch-and-bound short-list
    (same choices, slower; for tests)."""
    max_models: int = 3
    """Ray Serve: ``max_num_models_per_replica``."""
    max_ongoing: int = 5
    """Ray Serve: ``max_ongoing_requests`` before a replica holding the model counts as busy."""


DIFFMESH = SystemSpec(
    "diffmesh",
    "ect",
    "utility",
    bands=True,
    fusion=True,
    bandit=True,
    admission=True,
    asymmetric=True,
    peer=True,
    steal=True,
    scale_out=True,
)

SYSTEMS: dict[str, SystemSpec] = {
    "lru": SystemSpec("lru", "least_loaded"),
    "rayserve": SystemSpec("rayserve", "rayserve"),
    "modelmesh": SystemSpec("modelmesh", "modelmesh"),
    "diffmesh": DIFFMESH,
}

ABLATIONS: dict[str, SystemSpec] = {
    "no_bands": replace(DIFFMESH, name="no_bands", bands=False, bandit=False, admission=False),
    "no_bandit": replace(DIFFMESH, name="no_bandit", bandit=False),
    "no_fusion": replace(DIFFMESH, name="no_fusion", fusion=False),
    "lru_eviction": replace(DIFFMESH, name="lru_eviction", eviction="lru"),
    "no_peer": replace(DIFFMESH, name="no_peer", peer=False),
    "no_steal": replace(DIFFMESH, name="no_steal", steal=False),
    "no_scale_out": replace(DIFFMESH, name="no_scale_out", scale_out=False),
}
