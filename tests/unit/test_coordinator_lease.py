"""The shared coordinator lease protocol against the real coordinator on real Redis.

A node holds the lease here (``RegisterNode``, SSD/HOST updates); the worker's use of the
same class is covered by test_worker_registration.py. Every wait is on a condition.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TypeVar

import grpc
import pytest
import redis
from diffmesh.coordinator_lease import CoordinatorLease
from diffmesh.server import ServerThread
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from diffmesh_coordinator.app import CoordinatorApp
from diffmesh_coordinator.keys import KeyLayout
from diffmesh_coordinator.settings import CoordinatorSettings
from grpc import aio

T = TypeVar("T")
Stub = coordinator_pb2_grpc.CacheCoordinatorServiceStub
HOST, SSD = common_pb2.TIER_HOST, common_pb2.TIER_SSD
COMPONENTS = ("lease-a", "lease-b", "lease-c", "lease-d")
# Reconnect fast once a coordinator appears on a port that had none.
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 200)]


class NodeCalls:
    """A node's lease RPCs, counting how often each was made."""

    def __init__(self, stub: Stub, node_id: str) -> None:
        self.stub = stub
        self.node = coordinator_pb2.NodeInfo(node_id=node_id, instance_manager_address="127.0.0.1:1")
        self.registers = 0
        self.register_attempts = 0
        self.heartbeats = 0

    async def register(self) -> float:
        self.register_attempts += 1
        resp = await self.stub.RegisterNode(coordinator_pb2.RegisterNodeRequest(node=self.node), timeout=5)
        self.registers += 1
        return float(resp.lease_seconds)

    async def heartbeat(self) -> coordinator_pb2.HeartbeatResponse:
        resp: coordinator_pb2.HeartbeatResponse = await self.stub.Heartbeat(
            coordinator_pb2.HeartbeatRequest(node_id=self.node.node_id), timeout=5
        )
        self.heartbeats += 1
        return resp

    async def report(self, updates: Sequence[coordinator_pb2.ResidencyUpdate], full_snapshot: bool) -> None:
        await self.stub.ReportResidency(
            coordinator_pb2.ReportResidencyRequest(node_id=self.node.node_id, updates=updates, full_snapshot=full_snapshot),
            timeout=5,
        )


def _update(cid: str, tier: int = HOST, present: bool = True, size: int = 1000) -> coordinator_pb2.ResidencyUpdate:
    return coordinator_pb2.ResidencyUpdate(component_id=cid, tier=tier, present=present, bytes=size, last_used_unix=1.7e9)  # type: ignore[arg-type]


def _coordinator(redis_url: str, lease_seconds: float, port: int = 0) -> ServerThread:
    settings = CoordinatorSettings(
        redis_url=redis_url, namespace=f"lease{uuid.uuid4().hex[:8]}:", lease_seconds=lease_seconds, sweep_seconds=3600
    )
    server = ServerThread(CoordinatorApp(settings), port=port)
    with grpc.insecure_channel(server.address) as ch:
        for cid in COMPONENTS:
            component = common_pb2.Component(
                id=cid,
                kind=common_pb2.COMPONENT_KIND_LORA,
                family="sd15",
                uri=f"file:///models/{cid}.safetensors",
                bytes=1000,
                sha256="0123456789abcdef" * 4,
            )
            Stub(ch).RegisterComponent(coordinator_pb2.RegisterComponentRequest(component=component), timeout=10)
    return server


@pytest.fixture(scope="module")
def coordinator(redis_url: str) -> Iterator[ServerThread]:
    """A coordinator with a long lease: only what the test does makes a holder lose it."""
    server = _coordinator(redis_url, lease_seconds=60)
    yield server
    server.stop()


async def _eventually(check: Callable[[], T | Awaitable[T]], what: str, timeout: float = 30.0) -> T:
    """Polls ``check`` (sync or async) until it returns something truthy, and returns that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _copies(stub: Stub, node_id: str) -> set[tuple[str, str]]:
    """(component, tier) of every copy the coordinator places on ``node_id``."""
    resp = await stub.Locate(coordinator_pb2.LocateRequest(component_ids=COMPONENTS), timeout=5)
    return {
        (loc.component_id, common_pb2.Tier.Name(r.tier))
        for loc in resp.locations
        for r in loc.residencies
        if r.node_id == node_id
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _forget(server: ServerThread, redis_url: str, node_id: str) -> None:
    """Makes the coordinator forget the node's lease, as a lapse would."""
    app = server.service
    assert isinstance(app, CoordinatorApp)
    db = redis.Redis.from_url(redis_url)
    try:
        assert db.delete(KeyLayout(app.settings.namespace).node(node_id)) == 1
    finally:
        db.close()


