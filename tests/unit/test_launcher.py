"""Pieces of ``diffmesh run`` that need no running mesh: demo requests, PNGs, the breakdown, process stop."""

from __future__ import annotations

import io
import json
import signal
import sys
from pathlib import Path

import pytest
from diffmesh.launcher.demo_requests import demo_requests, edges_image, encode_png, load_requests
from diffmesh.launcher.processes import ChildProcess, ServiceFailed, ServiceSpec, free_port
from diffmesh.launcher.report import breakdown_from_spans, render_breakdown, spans_complete, tier_label
from diffmesh.launcher.runner import RequestOutcome
from diffmesh.span_collector import CollectedSpan
from diffmesh.v1 import common_pb2
from PIL import Image


def test_encode_png_decodes_with_pillow() -> None:
    rgb = bytes(range(256)) * 3 * 4  # 16 x 16 pixels
    png = encode_png(16, 16, rgb[: 16 * 16 * 3])
    image = Image.open(io.BytesIO(png))
    assert image.size == (16, 16) and image.mode == "RGB"
    assert image.tobytes() == rgb[: 16 * 16 * 3]
    with pytest.raises(ValueError):
        encode_png(4, 4, b"\x00")


def test_edges_image_has_white_outlines_on_black() -> None:
    image = Image.open(io.BytesIO(edges_image(64, 64))).convert("L")
    values = set(image.tobytes())
    assert values == {0, 255}


def _catalog(tmp_path: Path) -> Path:
    kinds = [("b2", "BASE"), ("b1", "BASE"), ("l1", "LORA"), ("l2", "LORA"), ("c1", "CONTROLNET")]
    comps = [{"id": i, "kind": k} for i, k in kinds]
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"components": comps}))
    return path


def test_demo_set_covers_the_issue_cases(tmp_path: Path) -> None:
    reqs = demo_requests(_catalog(tmp_path))
    assert [r.name for r in reqs] == ["txt2img", "one-lora", "two-loras", "controlnet", "txt2img-warm"]
    assert all(r.base_id == "b1" for r in reqs)
    assert [lo.scale for lo in reqs[2].loras] == [0.8, 0.4]
    assert reqs[3].controlnets[0].id == "c1" and reqs[3].controlnets[0].image.startswith(b"\x89PNG")
    assert (reqs[4].seed, reqs[4].prompt) == (reqs[0].seed, reqs[0].prompt)


def test_load_requests_reads_and_rejects(tmp_path: Path) -> None:
    (tmp_path / "cond.png").write_bytes(encode_png(8, 8, bytes(8 * 8 * 3)))
    good = tmp_path / "good.json"
    good.write_text(json.dumps([
        {"name": "a", "base_id": "b1", "loras": [{"id": "l1", "scale": 0.5}], "steps": 2},
        {"name": "b", "base_id": "b1", "controlnet": {"id": "c1", "image": "cond.png"}},
    ]))
    reqs = load_requests(good)
    assert reqs[0].loras[0].scale == 0.5 and reqs[0].steps == 2
    assert reqs[1].controlnets[0].image == (tmp_path / "cond.png").read_bytes()

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "x"}]))
    with pytest.raises(ValueError, match="request #0"):
        load_requests(bad)
    bad.write_text(json.dumps([{"name": "x", "base_id": "b", "steps": "many"}]))
    with pytest.raises(ValueError, match="x"):
        load_requests(bad)


def span(name: str, start: float, end: float, parent: str = "p", **attrs: object) -> CollectedSpan:
    return CollectedSpan("t", name, parent, name, "svc", int(start * 1e9), int(end * 1e9), attributes=dict(attrs))


def test_breakdown_from_spans_splits_queue_load_per_tier_and_denoise() -> None:
    spans = [
        span("demo", 0.0, 2.0, parent=""),
        span("worker.queue", 0.1, 0.3),
        span("worker.load", 0.3, 1.3),
        span("worker.load.component", 0.3, 1.0, source_tier="TIER_SSD", component_id="b", bytes=100),
        span("worker.load.component", 1.0, 1.3, source_tier=3, component_id="l", bytes=10),
        span("im.acquire.component", 0.35, 0.9, source_tier="SSD"),
        span("worker.denoise", 1.3, 1.8),
    ]
    b = breakdown_from_spans(spans)
    assert b is not None and b.source == "spans"
    assert b.total_s == pytest.approx(2.0)
    assert (b.queue_s, b.load_s, b.denoise_s) == pytest.approx((0.2, 1.0, 0.5))
    assert b.other_s == pytest.approx(0.3)
    assert b.load_by_tier_s == pytest.approx({"SSD": 0.7, "HOST": 0.3})
    assert b.bytes_by_tier == {"SSD": 100, "HOST": 10}
    assert b.im_acquire_by_tier_s == pytest.approx({"SSD": 0.55})
    assert spans_complete(spans) and not spans_complete(spans[1:])
    assert breakdown_from_spans([span("router", 0, 1, parent="")]) is None

    from diffmesh.launcher.demo_requests import DemoRequest

    text = render_breakdown([RequestOutcome(1, DemoRequest("r", "b"), common_pb2.GenerationResult())], {1: b})
    assert "SSD 0.700" in text and "HOST 0.300" in text


def test_tier_label() -> None:
    assert tier_label(common_pb2.TIER_GPU) == "GPU"
    assert tier_label("TIER_REMOTE") == "REMOTE"
    assert tier_label("host") == "HOST"
    assert tier_label(None) == "?"


def test_child_process_stop_sigterm_and_failure_log(tmp_path: Path) -> None:
    script = tmp_path / "sleeper"
    script.write_text(f"#!{sys.executable}\nimport time, sys\nprint('hello from the child', flush=True)\ntime.sleep(60)\n")
    script.chmod(0o755)
    proc = ChildProcess(ServiceSpec("sleeper", str(script), free_port()), tmp_path / "logs", {})
    proc.start()
    with pytest.raises(ServiceFailed, match="not SERVING"):
        proc.wait_serving(timeout=1.0)
    assert proc.running()
    assert proc.stop(grace=10) == []
    assert proc.returncode == -signal.SIGTERM
    assert "hello from the child" in proc.log_path.read_text()


def test_free_port_never_hands_out_a_port_twice() -> None:
    """Ports picked one after another for one mesh are distinct, even when the kernel reuses a closed one."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
