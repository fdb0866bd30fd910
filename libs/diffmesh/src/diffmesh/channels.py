"""Client channels between services: OpenTelemetry context propagation and sane options."""

from __future__ import annotations

from grpc import aio
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from diffmesh.server import GRPC_OPTIONS


def open_channel(address: str) -> aio.Channel:
    """An insecure aio channel to ``address`` (``host:port``) that propagates the trace context."""
    return aio.insecure_channel(address, options=GRPC_OPTIONS, interceptors=aio_client_interceptors())
