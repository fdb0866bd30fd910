"""Router settings, read from ``DIFFMESH_ROUTER_*`` environment variables."""

from __future__ import annotations

from diffmesh.ports import COORDINATOR_PORT, loopback
from diffmesh.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class RouterSettings(ServiceSettings):
    """Settings of the router (see the README's table)."""

    model_config = SettingsConfigDict(env_prefix="DIFFMESH_ROUTER_", extra="ignore")

    coordinator: str = Field(
        loopback(COORDINATOR_PORT),
        description="Cache coordinator `host:port` (catalog, live workers, residency, request records); the default is "
        "the coordinator's port of the port plan on this machine.",
    )
    catalog_cache_seconds: float = Field(
        5.0, ge=0, description="How long a catalog record is reused before asking the coordinator again (misses are not cached)."
    )
    nodes_refresh_seconds: float = Field(
        2.0,
        gt=0,
        description="How long the `ListNodes` worker list is reused; refreshed sooner when no worker is known or one was "
        "unreachable.",
    )
    record_flush_seconds: float = Field(
        1.0, gt=0, description="Interval of the batched `RecordRequests` flush to the coordinator."
    )
    record_buffer_max: int = Field(
        50_000, ge=1, description="Request records kept while the coordinator is unreachable; the oldest are dropped beyond it."
    )
    coordinator_timeout_seconds: float = Field(5.0, gt=0, description="Timeout of each coordinator call.")
    max_request_seconds: float = Field(900.0, gt=0, description="Timeout of the worker call when the client sets no deadline.")
