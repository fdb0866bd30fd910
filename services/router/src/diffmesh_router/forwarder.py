"""Forwarding a validated request to a worker's ``WorkerService.Run`` and streaming it back.

One cached channel per worker address. The client's remaining deadline becomes the
worker call's timeout; when the client goes away the worker call is cancelled. If the
chosen worker is UNAVAILABLE before it sent any event, the request is retried once on
the next candidate. Errors from the worker propagate with their status.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
from diffmesh.channels import open_channel
from diffmesh.errors import Unavailable
from diffmesh.v1 import worker_pb2, worker_pb2_grpc
from grpc import aio

from diffmesh_router.placement import InFlight, Placement

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # the chosen worker, then once more on the next candidate


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


class Forwarder:
    """Runs a request on the best reachable worker and yields the worker's events."""

    def __init__(self, channels: WorkerChannels, in_flight: InFlight, on_unavailable: Callable[[], None]) -> None:
        self._channels = channels
        self._in_flight = in_flight
        self._on_unavailable = on_unavailable

    async def run(
        self,
        request: worker_pb2.RunRequest,
        placements: Sequence[Placement],
        timeout: Callable[[], float | None],
    ) -> AsyncIterator[tuple[Placement, worker_pb2.RunResponse]]:
        """Yields (placement, event) for each event of the worker that runs ``request``.

        ``timeout`` is asked before every attempt for the seconds left of the client's deadline.
        """
        attempts = list(placements[:MAX_ATTEMPTS])
        for attempt, placement in enumerate(attempts, start=1):
            streamed = False
            try:
                with self._in_flight.track(placement.key):
                    call = self._channels.stub(placement.worker.address).Run(request, timeout=timeout())
                    try:
                        async for event in call:
                            streamed = True
                            yield placement, event
                    finally:
                        # No-op after a normal end; stops the worker's work when the client cancelled.
                        call.cancel()
                return
            except aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self._on_unavailable()
                if streamed:
                    raise
                if attempt == len(attempts):
                    names = ", ".join(p.worker.worker_id for p in attempts)
                    raise Unavailable(f"worker(s) {names} unreachable: {err.details()}") from None
                log.warning(
                    "worker unavailable; retrying on the next candidate",
                    extra={
                        "request_id": request.request_id,
                        "worker_id": placement.worker.worker_id,
                        "next_worker_id": attempts[attempt].worker.worker_id,
                        "detail": err.details(),
                    },
                )
