"""An in-process OTLP/gRPC span collector (OpenTelemetry spans; the workload trace is :mod:`diffmesh.trace`).

:class:`SpanCollector` is a real ``opentelemetry.proto.collector.trace.v1.TraceService``
server: any OpenTelemetry SDK with an OTLP/gRPC exporter pointed at
:attr:`SpanCollector.endpoint` sends its spans here. The spans are kept in memory
(thread-safe), so that ``diffmesh run`` can compute latency breakdowns from them and the
end-to-end tests can check that one request is one trace across every service.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from diffmesh.channels import GRPC_OPTIONS


@dataclass(frozen=True)
class CollectedSpan:
    """One received span, flattened: ids are lower-case hex, times are Unix nanoseconds."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    start_ns: int
    end_ns: int
    kind: int = 0
    status_code: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        """Span duration in seconds."""
        return max(0, self.end_ns - self.start_ns) / 1e9

    @property
    def is_root(self) -> bool:
        """True when the span has no parent."""
        return not self.parent_span_id


def any_value(value: common_pb2.AnyValue) -> Any:
    """The Python value of an OTLP ``AnyValue``."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_dict(value.kvlist_value.values)
    return getattr(value, kind)


def attributes_dict(attributes: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    """OTLP key/values as a dict."""
    return {kv.key: any_value(kv.value) for kv in attributes}


def flatten(request: trace_service_pb2.ExportTraceServiceRequest) -> list[CollectedSpan]:
    """The spans of one OTLP export request, each with its resource's ``service.name``."""
    out: list[CollectedSpan] = []
    for resource_spans in request.resource_spans:
        resource = attributes_dict(resource_spans.resource.attributes)
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(_span(span, service, resource))
    return out


def _span(span: trace_pb2.Span, service: str, resource: dict[str, Any]) -> CollectedSpan:
    return CollectedSpan(
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex(),
        name=span.name,
        service=service,
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
        kind=span.kind,
        status_code=span.status.code,
        attributes=attributes_dict(span.attributes),
        resource=resource,
    )


class SpanStore:
    """Thread-safe in-memory span storage with grouping helpers."""

    def __init__(self) -> None:
        self._spans: list[CollectedSpan] = []
        self._cond = threading.Condition()

    def add(self, spans: Iterable[CollectedSpan]) -> None:
        """Stores spans and wakes up waiters."""
        with self._cond:
            self._spans.extend(spans)
            self._cond.notify_all()

    def spans(self) -> list[CollectedSpan]:
        """A snapshot of every stored span, in arrival order."""
        with self._cond:
            return list(self._spans)

    def clear(self) -> None:
        """Forgets every stored span."""
        with self._cond:
            self._spans.clear()

    def traces(self) -> dict[str, list[CollectedSpan]]:
        """Spans grouped by trace id, each group ordered by start time."""
        grouped: dict[str, list[CollectedSpan]] = defaultdict(list)
        for span in self.spans():
            grouped[span.trace_id].append(span)
        return {tid: sorted(group, key=lambda s: s.start_ns) for tid, group in grouped.items()}

    def trace(self, trace_id: str) -> list[CollectedSpan]:
        """The spans of one trace (hex id), ordered by start time."""
        return sorted((s for s in self.spans() if s.trace_id == trace_id), key=lambda s: s.start_ns)

    def by_service(self, trace_id: str | None = None) -> dict[str, list[CollectedSpan]]:
        """Spans grouped by ``service.name``, optionally of one trace only."""
        grouped: dict[str, list[CollectedSpan]] = defaultdict(list)
        for span in self.spans():
            if trace_id is None or span.trace_id == trace_id:
                grouped[span.service].append(span)
        return dict(grouped)

    def services_by_trace(self) -> dict[str, set[str]]:
        """For every trace id, the set of services that sent spans of it."""
        out: dict[str, set[str]] = defaultdict(set)
        for span in self.spans():
            out[span.trace_id].add(span.service)
        return dict(out)

    def wait_for(self, predicate: Callable[[list[CollectedSpan]], bool], timeout: float = 10.0) -> bool:
        """Waits until ``predicate(spans)`` holds; returns whether it did within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(list(self._spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True


class _TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: SpanStore) -> None:
        self.store = store

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.store.add(flatten(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class SpanCollector(SpanStore):
    """An OTLP/gRPC trace receiver on ``host:port`` (0 picks a free port) storing spans in memory.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__()
        self.host = host
        self._requested_port = port
        self.port = 0
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        """The value for ``OTEL_EXPORTER_OTLP_ENDPOINT``: ``http://host:port``."""
        if not self.port:
            raise RuntimeError("collector not started")
        return f"http://{self.host}:{self.port}"

    def start(self) -> SpanCollector:
        """Starts serving; returns self."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp"), options=GRPC_OPTIONS)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceServicer(self), server)
        port = server.add_insecure_port(f"{self.host}:{self._requested_port}")
        if port == 0:
            raise OSError(f"cannot bind the trace collector to {self.host}:{self._requested_port}")
        server.start()
        self._server, self.port = server, port
        return self

    def stop(self, grace: float = 1.0) -> None:
        """Stops serving (spans already received stay readable)."""
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def __enter__(self) -> SpanCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
