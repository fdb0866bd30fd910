"""WatchView: a snapshot of the global view, then every change from the view stream.

A watch starts with a snapshot unless it resumes after an event id the stream still holds
(:func:`~diffmesh_coordinator.view_events.stream_holds`); the snapshot's id is the stream's
last id read *before* the state, so the events that follow may repeat what the snapshot
shows (harmless: every event is idempotent: residency deltas set or clear a copy, full
snapshots replace a reporter's copies, loads, plans and live sets replace what they
describe). Then it reads the stream with ``XREAD BLOCK`` bounded to ``block_ms``, in a
loop, so a watch notices cancellation (client gone, server stopping) within that bound.
When entries the watch had not read yet were trimmed meanwhile, it sends a new snapshot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from diffmesh.v1 import plan_pb2

from diffmesh_coordinator import view_events
from diffmesh_coordinator.store import CoordinatorStore

BLOCK_MS = 1000
"""Longest single ``XREAD BLOCK``; a watch checks for shutdown between two."""

BATCH = 256
"""Stream entries read per ``XREAD``."""


class ViewWatch:
    """Produces the events of WatchView calls from one store."""

    def __init__(self, store: CoordinatorStore, block_ms: int = BLOCK_MS, batch: int = BATCH) -> None:
        self.store = store
        self.block_ms = block_ms
        self.batch = batch
        self.closing = asyncio.Event()
        """Set when the coordinator stops: every watch ends after its current read."""

    async def events(self, after_id: str, plans_only: bool) -> AsyncIterator[plan_pb2.ViewEvent]:
        """The events of one watch, in stream order, until :attr:`closing` is set.

        ``after_id`` must be empty or a well-formed stream id (the servicer checks it).
        """
        last = after_id
        if not after_id or not view_events.stream_holds(after_id, await self.store.stream_info()):
            snapshot = await self.store.snapshot(plans_only)
            last = snapshot.event_id
            yield snapshot
        while not self.closing.is_set():
            entries = await self.store.read_events(last, self.batch, self.block_ms)
            if not entries:
                continue
            if not view_events.stream_holds(last, await self.store.stream_info()):
                snapshot = await self.store.snapshot(plans_only)
                last = snapshot.event_id
                yield snapshot
                continue
            for entry_id, fields in entries:
                last = entry_id
                if plans_only and fields.get(view_events.KIND_FIELD) != "plan":
                    continue
                yield view_events.entry_event(entry_id, fields)
