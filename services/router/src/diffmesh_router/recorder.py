"""Batched request records for popularity accounting (``RecordRequests``).

Records are buffered and flushed every ``flush_seconds`` and once more on stop. A failing
coordinator never fails a request: the batch goes back to the buffer and is retried on
the next flush; the buffer is bounded and drops the oldest records when full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

import grpc
from diffmesh.v1 import coordinator_pb2, coordinator_pb2_grpc
from grpc import aio

log = logging.getLogger(__name__)

MAX_BATCH = 10_000  # RecordRequests accepts at most this many records per call
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)


class RequestRecorder:
    """Buffers :class:`RequestRecord` messages and flushes them to the coordinator."""

    def __init__(
        self,
        stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub,
        flush_seconds: float,
        max_buffer: int,
        timeout_seconds: float,
    ) -> None:
        self._stub = stub
        self._flush_seconds = flush_seconds
        self._timeout = timeout_seconds
        self._buffer: deque[coordinator_pb2.RequestRecord] = deque(maxlen=max_buffer)
        self._task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self.dropped = 0
        self.recorded = 0

    def __len__(self) -> int:
        return len(self._buffer)

    def add(self, record: coordinator_pb2.RequestRecord) -> None:
        """Queues one record (never blocks, never fails)."""
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1
        self._buffer.append(record)

    def start(self) -> None:
        """Starts the periodic flush on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="router-recorder")

    async def stop(self) -> None:
        """Stops the periodic flush and makes one last attempt."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
        if self._buffer:
            log.warning("request records not delivered at stop", extra={"records": len(self._buffer)})

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_seconds)
            await self.flush()

    async def flush(self) -> int:
        """Sends everything buffered, batch by batch; returns how many records were stored."""
        stored = 0
        async with self._flush_lock:
            while self._buffer:
                batch = [self._buffer.popleft() for _ in range(min(MAX_BATCH, len(self._buffer)))]
                try:
                    resp = await self._stub.RecordRequests(
                        coordinator_pb2.RecordRequestsRequest(records=batch), timeout=self._timeout
                    )
                except aio.AioRpcError as err:
                    if err.code() not in RETRYABLE:
                        # The coordinator refused the batch itself; sending it again cannot help.
                        self.dropped += len(batch)
                        log.error(
                            "RecordRequests refused a batch; dropped", extra={"code": err.code().name, "detail": err.details()}
                        )
                        continue
                    self._requeue(batch)
                    log.warning("RecordRequests failed; will retry", extra={"code": err.code().name, "records": len(batch)})
                    break
                stored += resp.recorded
                self.recorded += resp.recorded
        return stored

    def _requeue(self, batch: list[coordinator_pb2.RequestRecord]) -> None:
        # Put the failed batch back in front of newer records, keeping the bound (oldest go first).
        room = (self._buffer.maxlen or len(batch)) - len(self._buffer)
        keep = batch[len(batch) - room :] if room < len(batch) else batch
        self.dropped += len(batch) - len(keep)
        self._buffer.extendleft(reversed(keep))
