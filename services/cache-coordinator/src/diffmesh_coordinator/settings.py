"""Coordinator settings, from ``DIFFMESH_COORDINATOR_*`` environment variables."""

from __future__ import annotations

from diffmesh.settings import ServiceSettings
from pydantic import AliasChoices, Field
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
