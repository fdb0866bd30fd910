"""Holding a lease at the cache coordinator: registration, heartbeats and residency reports.

One protocol for every lease holder — a worker (``RegisterWorker``, GPU tier) and an
instance manager (``RegisterNode``, SSD and HOST tiers). Each supplies its own RPCs
through :class:`LeaseCalls`; :class:`CoordinatorLease` does the rest, in two background
tasks, never on a caller's path and never failing a caller.

The behaviour, chosen on purpose:

* **Register, then heartbeat every third of the lease** the coordinator granted, so one
  lost heartbeat never lets the lease lapse.
* **Register again when the coordinator forgets us**: a heartbeat answered ``reregister``,
  a report answered NOT_FOUND (the lease lapsed), or any failed call (it may have lapsed
  meanwhile). A failed report triggers the re-registration at once; a failed
  registration is retried after ``retry_s`` (at most a third of the lease).
* **Every (re)registration sends a full snapshot** (``full_snapshot=True``): the
  coordinator dropped our residency when the lease lapsed, and the snapshot also replaces
  whatever it still holds from before.
* **Residency changes are kept, not dropped**, while we are unregistered or the
  coordinator is unreachable: they wait in a buffer coalesced by (component, tier), so
  the latest state of each copy wins, and are flushed after the snapshot that follows
  (re)registration. A change buffered before the snapshot agrees with it (it is the
  latest state of that copy), so sending both is consistent. A failed report puts its
  changes back (newer ones for the same copy win) and re-registers.
* **The buffer is bounded** (``max_pending`` copies): on overflow the oldest change is
  dropped and a full snapshot is sent before the next flush, which carries that state.
* **Stopping** makes one bounded attempt (``stop_flush_s``) to send what is buffered while
  registered, then ends both tasks. The lease itself is left to lapse at the coordinator.

Call :meth:`CoordinatorLease.changed` from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import grpc

from diffmesh.errors import from_rpc_error
from diffmesh.v1 import coordinator_pb2

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 15.0
"""Lease assumed until the coordinator grants one."""

DEFAULT_MAX_PENDING = 10_000
"""Buffered copies at most (well under the coordinator's cap of updates per report)."""

_POLL_S = 0.02

Snapshot = Callable[[], Sequence[coordinator_pb2.ResidencyUpdate]]
"""Every copy the holder has now, as ``present`` updates (sent as a full snapshot)."""

_Key = tuple[str, int]  # (component id, tier)


class LeaseCalls(Protocol):
    """The coordinator RPCs of one lease holder; they raise :class:`grpc.RpcError` on failure."""

    async def register(self) -> float:
        """Registers the holder; returns the lease the coordinator granted, in seconds (0: unknown)."""
        ...

    async def heartbeat(self) -> coordinator_pb2.HeartbeatResponse:
        """Renews the holder's lease."""
        ...

    async def report(self, updates: Sequence[coordinator_pb2.ResidencyUpdate], full_snapshot: bool) -> None:
        """Sends residency updates of the holder (``ReportResidency``)."""
        ...


class CoordinatorLease:
    """Keeps one holder registered and its residency reported (see the module docstring).

    ``registered`` is set while the coordinator holds our lease as far as we know;
    ``lease_seconds`` is the lease it granted last.
    """

    def __init__(
        self,
        calls: LeaseCalls,
        snapshot: Snapshot,
        *,
        holder: str,
        retry_s: float = 1.0,
        max_pending: int = DEFAULT_MAX_PENDING,
        stop_flush_s: float = 5.0,
    ) -> None:
        self.calls = calls
        self.holder = holder
        self.retry_s = retry_s
        self.max_pending = max_pending
        self.stop_flush_s = stop_flush_s
        self.lease_seconds = DEFAULT_LEASE_S
        self.registered = asyncio.Event()
        self._snapshot = snapshot
        self._pending: dict[_Key, coordinator_pb2.ResidencyUpdate] = {}
        self._snapshot_due = False  # the buffer overflowed: a full snapshot must precede the next flush
        self._send_lock = asyncio.Lock()
        self._wake_sender = asyncio.Event()
        self._wake_heartbeat = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # ---- the holder's side ----------------------------------------------------------

    def start(self) -> None:
        """Starts the heartbeat and sender tasks (registration is the heartbeat's first step)."""
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name=f"lease-heartbeat {self.holder}"),
            asyncio.create_task(self._send_loop(), name=f"lease-residency {self.holder}"),
        ]

    def changed(self, update: coordinator_pb2.ResidencyUpdate) -> None:
        """Buffers one residency change; the latest change of a (component, tier) wins."""
        self._put((update.component_id, update.tier), update)
        self._wake_sender.set()

    def changed_all(self, updates: Iterable[coordinator_pb2.ResidencyUpdate]) -> None:
        """Buffers several residency changes, in order."""
        for update in updates:
            self.changed(update)

    @property
    def pending(self) -> list[coordinator_pb2.ResidencyUpdate]:
        """The buffered changes not sent yet, oldest first."""
        return list(self._pending.values())

    async def flush(self, timeout: float = 10.0) -> bool:
        """Waits until registered and every buffered change is sent; False on timeout."""
        return await self._wait(lambda: self.registered.is_set() and self._idle(), timeout)

    async def stop(self) -> None:
        """Sends what is buffered (at most ``stop_flush_s``, only while registered), then ends both tasks."""
        if self._tasks and self.registered.is_set():
            self._wake_sender.set()
            await self._wait(lambda: self._idle() or not self.registered.is_set(), self.stop_flush_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    # ---- the protocol ---------------------------------------------------------------

    async def beat(self) -> None:
        """One heartbeat step: registers when not registered (or no longer), else renews.

        Raises :class:`grpc.RpcError` when a call fails (the lease then counts as lost).
        """
        try:
            if not self.registered.is_set():
                await self._register()
                return
            resp = await self.calls.heartbeat()
            if resp.lease_seconds > 0:
                self.lease_seconds = resp.lease_seconds
            if resp.reregister:
                log.info("lease lapsed; registering again", extra={"holder": self.holder})
                self.registered.clear()
                await self._register()
        except grpc.RpcError:
            self.registered.clear()
            raise

    async def _register(self) -> None:
        granted = await self.calls.register()
        if granted > 0:
            self.lease_seconds = granted
        async with self._send_lock:
            await self.calls.report(list(self._snapshot()), True)
            self._snapshot_due = False
        self.registered.set()
        self._wake_sender.set()  # changes buffered meanwhile follow the snapshot
        log.info("registered with coordinator", extra={"holder": self.holder, "lease_s": self.lease_seconds})

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self.beat()
                delay = self.lease_seconds / 3
            except grpc.RpcError as exc:
                log.warning("coordinator call failed", extra={"holder": self.holder, **_status(exc)})
                delay = min(self.retry_s, self.lease_seconds / 3)
            except Exception:
                # A bug, not the coordinator: logged with its traceback, and the lease keeps being retried.
                log.exception("keeping the coordinator lease failed", extra={"holder": self.holder})
                self.registered.clear()
                delay = min(self.retry_s, self.lease_seconds / 3)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_heartbeat.wait(), delay)
            self._wake_heartbeat.clear()

    async def _send_loop(self) -> None:
        while True:
            await self._wake_sender.wait()
            self._wake_sender.clear()
            await self._send_pending()

    async def _send_pending(self) -> None:
        if not self.registered.is_set() or not (self._pending or self._snapshot_due):
            return
        async with self._send_lock:
            if not self.registered.is_set():
                return
            batch, self._pending = self._pending, {}
            try:
                if self._snapshot_due:
                    await self.calls.report(list(self._snapshot()), True)
                    self._snapshot_due = False
                if batch:
                    await self.calls.report(list(batch.values()), False)
            except grpc.RpcError as exc:
                # NOT_FOUND: the lease lapsed; anything else: it may have. Either way, register again.
                log.warning("residency report failed", extra={"holder": self.holder, **_status(exc)})
                self._restore(batch)
                self.registered.clear()
                self._wake_heartbeat.set()

    # ---- the buffer -----------------------------------------------------------------

    def _put(self, key: _Key, update: coordinator_pb2.ResidencyUpdate) -> None:
        self._pending.pop(key, None)  # re-inserted last: the buffer stays oldest first
        self._pending[key] = update
        self._trim()

    def _restore(self, batch: dict[_Key, coordinator_pb2.ResidencyUpdate]) -> None:
        """Puts a failed batch back in front; changes buffered since then win."""
        merged = dict(batch)
        for key, update in self._pending.items():
            merged.pop(key, None)
            merged[key] = update
        self._pending = merged
        self._trim()

    def _trim(self) -> None:
        while len(self._pending) > self.max_pending:
            del self._pending[next(iter(self._pending))]
            if not self._snapshot_due:
                log.warning("residency buffer full; a full snapshot follows", extra={"holder": self.holder})
            self._snapshot_due = True

    def _idle(self) -> bool:
        return not self._pending and not self._snapshot_due and not self._send_lock.locked()

    @staticmethod
    async def _wait(condition: Callable[[], bool], timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True


def _status(exc: grpc.RpcError) -> dict[str, str]:
    """Log fields of a failed call."""
    err = from_rpc_error(exc)
    return {"code": err.code.name, "detail": err.message}
