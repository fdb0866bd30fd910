"""The worker's warm standby (``DIFFMESH_WORKER_STANDBY``), against real services: the real
coordinator (real Redis, demo catalog), the real instance manager (real SSD dir, POSIX shared
memory) of ``worker_mesh`` and standby workers beside its worker, in-process (``Activate``) and
as a ``diffmesh-worker`` process (SIGUSR1).

* a standby is NOT_SERVING, not registered, and refuses ``Run`` with FAILED_PRECONDITION;
* ``Activate`` makes it a worker of its node under the identity the request gives: it
  registers (``ListNodes``) and serves a ``Run``;
* a second ``Activate`` is FAILED_PRECONDITION; a bad field is INVALID_ARGUMENT naming it,
  and the worker stays on standby;
* SIGUSR1 activates a standby process with its settings.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from diffmesh.errors import FIELD_KEY
from diffmesh.launcher.processes import ChildProcess, ServiceSpec, free_port
from diffmesh.server import ServerThread
from diffmesh.v1 import coordinator_pb2, worker_pb2, worker_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.waiting import wait_for
from tests.support.worker import NODE_ID, WORKER_ID, WorkerMesh, make_request

SERVICE_NAME = "diffmesh.v1.WorkerService"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


@contextmanager
def standby_worker(**settings: Any) -> Iterator[tuple[ServerThread, worker_pb2_grpc.WorkerServiceStub]]:
    """An in-process standby worker (CPU, one torch thread) with ``settings``, and a stub to it."""
    from diffmesh_worker.app import WorkerApp
    from diffmesh_worker.settings import WorkerSettings

    server = ServerThread(WorkerApp(WorkerSettings(standby=True, device="cpu", torch_threads=1, **settings)))
    channel = grpc.insecure_channel(server.address)
    try:
        yield server, worker_pb2_grpc.WorkerServiceStub(channel)
    finally:
        channel.close()
        server.stop()


def _health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return int(reply.status)


def _workers(mesh: WorkerMesh) -> set[str]:
    """``worker_id`` of every live worker the coordinator lists on ``NODE_ID``."""
    nodes = mesh.coord.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=10).nodes
    return {w.worker_id for n in nodes if n.node_id == NODE_ID for w in n.workers}


def _rpc_error(call: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        result = call(request, timeout=60)
        if not isinstance(result, worker_pb2.ActivateResponse):
            list(result)  # a stream fails on its first read
    return err.value


def test_standby_is_not_ready_not_registered_and_refuses_run(worker_mesh: WorkerMesh) -> None:
    with standby_worker(
        worker_id="wk-standby-idle",
        node_id=NODE_ID,
        instance_manager=worker_mesh.im.address,
        coordinator=worker_mesh.coordinator.address,
    ) as (server, stub):
        assert _health(server.address) == NOT_SERVING
        assert _health(server.address, SERVICE_NAME) == NOT_SERVING
        status = stub.Status(worker_pb2.StatusRequest(), timeout=10)
        assert status.standby and status.worker_id == "wk-standby-idle"

        err = _rpc_error(stub.Run, make_request())
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "standby: not activated" in (err.details() or "")

        # The mesh's own worker registers with this coordinator; the standby does not.
        wait_for(lambda: WORKER_ID in _workers(worker_mesh), "the mesh's worker to be registered")
        assert "wk-standby-idle" not in _workers(worker_mesh)
        assert stub.Status(worker_pb2.StatusRequest(), timeout=10).standby


def test_activate_registers_under_the_given_identity_and_serves(worker_mesh: WorkerMesh) -> None:
    # Started with no coordinator and another worker id: the request makes it a worker of the mesh's node.
    with standby_worker(worker_id="wk-standby-spare", node_id="some-other-node", coordinator="") as (server, stub):
        reply = stub.Activate(
            worker_pb2.ActivateRequest(
                worker_id="wk-standby-1",
                node_id=NODE_ID,
                instance_manager=worker_mesh.im.address,
                coordinator=worker_mesh.coordinator.address,
            ),
            timeout=30,
        )
        assert (reply.worker_id, reply.node_id) == ("wk-standby-1", NODE_ID) and reply.standby_seconds > 0
        assert _health(server.address) == SERVING and _health(server.address, SERVICE_NAME) == SERVING
        status = stub.Status(worker_pb2.StatusRequest(), timeout=10)
        assert not status.standby and (status.worker_id, status.node_id) == ("wk-standby-1", NODE_ID)
        wait_for(lambda: "wk-standby-1" in _workers(worker_mesh), "the activated worker at ListNodes")

        events = list(stub.Run(make_request(seed=3), timeout=120))
        result = events[-1].result
        assert events[-1].WhichOneof("event") == "result" and len(result.images) == 1
        assert (result.worker_id, result.node_id) == ("wk-standby-1", NODE_ID)

        again = _rpc_error(stub.Activate, worker_pb2.ActivateRequest())
        assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "active already" in (again.details() or "")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("worker_id", "bad id!"),
        ("node_id", ""),
        ("instance_manager", "no-port"),
        ("coordinator", "127.0.0.1:70000"),
    ],
)
def test_activate_with_a_bad_field_is_invalid_argument_naming_it(worker_mesh: WorkerMesh, field: str, value: str) -> None:
    good = {
        "worker_id": f"wk-standby-bad-{field.replace('_', '-')}",
        "node_id": NODE_ID,
        "instance_manager": worker_mesh.im.address,
        "coordinator": worker_mesh.coordinator.address,
    }
    with standby_worker() as (server, stub):
        err = _rpc_error(stub.Activate, worker_pb2.ActivateRequest(**{**good, field: value}))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (err.details() or "")
        assert dict(err.trailing_metadata() or ())[FIELD_KEY] == field
        # Still a standby, and a good request activates it.
        assert stub.Status(worker_pb2.StatusRequest(), timeout=10).standby
        assert _health(server.address) == NOT_SERVING
        assert stub.Activate(worker_pb2.ActivateRequest(**good), timeout=30).worker_id == good["worker_id"]
        assert _health(server.address) == SERVING


def test_sigusr1_activates_a_standby_process(worker_mesh: WorkerMesh, tmp_path: Path) -> None:
    port, p = free_port(), "DIFFMESH_WORKER_"
    env = {
        f"{p}HOST": "127.0.0.1",
        f"{p}PORT": str(port),
        f"{p}GRACE_SECONDS": "2",
        f"{p}STANDBY": "true",
        f"{p}WORKER_ID": "wk-standby-signal",
        f"{p}NODE_ID": NODE_ID,
        f"{p}INSTANCE_MANAGER": worker_mesh.im.address,
        f"{p}COORDINATOR": worker_mesh.coordinator.address,
        f"{p}DEVICE": "cpu",
        f"{p}TORCH_THREADS": "1",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
    }
    proc = ChildProcess(ServiceSpec("standby-worker", "diffmesh-worker", port, env), tmp_path, os.environ).start()
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)

            def on_standby() -> bool:
                assert proc.running(), proc.log_tail()
                try:
                    return stub.Status(worker_pb2.StatusRequest(), timeout=5).standby
                except grpc.RpcError:
                    return False

            wait_for(on_standby, "the standby process to answer Status", timeout=120)
            assert _health(proc.address) == NOT_SERVING
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGUSR1)
            proc.wait_serving(timeout=60)
            assert not stub.Status(worker_pb2.StatusRequest(), timeout=10).standby
            wait_for(lambda: "wk-standby-signal" in _workers(worker_mesh), "the signalled worker at ListNodes")
    finally:
        problems = proc.stop(20.0)
    assert problems == [], problems
