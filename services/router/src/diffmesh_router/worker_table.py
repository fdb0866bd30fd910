"""The live workers as rows of numpy arrays, so one decision scores every worker at once.

Kept current by listening: to the view (live set, loads, GPU copies, plan), to the
router's own in-flight counts, and to what finished requests taught
(:class:`~diffmesh_router.learned.LearnedEstimates`). Rows follow
:attr:`diffmesh.view.View.worker_keys` (ordered by worker id, then node id), so a row's
index is also its tie-break rank. A live-set change rebuilds the arrays; every other
change touches one row.

A worker's busy count is the larger of (reported queue + running + requests this router
sent it since that report) and this router's own in-flight requests there: reports lag,
and other routers' requests appear only in reports.
"""

from __future__ import annotations

import math

import numpy as np
from diffmesh.policy.routing import Source
from diffmesh.tiers import Tier
from diffmesh.view import ChangeKind, View, ViewChange, WorkerKey
from numpy.typing import NDArray

from diffmesh_router.capacity import CapacitySignal
from diffmesh_router.learned import LearnedEstimates

UNBOUNDED = 1 << 62
"""Usable device bytes of a worker whose memory is unknown (it fits everything)."""


class ComponentSources:
    """Per live node, the best source of one component (HOST, SSD, else PEER or REMOTE), and its GPU holders."""

    __slots__ = ("gpu_bytes", "gpu_rows", "node_source")

    def __init__(self, node_source: NDArray[np.int8], gpu_rows: NDArray[np.intp], gpu_bytes: NDArray[np.int64]) -> None:
        self.node_source = node_source
        self.gpu_rows = gpu_rows
        self.gpu_bytes = gpu_bytes


