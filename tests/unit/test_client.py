"""The client SDK against a real gRPC server: one error hierarchy both ways, the same calls sync and async."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from diffmesh import errors
from diffmesh.client import (
    AsyncClient,
    Client,
    DiffmeshClientError,
    InvalidArgumentError,
    Lora,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from diffmesh.server import ServerThread
from diffmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from grpc import aio


class _Router(router_pb2_grpc.RouterServiceServicer):
    """Raises the library's errors the way the real router does; pages ListModels two at a time."""

    async def Generate(self, request: router_pb2.GenerateRequest, context: aio.ServicerContext) -> router_pb2.GenerateResponse:
        if request.params.steps == 0:
            raise errors.InvalidArgument("params.steps", "must be within 1..150, got 0")
        if request.pipeline.base_id == "busy":
            raise errors.ResourceExhausted("every worker is busy", retry_after_s=1.25)
        if request.pipeline.base_id == "down":
            raise errors.Unavailable("no worker serves this base")
        if request.pipeline.base_id == "bug":
            raise RuntimeError("boom")
        lora = request.pipeline.loras[0]
        return router_pb2.GenerateResponse(
            result=common_pb2.GenerationResult(request_id=request.request_id, worker_id=f"{lora.id}@{lora.scale:g}")
        )

    async def GenerateStream(
        self, request: router_pb2.GenerateStreamRequest, context: aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateStreamResponse]:
        yield router_pb2.GenerateStreamResponse(queued=common_pb2.ProgressQueued(position=1))
        yield router_pb2.GenerateStreamResponse()  # no event: skipped
        yield router_pb2.GenerateStreamResponse(step=common_pb2.ProgressStep(step=1, total=request.params.steps))
        if request.pipeline.base_id == "missing":
            raise errors.NotFound("component", "missing")
        yield router_pb2.GenerateStreamResponse(result=common_pb2.GenerationResult(request_id=request.request_id))

    async def ListModels(
        self, request: router_pb2.ListModelsRequest, context: aio.ServicerContext
    ) -> router_pb2.ListModelsResponse:
        ids = [f"m{i}" for i in range(5)]
        start = int(request.page_token or 0)
        end = start + 2
        return router_pb2.ListModelsResponse(
            models=[common_pb2.Component(id=i, family=request.family) for i in ids[start:end]],
            next_page_token=str(end) if end < len(ids) else "",
        )

    async def GetModel(self, request: router_pb2.GetModelRequest, context: aio.ServicerContext) -> router_pb2.GetModelResponse:
        raise errors.NotFound("model", request.id)


class _Svc:
    name = "fake-router"

    def add_to_server(self, server: aio.Server) -> list[str]:
        router_pb2_grpc.add_RouterServiceServicer_to_server(_Router(), server)
        return ["diffmesh.v1.RouterService"]

    async def start(self, port: int) -> None:
        pass

    async def stop(self) -> None:
        pass


@pytest.fixture(scope="module")
def router() -> Iterator[ServerThread]:
    thread = ServerThread(_Svc())
    yield thread
    thread.stop()


def test_blocking_client_raises_the_servers_error_classes(router: ServerThread) -> None:
    with Client(router.address, timeout=10) as client:
        result = client.generate("base", "a fox", loras=[Lora("ink", 0.5)], steps=2, request_id="r1")
        assert (result.request_id, result.worker_id) == ("r1", "ink@0.5")

        with pytest.raises(InvalidArgumentError) as invalid:
            client.generate("base", "a fox", loras=[Lora("ink")], steps=0)
        assert type(invalid.value) is errors.InvalidArgument
        assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert invalid.value.field == "params.steps"
        assert invalid.value.details == "invalid params.steps: must be within 1..150, got 0"
        assert str(invalid.value) == "INVALID_ARGUMENT: invalid params.steps: must be within 1..150, got 0"

        with pytest.raises(ResourceExhaustedError) as full:
            client.generate("busy", "a fox", loras=[Lora("ink")], steps=2)
        assert full.value.retry_after_s == 1.25 and full.value.field is None

        with pytest.raises(UnavailableError):
            client.generate("down", "a fox", loras=[Lora("ink")], steps=2)

        with pytest.raises(DiffmeshClientError) as internal:
            client.generate("bug", "a fox", loras=[Lora("ink")], steps=2)
        assert type(internal.value) is errors.Internal and "boom" not in internal.value.details

        with pytest.raises(NotFoundError) as missing:
            client.get_model("nope")
        assert "'nope'" in missing.value.details

        events = []
        with pytest.raises(NotFoundError):
            for event in client.generate_stream("missing", "a fox", steps=3):
                events.append(event)
        assert [type(e).__name__ for e in events] == ["ProgressQueued", "ProgressStep"]
        events = list(client.generate_stream("base", "a fox", steps=3, request_id="r2"))
        assert isinstance(events[-1], common_pb2.GenerationResult) and events[-1].request_id == "r2"

        assert [m.id for m in client.list_models(family="sd15")] == ["m0", "m1", "m2", "m3", "m4"]


def test_async_client_makes_the_same_calls(router: ServerThread) -> None:
    async def scenario() -> None:
        async with AsyncClient(router.address, timeout=10) as client:
            result = await client.generate("base", "a fox", loras=[Lora("ink", 0.5)], steps=2, request_id="r1")
            assert result.worker_id == "ink@0.5"
            with pytest.raises(InvalidArgumentError) as invalid:
                await client.generate("base", "a fox", loras=[Lora("ink")], steps=0)
            assert invalid.value.field == "params.steps"
            with pytest.raises(ResourceExhaustedError) as full:
                await client.generate("busy", "a fox", loras=[Lora("ink")], steps=2)
            assert full.value.retry_after_s == 1.25
            with pytest.raises(NotFoundError):
                await client.get_model("nope")
            events = [e async for e in client.generate_stream("base", "a fox", steps=3)]
            assert [type(e).__name__ for e in events] == ["ProgressQueued", "ProgressStep", "GenerationResult"]
            with pytest.raises(NotFoundError):
                _ = [e async for e in client.generate_stream("missing", "a fox", steps=3)]
            assert len(await client.list_models()) == 5

    asyncio.run(scenario())


def test_every_status_code_maps_to_one_class_and_back() -> None:
    for code, cls in errors.BY_CODE.items():
        assert cls.code == code
        err = errors.error_for_status(code, "details", field="f", retry_after_s=0.5)
        assert type(err) is cls and err.code == code
        assert (err.details, err.field, err.retry_after_s) == ("details", "f", 0.5)
        assert dict(err.trailing_metadata()) == {errors.FIELD_KEY: "f", errors.RETRY_AFTER_KEY: "500"}
    other = errors.error_for_status(grpc.StatusCode.ABORTED, "raced")
    assert type(other) is errors.DiffmeshError and other.code == grpc.StatusCode.ABORTED
    assert str(other) == "ABORTED: raced"


def test_the_client_imports_nothing_server_side() -> None:
    code = (
        "import sys, diffmesh.client; "
        "bad = [m for m in sys.modules if m.startswith(('diffmesh.server', 'diffmesh.interceptors', "
        "'grpc_health.', 'grpc_reflection.'))]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
