"""Sends requests through the client SDK, one trace per request, and writes the PNGs."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from opentelemetry import trace

from diffmesh.client import Client, DiffmeshClientError, UnavailableError
from diffmesh.errors import error_for_status
from diffmesh.launcher.demo_requests import DemoRequest
from diffmesh.tiers import Tier
from diffmesh.v1 import common_pb2

Progress = Callable[[str], None]


@dataclass
class RequestOutcome:
    """What happened to one request: its result (or error), latency, trace id and files."""

    index: int
    request: DemoRequest
    result: common_pb2.GenerationResult | None = None
    latency_s: float = 0.0
    trace_id: str = ""
    images: list[Path] = field(default_factory=list)
    events: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        """True when the request returned a result."""
        return self.result is not None and not self.error


def _generate(client: Client, req: DemoRequest, say: Progress) -> tuple[common_pb2.GenerationResult, int]:
    """Runs one request through GenerateStream; returns the result and the number of events."""
    result: common_pb2.GenerationResult | None = None
    events = 0
    for event in client.generate_stream(
        req.base_id,
        req.prompt,
        loras=req.loras,
        controlnets=req.controlnets,
        negative_prompt=req.negative_prompt,
        steps=req.steps,
        guidance_scale=req.guidance_scale,
        seed=req.seed,
        width=req.width,
        height=req.height,
        num_images=req.num_images,
        request_id=f"demo-{req.name}",
        tenant="demo",
    ):
        events += 1
        if isinstance(event, common_pb2.GenerationResult):
            result = event
        elif isinstance(event, common_pb2.ProgressLoading):
            tier = Tier(event.source_tier).label
            say(f"  {req.name}: loading {event.component_id} from {tier} ({event.bytes:,} B)")
    if result is None:
        raise error_for_status(grpc.StatusCode.UNKNOWN, "the stream ended without a result")
    return result, events


def run_requests(
    client: Client,
    requests: Sequence[DemoRequest],
    out_dir: Path,
    say: Progress,
    tracer: trace.Tracer | None = None,
    unavailable_retry_s: float = 30.0,
) -> list[RequestOutcome]:
    """Sends every request in order; writes ``<out_dir>/<NN>-<name>-<k>.png``; never raises for one request.

    UNAVAILABLE is retried for ``unavailable_retry_s`` (the router may still be learning
    about the workers right after start); every other error is recorded in the outcome.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes: list[RequestOutcome] = []
    for index, req in enumerate(requests, 1):
        outcome = RequestOutcome(index, req)
        span_cm = tracer.start_as_current_span(f"demo {req.name}") if tracer is not None else nullcontext(None)
        deadline = time.monotonic() + unavailable_retry_s
        with span_cm as span:
            if span is not None:
                span.set_attribute("demo.request", req.name)
                outcome.trace_id = format(span.get_span_context().trace_id, "032x")
            while True:
                started = time.monotonic()
                try:
                    outcome.result, outcome.events = _generate(client, req, say)
                    outcome.latency_s = time.monotonic() - started
                    break
                except UnavailableError as err:
                    if time.monotonic() > deadline:
                        outcome.error = str(err)
                        break
                    time.sleep(0.5)
                except DiffmeshClientError as err:
                    outcome.error = str(err)
                    break
        if outcome.result is not None:
            for k, image in enumerate(outcome.result.images):
                path = out_dir / f"{index:02d}-{req.name}-{k}.png"
                path.write_bytes(image.png)
                outcome.images.append(path)
            say(f"request {index} {req.name}: {len(outcome.images)} image(s) from {outcome.result.worker_id} "
                f"in {outcome.latency_s:.2f} s")
        else:
            say(f"request {index} {req.name}: FAILED: {outcome.error}")
        outcomes.append(outcome)
    return outcomes