class WorkerTable:
    """Per-worker arrays (busy, room, memory, learned speeds) and per-component sources, for :mod:`.view_placer`."""

    def __init__(self, view: View, learned: LearnedEstimates, capacity: CapacitySignal) -> None:
        self.view = view
        self.learned = learned
        self.capacity = capacity
        self._in_flight: dict[WorkerKey, int] = {}
        self._sources: dict[str, ComponentSources] = {}
        self._rebuild()
        view.add_listener(self._on_view)

    # -- rows -------------------------------------------------------------------------

    def _rebuild(self) -> None:
        view = self.view
        self.keys: tuple[WorkerKey, ...] = view.worker_keys
        self.row: dict[WorkerKey, int] = {k: i for i, k in enumerate(self.keys)}
        self.addresses: tuple[str, ...] = tuple(view.workers[k].address for k in self.keys)
        self.node_ids: tuple[str, ...] = tuple(sorted(view.nodes))
        self.node_row: dict[str, int] = {n: i for i, n in enumerate(self.node_ids)}
        n = len(self.keys)
        self.node_of = np.array([self.node_row.get(k[0], 0) for k in self.keys], dtype=np.intp)
        self.reported_busy = np.zeros(n, dtype=np.float64)
        self.unreported = np.zeros(n, dtype=np.float64)
        self.in_flight = np.array([self._in_flight.get(k, 0) for k in self.keys], dtype=np.float64)
        self.max_queue = np.full(n, np.inf, dtype=np.float64)
        self.free = np.zeros(n, dtype=np.int64)
        self.gpu_bytes = np.zeros(n, dtype=np.int64)
        self.pinned_bytes = np.zeros(n, dtype=np.int64)
        self.service_s = np.full(n, np.nan, dtype=np.float64)
        self.seconds_per_unit = np.full(n, np.nan, dtype=np.float64)
        for i, key in enumerate(self.keys):
            self._load_row(i, key)
            self._gpu_row(i, key)
            self._learned_row(i, key)
        self._sources.clear()

    def _load_row(self, i: int, key: WorkerKey) -> None:
        load = self.view.loads.get(key)
        if load is None:
            self.reported_busy[i] = 0.0
            self.max_queue[i] = np.inf
            return
        self.reported_busy[i] = load.queue_length + load.running
        self.unreported[i] = 0.0
        self.max_queue[i] = load.max_queue

    def _gpu_row(self, i: int, key: WorkerKey) -> None:
        held = self.view.reporter_copies(*key)
        self.gpu_bytes[i] = sum(b for (_, tier), b in held.items() if tier == Tier.GPU)
        pins = self.view.plan.pinned.get(key)
        self.pinned_bytes[i] = sum(held.get((cid, Tier.GPU), 0) for cid in pins) if pins else 0
        load = self.view.loads.get(key)
        if load is not None and (load.device_memory_free_bytes or load.device_memory_total_bytes):
            self.free[i] = load.device_memory_free_bytes
        else:
            total = self.view.workers[key].device_memory_bytes
            self.free[i] = total - self.gpu_bytes[i] if total else UNBOUNDED

    def _learned_row(self, i: int, key: WorkerKey) -> None:
        self.service_s[i] = self.learned.service_s.get(key, math.nan)
        self.seconds_per_unit[i] = self.learned.seconds_per_unit.get(key, math.nan)

    # -- what the rows mean ---------------------------------------------------------------

    def busy(self) -> NDArray[np.float64]:
        """Requests waiting or running per worker, as best known now."""
        return np.maximum(self.reported_busy + self.unreported, self.in_flight)

    def usable_bytes(self) -> NDArray[np.int64]:
        """Device bytes a request may use per worker: free plus evictable copies (copies the plan pins are not)."""
        return self.free + self.gpu_bytes - self.pinned_bytes

    def sources(self, component_id: str) -> ComponentSources:
        """Where ``component_id`` would load from, per node and for the workers that hold it on their device."""
        cached = self._sources.get(component_id)
        if cached is not None:
            return cached
        node_row = self.node_row
        row = self.row
        best: dict[int, Source] = {}
        peer = False
        gpu_rows: list[int] = []
        gpu_bytes: list[int] = []
        for (node, worker, tier), nbytes in self.view.copies(component_id).items():
            if tier == Tier.GPU:
                r = row.get((node, worker))
                if r is not None:
                    gpu_rows.append(r)
                    gpu_bytes.append(nbytes)
                continue
            n = node_row.get(node)
            if n is None or tier not in (Tier.HOST, Tier.SSD):
                continue
            source = Source.HOST if tier == Tier.HOST else Source.SSD
            peer = peer or tier == Tier.SSD
            if best.get(n, Source.REMOTE) > source:
                best[n] = source
        node_source = np.full(len(self.node_ids), Source.PEER if peer else Source.REMOTE, dtype=np.int8)
        for n, source in best.items():
            node_source[n] = source
        found = ComponentSources(node_source, np.array(gpu_rows, dtype=np.intp), np.array(gpu_bytes, dtype=np.int64))
        self._sources[component_id] = found
        return found

    # -- listening ----------------------------------------------------------------------

    def _on_view(self, change: ViewChange) -> None:
        kind = change.kind
        if kind in (ChangeKind.SNAPSHOT, ChangeKind.LIVE):
            self._rebuild()
            self.capacity.notify()
        elif kind is ChangeKind.LOAD:
            room = False
            for key in change.workers:
                i = self.row.get(key)
                if i is not None:
                    self._load_row(i, key)
                    self._gpu_row(i, key)
                    room = room or self.reported_busy[i] < self.max_queue[i] + 1.0
            if room:
                self.capacity.notify()
        elif kind is ChangeKind.RESIDENCY:
            for cid in change.components:
                self._sources.pop(cid, None)
            for key in change.workers:
                i = self.row.get(key)
                if i is not None:
                    self._gpu_row(i, key)
        elif kind is ChangeKind.PLAN:
            for i, key in enumerate(self.keys):
                self._gpu_row(i, key)

    def in_flight_changed(self, key: WorkerKey, delta: int) -> None:
        """The router sent a request to ``key`` (+1) or one ended there (-1).

        Capacity is not signalled here: an attempt the worker refused frees no room. The
        forwarder signals when a request the worker accepted ends.
        """
        count = self._in_flight.get(key, 0) + delta
        if count > 0:
            self._in_flight[key] = count
        else:
            self._in_flight.pop(key, None)
        i = self.row.get(key)
        if i is not None:
            self.in_flight[i] = count
            if delta > 0:
                self.unreported[i] += delta
            else:
                self.unreported[i] = min(self.unreported[i], count)

    def finished(self, key: WorkerKey) -> None:
        """A request this router sent to ``key`` returned its result.

        The worker's last load report most likely still counts that request (its next
        report travels through the coordinator and arrives after the result), so the
        reported count is lowered by one until that report replaces it. Without this a
        worker that has just finished looks busy, and the next request of a sequential
        client goes to a worker that must load the pipeline first.
        """
        i = self.row.get(key)
        if i is not None:
            self.reported_busy[i] = max(0.0, self.reported_busy[i] - 1.0)

    def learned_changed(self, key: WorkerKey) -> None:
        """A finished request on ``key`` updated the learned means."""
        i = self.row.get(key)
        if i is not None:
            self._learned_row(i, key)
