""":class:`diffmesh.view.ViewReplica` against a real coordinator on a real Redis: it follows every
kind of change, keeps its view while the coordinator is down, resumes after its last event id when
it comes back, and takes a fresh snapshot after a gap."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from diffmesh.channels import open_channel
from diffmesh.redis_server import free_port
from diffmesh.server import ServerThread
from diffmesh.tiers import Tier
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, plan_pb2
from diffmesh.view import ViewReplica
from diffmesh_coordinator.app import CoordinatorApp
from diffmesh_coordinator.settings import CoordinatorSettings

NODE = "vr-node"


async def until(check: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Polls ``check`` on the loop (the replica runs on it) until it is truthy."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_replica_follows_resumes_and_resyncs(redis_url: str) -> None:
    settings = CoordinatorSettings(redis_url=redis_url, namespace=f"vr-{uuid.uuid4().hex[:8]}:")
    port = free_port()
    coordinator = ServerThread(CoordinatorApp(settings), "127.0.0.1", port)

    async def scenario() -> None:
        nonlocal coordinator
        channel = open_channel(f"127.0.0.1:{port}")
        stub = coordinator_pb2_grpc.CacheCoordinatorServiceStub(channel)
        replica = ViewReplica(stub, backoff_initial_s=0.05, backoff_max_s=0.5)
        view = replica.view
        replica.start()
        try:
            assert await replica.wait_synced(30)
            await until(lambda: replica.connected, "the watch to open")
            # Every kind of change arrives: live set, residency, load.
            await stub.RegisterNode(
                coordinator_pb2.RegisterNodeRequest(
                    node=coordinator_pb2.NodeInfo(node_id=NODE, instance_manager_address="127.0.0.1:9")
                ),
                timeout=10,
            )
            await stub.RegisterWorker(
                coordinator_pb2.RegisterWorkerRequest(
                    worker=coordinator_pb2.WorkerInfo(worker_id="w1", node_id=NODE, address="127.0.0.1:11")
                ),
                timeout=10,
            )
            await until(lambda: (NODE, "w1") in view.workers, "the worker in the live set")
            update = coordinator_pb2.ResidencyUpdate(component_id="c1", tier=common_pb2.TIER_HOST, present=True, bytes=7)
            await stub.ReportResidency(coordinator_pb2.ReportResidencyRequest(node_id=NODE, updates=[update]), timeout=10)
            await until(lambda: (NODE, "", Tier.HOST) in view.copies("c1"), "the HOST copy")
            load = plan_pb2.WorkerLoad(
                worker=plan_pb2.WorkerRef(node_id=NODE, worker_id="w1"), queue_length=3, max_queue=4, measured_unix=time.time()
            )
            await stub.ReportLoad(coordinator_pb2.ReportLoadRequest(load=load), timeout=10)
            await until(lambda: (NODE, "w1") in view.loads and view.loads[(NODE, "w1")].queue_length == 3, "the load")
            staleness = replica.staleness_s()
            assert staleness is not None and staleness < 30
            assert replica.last_event_unix > 0 and view.last_event_id

            # The coordinator goes away: the replica keeps its view and says so.
            await asyncio.to_thread(coordinator.stop)
            await until(lambda: not replica.connected, "the replica to notice")
            assert (NODE, "w1") in view.workers and (NODE, "", Tier.HOST) in view.copies("c1")
            assert "routing on the last view" in replica.detail()
            # It comes back on the same port: the replica resumes after its last event id (no new snapshot).
            snapshots = view.snapshots_applied
            coordinator = await asyncio.to_thread(ServerThread, CoordinatorApp(settings), "127.0.0.1", port)
            await until(lambda: replica.connected, "the replica to reconnect")
            update = coordinator_pb2.ResidencyUpdate(component_id="c2", tier=common_pb2.TIER_SSD, present=True, bytes=9)
            await stub.ReportResidency(coordinator_pb2.ReportResidencyRequest(node_id=NODE, updates=[update]), timeout=10)
            await until(lambda: (NODE, "", Tier.SSD) in view.copies("c2"), "a change after the reconnect")
            assert view.snapshots_applied == snapshots
            assert replica.watches >= 2

            # A gap (an id the stream does not hold): the next watch starts with a snapshot that replaces the state.
            await replica.stop()
            view.apply_residency(
                plan_pb2.ResidencyChange(
                    node_id="ghost",
                    copies=[plan_pb2.ResidencyDelta(component_id="c9", tier=common_pb2.TIER_HOST, present=True, bytes=1)],
                )
            )
            view.last_event_id = "99999999999999-0"
            replica.start()
            await until(lambda: view.snapshots_applied == snapshots + 1, "a fresh snapshot")
            assert view.copies("c9") == {}
            assert (NODE, "", Tier.SSD) in view.copies("c2")
        finally:
            await replica.stop()
            await channel.close()

    try:
        asyncio.run(scenario())
    finally:
        coordinator.stop()
