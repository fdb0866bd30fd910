"""Structured logging and OpenTelemetry tracing for every diffmesh process.

Spans are created on every RPC by the gRPC instrumentation interceptors, with the W3C
trace context propagated in metadata, so one request is one trace across router, worker,
instance manager and coordinator. Spans are exported over OTLP/gRPC when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from diffmesh.settings import TelemetrySettings

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
_provider: TracerProvider | None = None


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the active trace id and any ``extra=`` fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"] = format(ctx.trace_id, "032x")
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Configures the root logger to write to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.Formatter.converter = time.gmtime


def setup_tracing(service: str, settings: TelemetrySettings | None = None) -> TracerProvider:
    """Installs the global tracer provider once per process and returns it."""
    global _provider
    if _provider is not None:
        return _provider
    settings = settings or TelemetrySettings()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if settings.traces_exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif settings.traces_exporter == "otlp" and settings.exporter_otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.exporter_otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    """Flushes and stops span export (call at process exit)."""
    if _provider is not None:
        _provider.force_flush(5000)
        _provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    """A tracer for custom spans (queue, load, denoise) inside handlers."""
    return trace.get_tracer(name)
