"""Pushing this worker's load (queue, running request, device memory) to the coordinator.

The worker calls :meth:`LoadReporter.changed` whenever its load may have changed — a
request queued, started or finished, background work took or left the device, the device
tier gained or lost a component — and after every (re)registration. Reports are
coalesced, never on a request's path: one background task sends ``ReportLoad`` with the
load measured *when it sends* (the latest state wins), at most one call in flight and at
most one per ``min_interval_s``; changes during a call or the pause are folded into the
next report.

Only while registered (a load of an unregistered worker would be refused). A report
answered NOT_FOUND, or ``recorded = false``, means the lease lapsed: the lease helper is
told to register again (:meth:`~diffmesh_worker.registration.Registrar.lease_lapsed`) and
the load is sent again after that. Any other failure is logged and retried after
``retry_s``; a coordinator without ``ReportLoad`` (UNIMPLEMENTED) is logged once and not
asked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
from diffmesh.v1 import coordinator_pb2, coordinator_pb2_grpc, plan_pb2

from diffmesh_worker.registration import Registrar

log = logging.getLogger(__name__)


class LoadReporter:
    """Coalesced ``ReportLoad`` calls of one worker (see the module docstring)."""

    def __init__(
        self,
        stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub,
        registrar: Registrar,
        measure: Callable[[], plan_pb2.WorkerLoad],
        *,
        timeout_s: float,
        min_interval_s: float,
        retry_s: float = 1.0,
    ) -> None:
        self.stub = stub
        self.registrar = registrar
        self.measure = measure
        self.timeout_s = timeout_s
        self.min_interval_s = min_interval_s
        self.retry_s = retry_s
        self.sent = 0
        """Reports the coordinator recorded."""
        self.last_sent: plan_pb2.WorkerLoad | None = None
        """The last load the coordinator recorded."""
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts the sender; the first report follows registration."""
        if self._task is None:
            self._dirty.set()
            self._task = asyncio.create_task(self._run(), name="load-reporter")

    def changed(self) -> None:
        """The load may have changed: report it soon (cheap; call it from the event loop's thread)."""
        self._dirty.set()

    async def stop(self) -> None:
        """Ends the sender (a report in flight is cancelled)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            await self.registrar.registered.wait()
            self._dirty.clear()
            pause = self.min_interval_s
            try:
                if not await self._send():
                    return
            except Exception:
                # A bug, not the coordinator: logged with its traceback; reporting goes on.
                log.exception("reporting the load failed")
                self._dirty.set()
                pause = self.retry_s
            await asyncio.sleep(pause)

    async def _send(self) -> bool:
        """One report of the current load; False when the coordinator has no ``ReportLoad``."""
        load = self.measure()
        try:
            resp = await self.stub.ReportLoad(coordinator_pb2.ReportLoadRequest(load=load), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                log.warning("the coordinator does not take load reports; not sending any")
                return False
            self._dirty.set()  # send again: after re-registration, or after the pause
            if code == grpc.StatusCode.NOT_FOUND:
                log.info("load report refused: the lease lapsed; registering again")
                self.registrar.lease_lapsed()
            else:
                log.warning("load report failed", extra={"code": code.name if code else str(exc)})
                await asyncio.sleep(self.retry_s)
            return True
        if not resp.recorded:
            log.info("load not recorded: the lease lapsed; registering again")
            self._dirty.set()
            self.registrar.lease_lapsed()
            return True
        self.sent += 1
        self.last_sent = load
        return True
