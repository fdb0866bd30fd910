"""Settings shared by every service, read from the environment (pydantic-settings).

Each service subclasses :class:`ServiceSettings` with its own ``env_prefix``
(``DIFFMESH_ROUTER_``, ``DIFFMESH_COORDINATOR_``, ``DIFFMESH_IM_``, ``DIFFMESH_WORKER_``).
The README's configuration table lists every variable.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Settings every gRPC service has."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = Field("0.0.0.0", description="Address to bind the gRPC server to.")
    port: int = Field(0, ge=0, le=65535, description="Port to bind; 0 picks a free port.")
    grace_seconds: float = Field(10.0, ge=0, description="How long SIGTERM waits for in-flight RPCs.")
    log_level: str = Field("INFO", description="Python log level.")
    log_format: str = Field("json", pattern="^(json|text)$", description="`json` (one object per line) or `text`.")
    port_file: str = Field("", description="If set, the bound port is written to this file once serving.")


class TelemetrySettings(BaseSettings):
    """OpenTelemetry settings, read from the standard OTEL_* variables."""

    model_config = SettingsConfigDict(env_prefix="OTEL_", extra="ignore")

    exporter_otlp_endpoint: str = Field("", description="OTLP/gRPC collector endpoint; empty disables export.")
    traces_exporter: str = Field("otlp", description="`otlp`, `console` or `none`.")
