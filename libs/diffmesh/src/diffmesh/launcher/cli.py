"""``diffmesh run``: the whole mesh on this machine, a set of demo requests, a report, a clean stop.

Exit status 0 when every request succeeded and the mesh stopped cleanly (no process
left, no shared memory leaked); 1 otherwise, with the reason on stderr; 130 when
interrupted. Everything started is stopped in every case.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from diffmesh.launcher.demo_requests import DemoRequest
from diffmesh.launcher.mesh import LocalMesh, MeshConfig, stderr_progress
from diffmesh.launcher.processes import ServiceFailed

say = stderr_progress


def add_parser(subparsers: Any) -> None:
    """Registers ``diffmesh run``."""
    p = subparsers.add_parser(
        "run",
        help="run the whole mesh locally and send demo requests",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="folder for PNGs, summary.json and logs (default out/demo)")
    p.add_argument("--models", type=Path, default=Path(".diffmesh/models"),
                   help="model folder with catalog.json; demo models are written there when missing (default .diffmesh/models)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="worker device (default auto)")
    p.add_argument("--host-pool-mb", type=int, default=256,
                   help="HOST shared-memory pool of the instance manager in MiB (default 256; 0 = one segment per component)")
    p.add_argument("--requests", type=Path, default=None, help="JSON file of requests instead of the demo set")
    p.add_argument("--keep-running", action="store_true", help="after the requests, keep serving until Ctrl-C / SIGTERM")
    p.set_defaults(func=run)


class _Interrupted(Exception):
    pass


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # Later signals are ignored: cleanup is already on its way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Interrupted(signal.Signals(signum).name)


def _client_tracer(endpoint: str) -> tuple[Any, Any]:
    """A tracer provider for this process (service ``diffmesh-run``) exporting to ``endpoint``."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "diffmesh-run"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True), schedule_delay_millis=200))
    # The client's gRPC interceptor uses the global provider to propagate the context.
    trace.set_tracer_provider(provider)
    return provider, trace.get_tracer("diffmesh.launcher")


def run(args: argparse.Namespace) -> int:
    """Runs the mesh, the requests and the report; returns the exit status."""
    if args.workers < 1:
        say("--workers must be at least 1")
        return 2
    from diffmesh.launcher.demo_requests import load_requests

    requests: list[DemoRequest] | None = None
    if args.requests is not None:
        try:
            requests = load_requests(args.requests)  # before anything starts: fail fast
        except ValueError as err:
            say(f"FAILED: {err}")
            return 2
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    out: Path = args.out.resolve()
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh SSD cache and fresh logs each run
    mesh = LocalMesh(MeshConfig(run_dir=run_dir, models_dir=args.models, workers=args.workers, device=args.device,
                                 host_pool_bytes=max(0, args.host_pool_mb) * 1024 * 1024))
    status = 0
    started = time.monotonic()
    try:
        mesh.start()
        say(f"mesh ready in {time.monotonic() - started:.1f} s; router at {mesh.router_address}; logs in {mesh.log_dir}")
        status = _serve_requests(mesh, out, requests)
        if args.keep_running:
            say(f"serving at {mesh.router_address} (coordinator {mesh.coordinator_address}); Ctrl-C to stop")
            threading.Event().wait()
    except _Interrupted as sig:
        say(f"interrupted ({sig}): stopping")
        status = 130
    except (ServiceFailed, ValueError, OSError, TimeoutError, RuntimeError) as err:
        say(f"FAILED: {err}")
        status = 1
    finally:
        say("stopping the mesh")
        problems = mesh.stop()
        for problem in problems:
            say(f"FAILED: {problem}")
        if problems and status == 0:
            status = 1
    return status


def _serve_requests(mesh: LocalMesh, out: Path, requests: list[DemoRequest] | None) -> int:
    from diffmesh.client import Client
    from diffmesh.launcher import report
    from diffmesh.launcher.demo_requests import demo_requests
    from diffmesh.launcher.runner import run_requests

    assert mesh.catalog_path is not None
    if requests is None:
        requests = demo_requests(mesh.catalog_path)
    provider, tracer = _client_tracer(mesh.otlp_endpoint)
    say(f"sending {len(requests)} requests")
    with Client(mesh.router_address) as client:
        outcomes = run_requests(client, requests, out, say, tracer)
    provider.force_flush(5000)
    if mesh.collector is not None:
        ids = [o.trace_id for o in outcomes if o.ok and o.trace_id]
        if not report.wait_for_request_spans(mesh.collector, ids, timeout=10):
            say("some request traces are incomplete (no worker.denoise span yet): their breakdown uses the worker's Timing")
    table = report.breakdowns(outcomes, mesh.collector)
    print("\nRequests\n" + report.render_requests(outcomes))
    print("\nLatency breakdown (seconds; from the spans of each request's trace)\n" + report.render_breakdown(outcomes, table))
    extra = {
        "router": mesh.router_address,
        "otlp_endpoint": mesh.otlp_endpoint,
        "models": str(mesh.models_dir),
        "logs": str(mesh.log_dir),
        "workers": sorted(mesh.worker_addresses()),
        "processes": {proc.name: proc.pid for proc in mesh.processes},
    }
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(report.summary(outcomes, table, extra), indent=2) + "\n")
    print(f"\nimages and summary.json in {out}", flush=True)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        reasons = "; ".join(f"{o.request.name}: {o.error}" for o in failed)
        say(f"FAILED: {len(failed)} of {len(outcomes)} requests failed: {reasons}")
        return 1
    return 0
