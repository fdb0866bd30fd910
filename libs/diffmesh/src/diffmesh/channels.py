"""gRPC channel options shared by servers and clients, and client channels with trace propagation.

Torch-free and server-free: the client SDK imports this module, and so does
:mod:`diffmesh.server` (for the same message-size limits).
"""

from __future__ import annotations

import grpc
from grpc import aio
from opentelemetry.instrumentation.grpc import aio_client_interceptors, client_interceptor
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""Largest message either side sends or accepts (images and handles can be large)."""

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]
"""Options of every diffmesh channel and server."""


def open_channel(address: str) -> aio.Channel:
    """An insecure aio channel to ``address`` (``host:port``) that propagates the trace context."""
    return aio.insecure_channel(address, options=GRPC_OPTIONS, interceptors=aio_client_interceptors())


def open_blocking_channel(address: str) -> grpc.Channel:
    """An insecure blocking channel to ``address`` (``host:port``) that propagates the trace context."""
    return intercept_channel(grpc.insecure_channel(address, options=GRPC_OPTIONS), client_interceptor())
