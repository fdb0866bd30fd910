"""Settings shared by every service, read from the environment (pydantic-settings).

Each service subclasses :class:`ServiceSettings` with its own ``env_prefix``
(``DIFFMESH_ROUTER_``, ``DIFFMESH_COORDINATOR_``, ``DIFFMESH_IM_``, ``DIFFMESH_WORKER_``).
Every field's ``description`` is its documentation: the README's configuration tables are
generated from these classes (``diffmesh config --markdown``, ``make config-doc``).
"""

from __future__ import annotations

import re
import socket

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from diffmesh.ports import COORDINATOR_PORT, INSTANCE_MANAGER_PORT, ROUTER_PORT, WORKER_PORT_BASE

NODE_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
"""What a node id may look like (it is also part of shared-memory names)."""


def default_node_id() -> str:
    """The host name, made a valid node id: the default of the instance manager and its workers."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64] or "node"


class ServiceSettings(BaseSettings):
    """Settings every gRPC service has."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = Field("0.0.0.0", description="Address the gRPC server binds to (`0.0.0.0`: every interface).")
    port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port the gRPC server binds to; 0 picks a free one (see `PORT_FILE`). Deployments use the port plan "
        f"of `diffmesh.ports`: router {ROUTER_PORT}, coordinator {COORDINATOR_PORT}, instance manager "
        f"{INSTANCE_MANAGER_PORT}, a node's workers from {WORKER_PORT_BASE} on.",
    )
    grace_seconds: float = Field(10.0, ge=0, description="How long SIGTERM waits for in-flight RPCs before the server stops.")
    log_level: str = Field("INFO", description="Python log level (`DEBUG`, `INFO`, `WARNING`, `ERROR`).")
    log_format: str = Field("json", pattern="^(json|text)$", description="`json` (one object per line) or `text`.")
    port_file: str = Field(
        "", description="File the bound port is written to once serving (useful with port 0); empty: none."
    )


class TelemetrySettings(BaseSettings):
    """OpenTelemetry settings, read from the standard OTEL_* variables."""

    model_config = SettingsConfigDict(env_prefix="OTEL_", extra="ignore")

    exporter_otlp_endpoint: str = Field(
        "", description="OTLP/gRPC collector for traces (e.g. `http://jaeger:4317`); empty: spans are not exported."
    )
    traces_exporter: str = Field(
        "otlp",
        description="`otlp` (to the endpoint above), `console` (spans printed to stdout) or `none`. The standard "
        "`OTEL_BSP_*` batch settings apply as well.",
    )
