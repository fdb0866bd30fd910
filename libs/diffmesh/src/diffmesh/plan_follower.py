"""PlanFollower: follows the coordinator's plan for instance managers and workers.

It holds one ``WatchView(plans_only=True)`` stream open and calls ``on_plan`` once for each
plan version newer than the last one applied: the snapshot that opens a watch carries the
current plan (so a node that joins gets it at once), later plan events carry the new ones.
Versions that are not newer (a replayed event, the same plan after a reconnect) are
ignored, so applying is idempotent. After a broken stream it resumes after the last event
id it saw (the coordinator sends a fresh snapshot when that id was trimmed) and
reconnects with exponential backoff while the coordinator is down. An ``on_plan`` that
raises is logged and retried from a fresh snapshot after the backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import grpc
from grpc import aio

from diffmesh.channels import open_channel
from diffmesh.v1 import coordinator_pb2, coordinator_pb2_grpc, plan_pb2

log = logging.getLogger(__name__)

MAX_RECONNECT_S = 30.0
"""Longest wait between two reconnection attempts."""


class PlanFollower:
    """Calls ``on_plan`` for every new plan version the coordinator publishes."""

    def __init__(
        self,
        coordinator_address: str,
        on_plan: Callable[[plan_pb2.Plan], Awaitable[None]],
        *,
        reconnect_s: float = 1.0,
        max_reconnect_s: float = MAX_RECONNECT_S,
    ) -> None:
        if reconnect_s <= 0:
            raise ValueError("reconnect_s must be positive")
        self.coordinator_address = coordinator_address
        self.on_plan = on_plan
        self.reconnect_s = reconnect_s
        self.max_reconnect_s = max(reconnect_s, max_reconnect_s)
        self.version = 0
        """Version of the last plan ``on_plan`` applied (0: none yet)."""
        self.plan: plan_pb2.Plan | None = None
        """The last plan applied."""
        self.connected = False
        """True while a watch is open and its first event arrived."""
        self.last_event_id = ""
        """Id of the last stream event seen; the next watch resumes after it."""
        self._task: asyncio.Task[None] | None = None
        self._channel: aio.Channel | None = None

    def start(self) -> None:
        """Starts following in the running event loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="plan-follower")

    async def stop(self) -> None:
        """Stops following and closes the channel."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        self.connected = False

    async def _run(self) -> None:
        self._channel = open_channel(self.coordinator_address)
        stub = coordinator_pb2_grpc.CacheCoordinatorServiceStub(self._channel)
        delay = self.reconnect_s
        while True:
            try:
                await self._watch(stub)
                # The server ended the stream (it is shutting down): reconnect.
                log.info("plan watch ended by the coordinator", extra={"coordinator": self.coordinator_address})
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, aio.AioRpcError) else None
                log.warning(
                    "plan watch failed",
                    extra={"coordinator": self.coordinator_address, "code": str(code), "retry_s": delay},
                )
            except Exception:
                log.exception("applying a plan failed", extra={"version": self.version, "retry_s": delay})
                self.last_event_id = ""  # start over from a snapshot, which carries the current plan
            if self.connected:
                delay = self.reconnect_s  # the last watch worked: start the backoff over
            self.connected = False
            await asyncio.sleep(delay)
            delay = min(delay * 2.0, self.max_reconnect_s)

    async def _watch(self, stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub) -> None:
        request = coordinator_pb2.WatchViewRequest(after_event_id=self.last_event_id, plans_only=True)
        call = stub.WatchView(request)
        try:
            async for response in call:
                self.connected = True
                event = response.event
                kind = event.WhichOneof("change")
                if kind == "snapshot":
                    await self._offer(event.snapshot.plan)
                elif kind == "plan":
                    await self._offer(event.plan)
                if event.event_id:
                    self.last_event_id = event.event_id
        finally:
            call.cancel()

    async def _offer(self, plan: plan_pb2.Plan) -> None:
        if plan.version <= self.version:
            return
        await self.on_plan(plan)
        self.version, self.plan = plan.version, plan
