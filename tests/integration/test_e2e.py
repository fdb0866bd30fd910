"""End to end: the whole mesh as subprocesses (Redis, coordinator, instance manager, two
workers, router), driven through the client SDK, with traces received by the in-process
OTLP collector; and ``diffmesh run`` itself as a subprocess."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from diffmesh.client import AsyncClient, Client, ControlNet, InvalidArgumentError, Lora, NotFoundError
from diffmesh.launcher.demo_requests import edges_image, encode_png
from diffmesh.launcher.mesh import LocalMesh, MeshConfig
from diffmesh.launcher.processes import shm_segments
from diffmesh.span_collector import CollectedSpan, SpanCollector
from diffmesh.v1 import common_pb2
from PIL import Image

pytestmark = pytest.mark.e2e

SIZE = 64
STEPS = 3
# The `name` of each service's App: what it sets as the OTel service.name.
SERVICES = {"router", "worker", "instance-manager", "coordinator"}
# Unique per test process: an instance manager owns its node id on the host.
NODE_ID = f"e2e-node-{os.getpid()}"
CUSTOM_SPANS = {"worker.queue", "worker.load", "worker.load.component", "worker.denoise", "im.acquire.component"}


def _ids(models: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for comp in json.loads((models / "catalog.json").read_text())["components"]:
        out.setdefault(comp["kind"].removeprefix("COMPONENT_KIND_"), []).append(comp["id"])
    return {k: sorted(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def ids(demo_models: Path) -> dict[str, list[str]]:
    """Catalog ids of the demo models by kind."""
    return _ids(demo_models)


@pytest.fixture(scope="module")
def mesh(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """The running mesh with its own redis-server and OTLP collector (never the environment's)."""
    config = MeshConfig(
        run_dir=tmp_path_factory.mktemp("mesh"),
        models_dir=demo_models,
        workers=2,
        node_id=NODE_ID,
        redis_url="",
        otlp_endpoint="",
        progress=lambda line: print(f"[mesh] {line}", file=sys.stderr),
    )
    with LocalMesh(config) as running:
        yield running
    assert running.problems == [], running.problems


@pytest.fixture(scope="module")
def client(mesh: LocalMesh) -> Iterator[Client]:
    with Client(mesh.router_address, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def collector(mesh: LocalMesh) -> SpanCollector:
    assert mesh.collector is not None
    return mesh.collector


def generate(client: Client, base: str, **kw: object) -> common_pb2.GenerationResult:
    params: dict[str, object] = {"steps": STEPS, "width": SIZE, "height": SIZE, "seed": 11, "guidance_scale": 7.5}
    params.update(kw)
    return client.generate(base, "a lighthouse at dusk", **params)  # type: ignore[arg-type]


def pixels(png: bytes) -> bytes:
    """Decoded RGB pixels of a PNG."""
    return Image.open(io.BytesIO(png)).convert("RGB").tobytes()


def test_images_decode_with_requested_size_and_count(client: Client, ids: dict[str, list[str]]) -> None:
    result = generate(client, ids["BASE"][0], num_images=2, width=64, height=80)
    assert len(result.images) == 2
    for image in result.images:
        decoded = Image.open(io.BytesIO(image.png))
        assert decoded.format == "PNG"
        assert decoded.size == (64, 80)
        assert (image.width, image.height) == (64, 80)
    assert result.worker_id in {"worker-1", "worker-2"}
    assert result.node_id == NODE_ID
    assert result.pipeline_key
    assert {load.component_id for load in result.loads} == {ids["BASE"][0]}


def test_same_seed_gives_the_identical_image(client: Client, ids: dict[str, list[str]]) -> None:
    base = ids["BASE"][0]
    first = generate(client, base, seed=1234)
    second = generate(client, base, seed=1234)
    other = generate(client, base, seed=4321)
    assert pixels(first.images[0].png) == pixels(second.images[0].png)
    assert pixels(first.images[0].png) != pixels(other.images[0].png)


def test_lora_scale_zero_and_one_give_different_images(client: Client, ids: dict[str, list[str]]) -> None:
    base, lora = ids["BASE"][0], ids["LORA"][0]
    at_zero = generate(client, base, loras=[Lora(lora, 0.0)])
    at_one = generate(client, base, loras=[Lora(lora, 1.0)])
    assert pixels(at_zero.images[0].png) != pixels(at_one.images[0].png)
    assert lora in {load.component_id for load in at_one.loads}


def test_two_loras_at_different_scales(client: Client, ids: dict[str, list[str]]) -> None:
    base, (l1, l2) = ids["BASE"][0], ids["LORA"][:2]
    result = generate(client, base, loras=[Lora(l1, 0.8), Lora(l2, 0.4)])
    assert {load.component_id for load in result.loads} == {base, l1, l2}
    assert len(result.images) == 1


def test_controlnet_image_changes_the_output(client: Client, ids: dict[str, list[str]]) -> None:
    base, cn = ids["BASE"][0], ids["CONTROLNET"][0]
    edges = edges_image(SIZE, SIZE)
    blank = encode_png(SIZE, SIZE, bytes(SIZE * SIZE * 3))
    with_edges = generate(client, base, controlnets=[ControlNet(cn, edges)])
    with_blank = generate(client, base, controlnets=[ControlNet(cn, blank)])
    assert pixels(with_edges.images[0].png) != pixels(with_blank.images[0].png)
    assert cn in {load.component_id for load in with_edges.loads}


def test_stream_yields_progress_then_the_result(client: Client, ids: dict[str, list[str]]) -> None:
    events = list(client.generate_stream(ids["BASE"][0], "a harbour", steps=STEPS, width=SIZE, height=SIZE, seed=5))
    assert isinstance(events[-1], common_pb2.GenerationResult)
    assert len(events[-1].images) == 1
    steps = [e for e in events if isinstance(e, common_pb2.ProgressStep)]
    assert [s.step for s in steps] == list(range(1, STEPS + 1))
    assert all(s.total == STEPS for s in steps)


def test_list_and_get_models(client: Client, ids: dict[str, list[str]]) -> None:
    models = client.list_models()
    assert {m.id for m in models} >= {i for group in ids.values() for i in group}
    loras = client.list_models(kind=common_pb2.COMPONENT_KIND_LORA)
    assert loras and all(m.kind == common_pb2.COMPONENT_KIND_LORA for m in loras)
    got = client.get_model(ids["BASE"][0])
    assert got.model.id == ids["BASE"][0] and got.model.family == "sd15"
    with pytest.raises(NotFoundError):
        client.get_model("no-such-model")


def test_unknown_base_is_not_found_and_the_mesh_still_serves(client: Client, ids: dict[str, list[str]]) -> None:
    with pytest.raises(NotFoundError) as err:
        generate(client, "no-such-base")
    assert "no-such-base" in err.value.details
    assert len(generate(client, ids["BASE"][0]).images) == 1


def test_async_client_generates_and_maps_errors(mesh: LocalMesh, ids: dict[str, list[str]]) -> None:
    async def scenario() -> tuple[common_pb2.GenerationResult, list[str], str]:
        async with AsyncClient(mesh.router_address, timeout=300) as client:
            events = [e async for e in client.generate_stream(
                ids["BASE"][0], "a harbour", steps=STEPS, width=SIZE, height=SIZE, seed=5)]
            assert isinstance(events[-1], common_pb2.GenerationResult)
            models = [m.id for m in await client.list_models()]
            with pytest.raises(InvalidArgumentError) as err:
                await client.generate(ids["BASE"][0], "x", steps=0, width=SIZE, height=SIZE)
            return await client.generate(ids["BASE"][0], "x", steps=STEPS, width=SIZE, height=SIZE), models, err.value.details

    result, models, details = asyncio.run(scenario())
    assert len(result.images) == 1
    assert ids["BASE"][0] in models
    assert "steps" in details


def _services(spans: list[CollectedSpan]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s in spans:
        out.setdefault(s.trace_id, set()).add(s.service)
    return out


def test_one_trace_holds_spans_from_all_four_services(
    client: Client, collector: SpanCollector, ids: dict[str, list[str]]
) -> None:
    # A pipeline no other test used, so the instance manager and coordinator take part.
    base, lora = ids["BASE"][-1], ids["LORA"][-1]
    before = {s.trace_id for s in collector.spans()}
    generate(client, base, loras=[Lora(lora, 0.7)])

    def complete(spans: list[CollectedSpan]) -> str | None:
        """The new trace holding every service and custom span, one root and no dangling parent."""
        for tid, services in _services(spans).items():
            mine = [s for s in spans if s.trace_id == tid]
            span_ids = {s.span_id for s in mine}
            if (
                tid not in before
                and services >= SERVICES
                and CUSTOM_SPANS <= {s.name for s in mine}
                # The router's span is the only entry into the mesh: a root, or the child of a
                # span of the calling process (when that process has a tracer provider too).
                and [s.name for s in mine if s.is_root or s.parent_span_id not in span_ids]
                == ["/diffmesh.v1.RouterService/Generate"]
            ):
                return tid
        return None

    assert collector.wait_for(lambda spans: complete(spans) is not None, timeout=90), {
        tid: (sorted(services), sorted({(s.service, s.name, s.is_root) for s in collector.trace(tid)}))
        for tid, services in _services(collector.spans()).items()
        if tid not in before
    }
    trace_id = complete(collector.spans())
    assert trace_id is not None
    spans = collector.trace(trace_id)
    loaded = {s.attributes.get("component_id") for s in spans if s.name == "worker.load.component"}
    assert {base, lora} <= loaded


def test_diffmesh_run_end_to_end(demo_models: Path, tmp_path: Path) -> None:
    """The README's run command: exit 0, PNGs and summary.json written, nothing left behind."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "OTEL_EXPORTER_OTLP_ENDPOINT"}}
    segments_before = shm_segments()
    diffmesh = Path(sys.executable).parent / "diffmesh"
    proc = subprocess.run(
        [str(diffmesh), "run", "--out", str(out), "--models", str(demo_models)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    summary = json.loads((out / "summary.json").read_text())
    requests = summary["requests"]
    assert [r["name"] for r in requests] == ["txt2img", "one-lora", "two-loras", "controlnet", "txt2img-warm"]
    for r in requests:
        assert r["ok"], r
        assert r["images"] and all(Path(p).exists() for p in r["images"])
        Image.open(r["images"][0]).verify()
        assert r["breakdown"]["source"] == "spans"
        assert r["worker_id"] in {"worker-1", "worker-2"}
    # the repeat of the first request finds its pipeline already built on a worker
    assert {c["tier"] for c in requests[-1]["components"]} == {"GPU"}
    assert "Latency breakdown" in proc.stdout and "txt2img-warm" in proc.stdout

    assert set(summary["processes"]) == {"coordinator", "instance-manager", "worker-1", "worker-2", "router"}
    for pid in summary["processes"].values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    leaked = {s for s in shm_segments() - segments_before if s.startswith("dm_node-1_")}
    assert leaked == set()
