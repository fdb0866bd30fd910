"""Router settings, read from ``DIFFMESH_ROUTER_*`` environment variables."""

from __future__ import annotations

from diffmesh.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class RouterSettings(ServiceSettings):
    """Settings of the router (see the README's table)."""

    model_config = SettingsConfigDict(env_prefix="DIFFMESH_ROUTER_", extra="ignore")

    coordinator: str = Field("127.0.0.1:50051", description="host:port of the cache coordinator.")
    catalog_cache_seconds: float = Field(5.0, ge=0, description="How long a catalog record is reused without asking again.")
    nodes_refresh_seconds: float = Field(2.0, gt=0, description="How long the worker list from ListNodes is reused.")
    record_flush_seconds: float = Field(1.0, gt=0, description="Interval of the batched RecordRequests flush.")
    record_buffer_max: int = Field(50_000, ge=1, description="Request records kept while the coordinator is unreachable.")
    coordinator_timeout_seconds: float = Field(5.0, gt=0, description="Timeout of each coordinator call.")
    max_request_seconds: float = Field(900.0, gt=0, description="Worker call timeout when the client sets no deadline.")
