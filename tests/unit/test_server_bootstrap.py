"""The shared server bootstrap: health, reflection, and the error-to-status interceptor."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from diffmesh.errors import InvalidArgument, NotFound, ResourceExhausted, retry_after_ms
from diffmesh.server import ServerThread
from diffmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


class _FailingWorker(worker_pb2_grpc.WorkerServiceServicer):
    """A servicer whose handlers raise library errors, to exercise the interceptor."""

    def __init__(self) -> None:
        self.calls = 0

    async def Status(self, request: worker_pb2.StatusRequest, context: aio.ServicerContext) -> worker_pb2.StatusResponse:
        self.calls += 1
        if self.calls == 1:
            raise ResourceExhausted("queue full", retry_after_s=2.5)
        if self.calls == 2:
            raise RuntimeError("boom")
        return worker_pb2.StatusResponse(worker_id="w")

    async def Run(self, request: worker_pb2.RunRequest, context: aio.ServicerContext) -> AsyncIterator[worker_pb2.RunResponse]:
        yield worker_pb2.RunResponse(step=common_pb2.ProgressStep(step=1, total=2))
        if request.request_id == "missing":
            raise NotFound("component", "nope")
        raise InvalidArgument("params.steps", "must be within 1..150, got 0")


class _Svc:
    name = "test"

    def __init__(self) -> None:
        self.started_port = 0
        self.stopped = False

    def add_to_server(self, server: aio.Server) -> list[str]:
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(_FailingWorker(), server)
        return ["diffmesh.v1.WorkerService"]

    async def start(self, port: int) -> None:
        self.started_port = port

    async def stop(self) -> None:
        self.stopped = True


@pytest.fixture()
def server() -> ServerThread:
    svc = _Svc()
    thread = ServerThread(svc)
    yield thread
    thread.stop()
    assert svc.stopped


def test_health_reflection_and_error_mapping(server: ServerThread) -> None:
    assert server.service.started_port == server.port  # type: ignore[attr-defined]
    with grpc.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "diffmesh.v1.WorkerService"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING

        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"diffmesh.v1.WorkerService", "grpc.health.v1.Health"} <= names

        stub = worker_pb2_grpc.WorkerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Status(worker_pb2.StatusRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry after 2.5 s" in err.value.details()
        assert retry_after_ms(err.value) == 2500

        with pytest.raises(grpc.RpcError) as err:
            stub.Status(worker_pb2.StatusRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "boom" not in err.value.details()

        assert stub.Status(worker_pb2.StatusRequest(), timeout=5).worker_id == "w"  # still serving

        events = stub.Run(worker_pb2.RunRequest(request_id="bad"), timeout=5)
        assert next(events).step.step == 1
        with pytest.raises(grpc.RpcError) as err:
            next(events)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "params.steps" in err.value.details()
        assert ("diffmesh-field", "params.steps") in tuple(err.value.trailing_metadata())

        with pytest.raises(grpc.RpcError) as err:
            list(stub.Run(worker_pb2.RunRequest(request_id="missing"), timeout=5))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'nope'" in err.value.details()
