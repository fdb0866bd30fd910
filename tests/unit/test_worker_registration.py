"""Worker registration, heartbeats and GPU-tier residency against the real coordinator on real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from diffmesh.server import ServerThread
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from diffmesh_coordinator.app import CoordinatorApp
from diffmesh_coordinator.settings import CoordinatorSettings
from diffmesh_worker.registration import Registrar
from grpc import aio

COMPONENT = "sd15-tiny-a"
LEASE_S = 1.0


@pytest.fixture(scope="module")
def coordinator(redis_url: str, demo_models: Path) -> Iterator[ServerThread]:
    settings = CoordinatorSettings(
        redis_url=redis_url,
        namespace=f"wreg{uuid.uuid4().hex[:8]}:",
        catalog=str(demo_models / "catalog.json"),
        lease_seconds=LEASE_S,
    )
    server = ServerThread(CoordinatorApp(settings))
    yield server
    server.stop()


def test_registers_reports_and_reregisters_after_lapse(coordinator: ServerThread) -> None:
    async def scenario() -> None:
        channel = aio.insecure_channel(coordinator.address)
        stub = coordinator_pb2_grpc.CacheCoordinatorServiceStub(channel)
        node = coordinator_pb2.NodeInfo(node_id="n1", instance_manager_address="127.0.0.1:1")
        info = coordinator_pb2.WorkerInfo(
            worker_id="w1", node_id="n1", address="127.0.0.1:2", device="cpu", device_memory_bytes=1
        )
        resident = [(COMPONENT, 1234, time.time())]
        registrar = Registrar(stub, info, lambda: list(resident), timeout_s=5)

        async def gpu_copies() -> list[tuple[str, int]]:
            await stub.Heartbeat(coordinator_pb2.HeartbeatRequest(node_id="n1"))  # keep the node itself live
            loc = (await stub.Locate(coordinator_pb2.LocateRequest(component_ids=[COMPONENT]))).locations[0]
            return [(r.worker_id, r.bytes) for r in loc.residencies if r.tier == common_pb2.TIER_GPU]

        await stub.RegisterNode(coordinator_pb2.RegisterNodeRequest(node=node))
        await registrar.beat()  # registers and sends the full snapshot
        assert registrar.registered.is_set() and registrar.lease_seconds == LEASE_S
        workers = [w for n in (await stub.ListNodes(coordinator_pb2.ListNodesRequest())).nodes for w in n.workers]
        assert [(w.worker_id, w.address) for w in workers] == [("w1", "127.0.0.1:2")]
        assert await gpu_copies() == [("w1", 1234)]

        # The worker misses its heartbeats: the lease lapses and its residency disappears.
        await asyncio.sleep(LEASE_S * 1.5)
        await stub.RegisterNode(coordinator_pb2.RegisterNodeRequest(node=node))
        assert await gpu_copies() == []
        await registrar.beat()  # heartbeat → reregister → register + full snapshot
        assert await gpu_copies() == [("w1", 1234)]

        # Changes flow through the background reporter.
        registrar.start()
        registrar.report(False, [(COMPONENT, 1234)])
        deadline = time.monotonic() + 5
        while await gpu_copies() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await gpu_copies() == []
        await registrar.stop()
        await channel.close()

    asyncio.run(scenario())


def test_unreachable_coordinator_is_retried_without_failing() -> None:
    async def scenario() -> None:
        channel = aio.insecure_channel("127.0.0.1:1")  # nothing listens there
        stub = coordinator_pb2_grpc.CacheCoordinatorServiceStub(channel)
        info = coordinator_pb2.WorkerInfo(worker_id="w", node_id="n", address="127.0.0.1:2")
        registrar = Registrar(stub, info, list, timeout_s=0.2)
        registrar.start()
        registrar.report(True, [("x", 1)])
        await asyncio.sleep(0.5)
        assert not registrar.registered.is_set()
        await registrar.stop()
        await channel.close()

    asyncio.run(scenario())
