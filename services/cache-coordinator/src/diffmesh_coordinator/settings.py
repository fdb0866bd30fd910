"""Coordinator settings, from ``DIFFMESH_COORDINATOR_*`` environment variables."""

from __future__ import annotations

from diffmesh.settings import ServiceSettings
from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict


class CoordinatorSettings(ServiceSettings):
    """Settings of the cache coordinator (the README's settings table lists them)."""

    model_config = SettingsConfigDict(env_prefix="DIFFMESH_COORDINATOR_", extra="ignore", populate_by_name=True)

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("DIFFMESH_COORDINATOR_REDIS_URL", "REDIS_URL"),
        description="Redis holding the coordinator's state (catalog, leases, residency, request stream).",
    )
    namespace: str = Field(
        default="dm:",
        pattern=r"^[A-Za-z0-9._:{}-]*$",
        description="Prefix of every Redis key, so several meshes (or test modules) can share one Redis.",
    )
    catalog: str = Field(
        default="",
        description="Catalog manifest (`catalog.json`, e.g. written by `diffmesh demo-models`) registered at start; "
        "empty: none.",
    )
    catalog_replace: bool = Field(
        default=False,
        description="At start, manifest records replace differing stored records with the same id; `false`: such a "
        "conflict fails start, naming the id.",
    )
    lease_seconds: float = Field(
        default=15.0, gt=0, le=3600, description="Node and worker lease length; holders heartbeat at least every third of it."
    )
    sweep_seconds: float = Field(
        default=0.0, ge=0, description="How often lapsed leases' residency is purged from Redis; 0 = every `LEASE_SECONDS`."
    )
    request_stream_maxlen: int = Field(
        default=100_000, ge=1, description="Approximate cap of the request stream (`XADD MAXLEN ~`)."
    )
    view_stream_maxlen: int = Field(
        default=100_000,
        ge=1,
        description="Approximate cap of the view change stream that `WatchView` follows (`XADD MAXLEN ~`); a watcher "
        "that falls further behind gets a fresh snapshot.",
    )
    half_life_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="Half-life of the time-decayed popularity of components and pipelines (forward decay in Redis).",
    )
    plan_seconds: float = Field(
        default=5.0,
        gt=0,
        description="How often the policy loop plans (bands, HOT replicas, pins, fusion, prefetch, admission, scaling); "
        "one coordinator replica at a time plans, under a Redis lock.",
    )
    hot_fraction: float = Field(
        default=0.05, ge=0, le=1, description="Share of the ranked pipelines (by decayed request rate) that are HOT."
    )
    warm_fraction: float = Field(
        default=0.25, ge=0, le=1, description="Share of the ranked pipelines after the HOT ones that are WARM."
    )
    pin_budget_fraction: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Share of each worker's device memory the HOT replicas it holds may pin (from its last `ReportLoad`, "
        "else its registration).",
    )
    fusion_top_k: int = Field(
        default=50,
        ge=0,
        description="The most popular this many pipelines with LoRAs are fusion targets; the HOT ones get a FUSED overlay "
        "derived on their replicas' nodes. 0: no fusion.",
    )
    cold_min_uses: int = Field(
        default=2,
        ge=0,
        description="Admission rule of the plan: a COLD component stays in a node's HOST tier after its lease only once "
        "it was requested this many times there (0 or 1: always).",
    )
    prefetch_per_bucket: int = Field(
        default=4, ge=0, description="WARM pipelines the bandit prefetches into HOST per time-of-day bucket; 0: none."
    )
    prefetch_bucket_seconds: float = Field(
        default=3600.0, gt=0, description="Width of the bandit's time-of-day buckets (bucket 0 starts at midnight UTC)."
    )
    scale_out_load: float = Field(
        default=2.0,
        ge=0,
        description="Requests waiting or running per live worker above which the plan advises scaling out.",
    )
    rank_min_count: float = Field(
        default=0.05,
        ge=0,
        description="Decayed request count below which a pipeline is not ranked, and is forgotten by the policy loop.",
    )

    @model_validator(mode="after")
    def _bands_fit(self) -> CoordinatorSettings:
        if self.hot_fraction + self.warm_fraction > 1.0:
            raise ValueError(f"HOT_FRACTION + WARM_FRACTION must not exceed 1, got {self.hot_fraction} + {self.warm_fraction}")
        return self