def test_registers_with_a_snapshot_and_heartbeats_within_the_lease(redis_url: str) -> None:
    server = _coordinator(redis_url, lease_seconds=2.0)

    async def scenario() -> None:
        async with aio.insecure_channel(server.address) as channel:
            stub = Stub(channel)
            calls = NodeCalls(stub, "hb-node")
            lease = CoordinatorLease(calls, lambda: [_update("lease-a", SSD)], holder="node hb-node")
            lease.start()
            try:
                assert await lease.flush()
                assert lease.lease_seconds == 2.0
                assert await _copies(stub, "hb-node") == {("lease-a", "TIER_SSD")}
                # Seven heartbeats span more than two leases: every third of the lease keeps it.
                await _eventually(lambda: calls.heartbeats >= 7, "seven heartbeats")
                assert calls.registers == 1
                nodes = (await stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=5)).nodes
                assert [n.node_id for n in nodes] == ["hb-node"]
            finally:
                await lease.stop()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_changes_made_while_unreachable_are_kept_coalesced_and_sent_after_registering(redis_url: str) -> None:
    port = _free_port()
    started: list[ServerThread] = []

    async def scenario() -> None:
        async with aio.insecure_channel(f"127.0.0.1:{port}", options=FAST_RECONNECT) as channel:
            stub = Stub(channel)
            calls = NodeCalls(stub, "late-node")
            # The snapshot holds lease-d only: lease-a can reach the coordinator only through the buffer.
            lease = CoordinatorLease(calls, lambda: [_update("lease-d", SSD)], holder="node late-node", retry_s=0.1)
            lease.start()
            try:
                lease.changed(_update("lease-a"))
                lease.changed(_update("lease-b"))
                lease.changed(_update("lease-b", present=False))
                await _eventually(lambda: calls.register_attempts >= 2, "failed registration attempts")
                assert not lease.registered.is_set()
                assert [(u.component_id, u.present) for u in lease.pending] == [("lease-a", True), ("lease-b", False)]

                started.append(await asyncio.to_thread(_coordinator, redis_url, 60, port))
                assert await lease.flush()
                assert calls.registers == 1
                assert lease.pending == []
                assert await _copies(stub, "late-node") == {("lease-a", "TIER_HOST"), ("lease-d", "TIER_SSD")}
            finally:
                await lease.stop()

    try:
        asyncio.run(scenario())
    finally:
        for server in started:
            server.stop()


def test_a_report_answered_not_found_registers_again_and_keeps_the_change(coordinator: ServerThread, redis_url: str) -> None:
    async def scenario() -> None:
        async with aio.insecure_channel(coordinator.address) as channel:
            stub = Stub(channel)
            calls = NodeCalls(stub, "nf-node")
            held = [_update("lease-a")]
            lease = CoordinatorLease(calls, lambda: list(held), holder="node nf-node")
            lease.start()
            try:
                assert await lease.flush()
                _forget(coordinator, redis_url, "nf-node")
                # The next report meets NOT_FOUND long before the next heartbeat (a third of 60 s).
                held.append(_update("lease-c"))
                lease.changed(_update("lease-c"))
                assert await lease.flush()
                assert calls.registers == 2
                assert await _copies(stub, "nf-node") == {("lease-a", "TIER_HOST"), ("lease-c", "TIER_HOST")}
            finally:
                await lease.stop()

    asyncio.run(scenario())


def test_a_heartbeat_answered_reregister_registers_again(coordinator: ServerThread, redis_url: str) -> None:
    async def scenario() -> None:
        async with aio.insecure_channel(coordinator.address) as channel:
            stub = Stub(channel)
            calls = NodeCalls(stub, "rr-node")
            lease = CoordinatorLease(calls, lambda: [_update("lease-b", SSD)], holder="node rr-node")
            await lease.beat()  # registers and sends the snapshot
            assert lease.registered.is_set() and calls.registers == 1 and lease.lease_seconds == 60
            await lease.beat()  # renews
            assert calls.registers == 1 and calls.heartbeats == 1
            _forget(coordinator, redis_url, "rr-node")
            await lease.beat()  # heartbeat → reregister → register + snapshot
            assert lease.registered.is_set() and calls.registers == 2 and calls.heartbeats == 2
            assert await _copies(stub, "rr-node") == {("lease-b", "TIER_SSD")}

    asyncio.run(scenario())


def test_the_buffer_is_bounded_and_its_overflow_is_repaired_by_a_snapshot(coordinator: ServerThread) -> None:
    async def scenario() -> None:
        async with aio.insecure_channel(coordinator.address) as channel:
            stub = Stub(channel)
            calls = NodeCalls(stub, "bound-node")
            held = [_update(cid) for cid in COMPONENTS[:3]]
            lease = CoordinatorLease(calls, lambda: list(held), holder="node bound-node", max_pending=2)
            for update in held:
                lease.changed(update)
            lease.changed(_update("lease-a", present=False))
            del held[0]
            # lease-a's newer state moved it last; lease-b, the oldest then, was dropped.
            assert [(u.component_id, u.present) for u in lease.pending] == [("lease-c", True), ("lease-a", False)]
            lease.start()
            try:
                assert await lease.flush()
                assert await _copies(stub, "bound-node") == {("lease-b", "TIER_HOST"), ("lease-c", "TIER_HOST")}
            finally:
                await lease.stop()

    asyncio.run(scenario())


def test_stop_sends_what_is_buffered_and_returns_when_unreachable(coordinator: ServerThread) -> None:
    async def scenario() -> None:
        async with aio.insecure_channel(coordinator.address) as channel:
            stub = Stub(channel)
            lease = CoordinatorLease(NodeCalls(stub, "stop-node"), list, holder="node stop-node")
            lease.start()
            assert await lease.flush()
            lease.changed(_update("lease-d", SSD))
            await lease.stop()
            assert await _copies(stub, "stop-node") == {("lease-d", "TIER_SSD")}

        async with aio.insecure_channel(f"127.0.0.1:{_free_port()}") as nowhere:
            lost = CoordinatorLease(NodeCalls(Stub(nowhere), "lost-node"), list, holder="node lost-node")
            lost.start()
            lost.changed(_update("lease-d", SSD))
            await asyncio.wait_for(lost.stop(), timeout=10)
            assert not lost.registered.is_set()
            assert [u.component_id for u in lost.pending] == ["lease-d"]

    asyncio.run(scenario())
