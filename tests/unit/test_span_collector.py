"""The in-process OTLP collector receives spans from a real OpenTelemetry SDK exporter."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from diffmesh.span_collector import CollectedSpan, SpanCollector
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExportResult


@pytest.fixture()
def collector() -> Iterator[SpanCollector]:
    with SpanCollector() as c:
        yield c


def provider(service: str, endpoint: str) -> TracerProvider:
    """A non-global SDK provider exporting over OTLP/gRPC to ``endpoint``."""
    p = TracerProvider(resource=Resource.create({"service.name": service}))
    p.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True), schedule_delay_millis=50))
    return p


def test_receives_spans_of_two_services_in_one_trace(collector: SpanCollector) -> None:
    front, back = provider("front", collector.endpoint), provider("back", collector.endpoint)
    with front.get_tracer("t").start_as_current_span("front.handle") as root:
        root.set_attribute("request", "r1")
        with back.get_tracer("t").start_as_current_span("back.load") as child:
            child.set_attribute("component_id", "sd15-a")
            child.set_attribute("bytes", 1234)
            child.set_attribute("ratio", 0.5)
            child.set_attribute("warm", True)
            child.set_attribute("tiers", ["SSD", "HOST"])
    # an unrelated trace from the same service
    with back.get_tracer("t").start_as_current_span("back.other"):
        pass
    assert front.force_flush(5000) and back.force_flush(5000)
    assert collector.wait_for(lambda spans: len(spans) == 3, timeout=10)

    trace_id = format(root.get_span_context().trace_id, "032x")
    spans = collector.trace(trace_id)
    assert [s.name for s in spans] == ["front.handle", "back.load"]
    assert collector.services_by_trace()[trace_id] == {"front", "back"}

    load = collector.by_service(trace_id)["back"][0]
    assert load.parent_span_id == format(root.get_span_context().span_id, "016x")
    assert load.attributes == {"component_id": "sd15-a", "bytes": 1234, "ratio": 0.5, "warm": True, "tiers": ["SSD", "HOST"]}
    assert load.resource["service.name"] == "back"
    assert load.duration_s >= 0 and not load.is_root
    assert collector.trace(trace_id)[0].is_root

    assert len(collector.traces()) == 2
    assert sorted(collector.by_service()) == ["back", "front"]
    front.shutdown()
    back.shutdown()


def test_export_result_is_success_and_clear_forgets(collector: SpanCollector) -> None:
    p = TracerProvider(resource=Resource.create({"service.name": "solo"}))
    exporter = OTLPSpanExporter(endpoint=collector.endpoint, insecure=True)
    p.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = p.get_tracer("t")
    with tracer.start_as_current_span("a"):
        pass
    assert collector.wait_for(lambda spans: any(s.name == "a" for s in spans), timeout=10)
    span = collector.spans()[0]
    assert isinstance(span, CollectedSpan) and span.service == "solo" and span.kind == trace_pb2.Span.SPAN_KIND_INTERNAL

    # the exporter reports SUCCESS for a direct export too
    finished = _finished_span(tracer)
    assert exporter.export([finished]) is SpanExportResult.SUCCESS

    collector.clear()
    assert collector.spans() == []
    assert not collector.wait_for(lambda spans: bool(spans), timeout=0.2)
    p.shutdown()


def _finished_span(tracer: trace.Tracer):  # type: ignore[no-untyped-def]
    span = tracer.start_span("direct")
    span.end()
    return span


def test_endpoint_requires_start() -> None:
    c = SpanCollector()
    with pytest.raises(RuntimeError):
        _ = c.endpoint
    c.start()
    try:
        assert c.endpoint == f"http://127.0.0.1:{c.port}"
    finally:
        c.stop()
