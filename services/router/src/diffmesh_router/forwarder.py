"""Forwarding a validated request to a worker's ``WorkerService.Run`` and streaming it back.

One cached channel per worker address. The client's remaining deadline becomes the
worker call's timeout; when the client goes away the worker call is cancelled. Errors
from the worker propagate with their status, except before the worker streamed anything:

* ``RESOURCE_EXHAUSTED`` (its queue is full): the request *spills* to the next candidate,
  through every candidate of the ranking at most once. When all of them refused, the
  request waits for room (a request of this router ended, or a worker reported its load)
  and tries a fresh ranking, for at most ``full_wait_seconds`` and the client's deadline;
  then the client gets ``RESOURCE_EXHAUSTED`` with the largest retry hint the workers gave.
  So a client never gets ``RESOURCE_EXHAUSTED`` while another worker has room.
* ``UNAVAILABLE`` (unreachable): the request is retried once on the next candidate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable

import grpc
from diffmesh.channels import open_channel
from diffmesh.errors import ResourceExhausted, Unavailable, retry_after_ms
from diffmesh.v1 import worker_pb2, worker_pb2_grpc
from grpc import aio

from diffmesh_router.capacity import CapacitySignal
from diffmesh_router.placement import InFlight
from diffmesh_router.stats import RouterStats
from diffmesh_router.view_placer import Target

log = logging.getLogger(__name__)

MAX_UNAVAILABLE_ATTEMPTS = 2  # the chosen worker, then once more on the next candidate
DEFAULT_RETRY_S = 1.0
"""Retry hint when the workers that refused gave none."""


class WorkerChannels:
    """One gRPC channel (and stub) per worker address, opened on first use."""

    def __init__(self) -> None:
        self._stubs: dict[str, tuple[aio.Channel, worker_pb2_grpc.WorkerServiceStub]] = {}

    def stub(self, address: str) -> worker_pb2_grpc.WorkerServiceStub:
        """The stub for ``address`` (``host:port``)."""
        entry = self._stubs.get(address)
        if entry is None:
            channel = open_channel(address)
            entry = (channel, worker_pb2_grpc.WorkerServiceStub(channel))
            self._stubs[address] = entry
        return entry[1]

    async def close(self) -> None:
        """Closes every channel."""
        stubs, self._stubs = self._stubs, {}
        for channel, _ in stubs.values():
            await channel.close()


Candidates = Callable[[], Iterable[Target]]
"""Returns a fresh ranking of the candidates, best first (asked again after a wait for room)."""


class Forwarder:
    """Runs a request on the best worker that takes it and yields the worker's events."""

    def __init__(
        self,
        channels: WorkerChannels,
        in_flight: InFlight,
        on_unavailable: Callable[[], None],
        capacity: CapacitySignal,
        stats: RouterStats,
        full_wait_seconds: float,
    ) -> None:
        self._channels = channels
        self._in_flight = in_flight
        self._on_unavailable = on_unavailable
        self._capacity = capacity
        self._stats = stats
        self._full_wait = full_wait_seconds

    async def run(
        self,
        request: worker_pb2.RunRequest,
        candidates: Candidates,
        timeout: Callable[[], float | None],
    ) -> AsyncIterator[tuple[Target, worker_pb2.RunResponse]]:
        """Yields (target, event) for each event of the worker that runs ``request``.

        ``timeout`` is asked before every attempt for the seconds left of the client's
        deadline (it raises TimeoutError when none is left).
        """
        unreachable: list[Target] = []
        wait_until = time.monotonic() + self._full_wait
        while True:
            refused: list[Target] = []
            hint_s = 0.0
            for target in candidates():
                if target in refused or target in unreachable:
                    continue
                streamed = False
                try:
                    with self._in_flight.track(target.key):
                        call = self._channels.stub(target.address).Run(request, timeout=timeout())
                        try:
                            async for event in call:
                                if not streamed:
                                    streamed = True
                                    self._stats.accepted(target.key)
                                yield target, event
                        finally:
                            # No-op after a normal end; stops the worker's work when the client cancelled.
                            call.cancel()
                            if streamed:
                                self._capacity.notify()  # its place on the worker is free again
                    return
                except aio.AioRpcError as err:
                    if streamed:
                        if err.code() == grpc.StatusCode.UNAVAILABLE:
                            self._on_unavailable()
                        raise
                    if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        refused.append(target)
                        self._stats.spills += 1
                        hint_s = max(hint_s, (retry_after_ms(err) or 0) / 1000.0)
                        log.info(
                            "worker queue full; spilling to the next candidate",
                            extra={"request_id": request.request_id, "worker_id": target.worker_id, "node_id": target.node_id},
                        )
                        continue
                    if err.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    self._on_unavailable()
                    unreachable.append(target)
                    if len(unreachable) >= MAX_UNAVAILABLE_ATTEMPTS:
                        names = ", ".join(t.worker_id for t in unreachable)
                        raise Unavailable(f"worker(s) {names} unreachable: {err.details()}") from None
                    self._stats.unavailable_retries += 1
                    log.warning(
                        "worker unavailable; retrying on the next candidate",
                        extra={"request_id": request.request_id, "worker_id": target.worker_id, "detail": err.details()},
                    )
            if not refused:
                if unreachable:
                    names = ", ".join(t.worker_id for t in unreachable)
                    raise Unavailable(f"worker(s) {names} unreachable and no other candidate")
                raise Unavailable("no worker can take the request")
            hint_s = hint_s or DEFAULT_RETRY_S
            left = min(wait_until - time.monotonic(), timeout() or 0.0)
            if left <= 0:
                self._stats.resource_exhausted += 1
                names = ", ".join(t.worker_id for t in refused)
                raise ResourceExhausted(f"every eligible worker's queue is full ({names})", retry_after_s=round(hint_s, 1))
            self._stats.full_waits += 1
            log.info(
                "every worker's queue is full; waiting for room",
                extra={"request_id": request.request_id, "workers": len(refused), "wait_s": round(min(left, hint_s), 3)},
            )
            await self._capacity.wait(min(left, hint_s))
