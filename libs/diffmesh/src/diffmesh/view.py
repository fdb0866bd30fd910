"""A replica of the coordinator's global view, kept current from its ``WatchView`` stream.

:class:`View` is the state and its apply logic (no I/O): the live nodes and workers with
their addresses, every reporter's copies indexed by component, each worker's last
reported load, and the current plan (bands per pipeline key, HOT replicas, fused overlay ids).
:class:`ViewReplica` follows the stream into a :class:`View`: the first event of a watch
is a snapshot that replaces the state (so is every later snapshot: the coordinator sends
one after a gap), then every residency, load, plan and live-set change is applied in
stream order. When the stream breaks it reconnects with exponential backoff, resuming
after the last event id it applied, and meanwhile keeps serving the last view: readers
see :attr:`ViewReplica.connected` and :meth:`ViewReplica.staleness_s` and decide.

Any service may use it; the router decides every placement from it without asking the
coordinator per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import grpc
from grpc import aio

from diffmesh.pipeline_key import canonical_key
from diffmesh.policy.popularity import Band
from diffmesh.policy_mode import PolicyMode, from_proto
from diffmesh.tiers import Tier
from diffmesh.v1 import coordinator_pb2, coordinator_pb2_grpc, plan_pb2

log = logging.getLogger(__name__)

WorkerKey = tuple[str, str]
"""(node_id, worker_id): worker ids are unique within a node only."""

CopyKey = tuple[str, str, Tier]
"""(node_id, worker_id, tier) of one copy; ``worker_id`` is empty for a node's HOST and SSD copies."""

_BANDS = {plan_pb2.BAND_HOT: Band.HOT, plan_pb2.BAND_WARM: Band.WARM}


@dataclass(frozen=True)
class WorkerEntry:
    """A live worker and how to reach it."""

    node_id: str
    worker_id: str
    address: str
    device_memory_bytes: int
    """Total device memory as the worker registered it (0: unknown)."""

    @property
    def key(self) -> WorkerKey:
        """(node_id, worker_id)."""
        return (self.node_id, self.worker_id)


@dataclass(frozen=True)
class NodeEntry:
    """A live node: its instance manager and its live workers' ids."""

    node_id: str
    instance_manager_address: str
    worker_ids: tuple[str, ...]


@dataclass(frozen=True)
class WorkerLoadEntry:
    """A worker's last reported load."""

    queue_length: int
    running: int
    device_memory_free_bytes: int
    device_memory_total_bytes: int
    max_queue: int
    measured_unix: float
    received_monotonic: float
    """When this replica applied the report (``time.monotonic``)."""


@dataclass(frozen=True)
class HotEntry:
    """A HOT pipeline of the plan."""

    pipeline_key: str
    replicas: frozenset[WorkerKey]
    fused_id: str
    """The FUSED overlay to run instead of runtime LoRAs; empty: not fused."""
    component_ids: tuple[str, ...]
    """Base, LoRAs and ControlNets of the pipeline, then the fused overlay when there is one."""
    share: float


@dataclass(frozen=True)
class PlanEntry:
    """The current plan, indexed for routing; ``proto`` is the plan as received."""

    version: int = 0
    mode: PolicyMode = PolicyMode.DIFFMESH
    hot: Mapping[str, HotEntry] = field(default_factory=dict)
    bands: Mapping[str, Band] = field(default_factory=dict)
    """HOT and WARM pipeline keys; a key not listed is COLD."""
    hot_pool: frozenset[WorkerKey] = frozenset()
    """Workers that hold a replica of any HOT pipeline."""
    pinned: Mapping[WorkerKey, frozenset[str]] = field(default_factory=dict)
    """Per replica worker, the component ids of the HOT pipelines it keeps built."""
    proto: plan_pb2.Plan = field(default_factory=plan_pb2.Plan)
    fused: Mapping[str, str] = field(default_factory=dict)
    """Pipeline key → id of its FUSED overlay, for every fusion target (``plan.fusions``) and fused HOT pipeline."""

    def band(self, pipeline_key: str) -> Band:
        """The band of ``pipeline_key`` (COLD when the plan does not list it)."""
        return self.bands.get(pipeline_key, Band.COLD)

    def fused_id(self, pipeline_key: str) -> str:
        """The FUSED overlay the plan runs ``pipeline_key`` as; empty: not fused."""
        return self.fused.get(pipeline_key, "")

    @classmethod
    def from_proto(cls, plan: plan_pb2.Plan) -> PlanEntry:
        """The indexed form of ``plan``."""
        hot: dict[str, HotEntry] = {}
        pinned: dict[WorkerKey, set[str]] = {}
        for h in plan.hot:
            spec = h.pipeline
            key = h.pipeline_key or canonical_key(
                spec.base_id, [(lr.id, lr.scale) for lr in spec.loras], [cn.id for cn in spec.controlnets]
            )
            ids = [spec.base_id, *(lr.id for lr in spec.loras), *(cn.id for cn in spec.controlnets)]
            if h.fused_id:
                ids.append(h.fused_id)
            replicas = frozenset((r.node_id, r.worker_id) for r in h.replicas)
            hot[key] = HotEntry(key, replicas, h.fused_id, tuple(dict.fromkeys(i for i in ids if i)), h.share)
            for r in replicas:
                pinned.setdefault(r, set()).update(hot[key].component_ids)
        bands = {p.pipeline_key: _BANDS.get(p.band, Band.COLD) for p in plan.pipelines}
        for key in hot:
            bands[key] = Band.HOT
        pool = frozenset(w for h in hot.values() for w in h.replicas)
        fused = {f.pipeline_key: f.fused_id for f in plan.fusions if f.pipeline_key and f.fused_id}
        fused.update((h.pipeline_key, h.fused_id) for h in hot.values() if h.fused_id)
        return cls(
            plan.version,
            from_proto(plan.mode),
            hot,
            bands,
            pool,
            {w: frozenset(ids) for w, ids in pinned.items()},
            plan,
            fused,
        )


class ChangeKind(StrEnum):
    """What one applied event changed."""

    SNAPSHOT = "snapshot"
    LIVE = "live"
    RESIDENCY = "residency"
    LOAD = "load"
    PLAN = "plan"


@dataclass(frozen=True)
class ViewChange:
    """Told to listeners after each applied event."""

    kind: ChangeKind
    workers: tuple[WorkerKey, ...] = ()
    """Workers whose load, GPU copies or liveness changed (for RESIDENCY: the reporter, worker id empty for a node)."""
    components: tuple[str, ...] = ()
    """Components whose copies changed (RESIDENCY)."""


Listener = Callable[[ViewChange], None]


class View:
    """The global view's state, changed only through the ``apply_*`` methods.

    Lookups a routing decision needs are dictionary reads: :meth:`copies` (component →
    copies), :attr:`workers` and :attr:`worker_keys`, :attr:`loads`, :attr:`plan`.
    Copies are kept whatever the liveness of their reporter; a reporter whose node or
    worker leaves the live set loses its copies (the coordinator drops them too: a node
    that returns starts empty and reports again).
    """

    def __init__(self) -> None:
        self.nodes: dict[str, NodeEntry] = {}
        self.workers: dict[WorkerKey, WorkerEntry] = {}
        self.worker_keys: tuple[WorkerKey, ...] = ()
        """Live workers ordered by (worker_id, node_id)."""
        self.loads: dict[WorkerKey, WorkerLoadEntry] = {}
        self.plan = PlanEntry()
        self._copies: dict[str, dict[CopyKey, int]] = {}
        self._reporters: dict[WorkerKey, dict[tuple[str, Tier], int]] = {}
        self._reporter_bytes: dict[WorkerKey, int] = {}
        self.last_event_id = ""
        self.events_applied = 0
        self.snapshots_applied = 0
        self.live_version = 0
        """Increases whenever the live set changes (readers rebuild worker indexes on change)."""
        self._listeners: list[Listener] = []

    # -- reading ----------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """True once a snapshot was applied."""
        return self.snapshots_applied > 0

    def copies(self, component_id: str) -> Mapping[CopyKey, int]:
        """Every copy of ``component_id``: (node_id, worker_id, tier) → bytes (empty: none)."""
        return self._copies.get(component_id, _EMPTY)

    def reporter_copies(self, node_id: str, worker_id: str = "") -> Mapping[tuple[str, Tier], int]:
        """What one reporter holds: (component_id, tier) → bytes."""
        return self._reporters.get((node_id, worker_id), _EMPTY_REPORTER)

    def reporter_bytes(self, node_id: str, worker_id: str = "") -> int:
        """Bytes of every copy one reporter holds (a worker: its device tier)."""
        return self._reporter_bytes.get((node_id, worker_id), 0)

    def components(self) -> int:
        """How many components have at least one copy."""
        return len(self._copies)

    # -- listening --------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Calls ``listener`` after every applied event (in the applying thread)."""
        self._listeners.append(listener)

    def _tell(self, change: ViewChange) -> None:
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:
                log.exception("view listener failed", extra={"kind": change.kind.value})

    # -- applying ---------------------------------------------------------------------

    def apply(self, event: plan_pb2.ViewEvent) -> ChangeKind | None:
        """Applies one stream event; returns what it changed (None: an event of an unknown kind, skipped)."""
        kind = event.WhichOneof("change")
        if kind == "snapshot":
            self.apply_snapshot(event.snapshot)
        elif kind == "residency":
            self.apply_residency(event.residency)
        elif kind == "load":
            self.apply_load(event.load)
        elif kind == "plan":
            self.apply_plan(event.plan)
        elif kind == "live":
            self.apply_live(event.live)
        else:
            log.warning("view event of an unknown kind skipped", extra={"event_id": event.event_id})
            return None
        if event.event_id:
            self.last_event_id = event.event_id
        self.events_applied += 1
        return ChangeKind(kind)

    def apply_snapshot(self, snapshot: plan_pb2.ViewSnapshot) -> None:
        """Replaces the whole state with ``snapshot``."""
        self.nodes, self.workers, self.loads = {}, {}, {}
        self._copies, self._reporters, self._reporter_bytes = {}, {}, {}
        self._set_live(snapshot.live)
        for change in snapshot.residency:
            self._residency(change)
        now = time.monotonic()
        for load in snapshot.loads:
            self._load(load, now)
        self.plan = PlanEntry.from_proto(snapshot.plan)
        self.snapshots_applied += 1
        self._tell(ViewChange(ChangeKind.SNAPSHOT))

    def apply_live(self, live: plan_pb2.LiveSet) -> None:
        """Replaces the live set; reporters that left lose their copies and loads."""
        gone = self._set_live(live)
        self._tell(ViewChange(ChangeKind.LIVE, tuple(gone)))

    def apply_residency(self, change: plan_pb2.ResidencyChange) -> None:
        """Applies one reporter's tier changes."""
        components = self._residency(change)
        self._tell(ViewChange(ChangeKind.RESIDENCY, ((change.node_id, change.worker_id),), components))

    def apply_load(self, load: plan_pb2.WorkerLoad) -> None:
        """Records a worker's load (an older measurement than the one held is ignored)."""
        if self._load(load, time.monotonic()):
            self._tell(ViewChange(ChangeKind.LOAD, ((load.worker.node_id, load.worker.worker_id),)))

    def apply_plan(self, plan: plan_pb2.Plan) -> None:
        """Takes ``plan`` unless its version is older than the current one (a stale plan is ignored)."""
        if plan.version < self.plan.version:
            log.info("stale plan ignored", extra={"version": plan.version, "current": self.plan.version})
            return
        self.plan = PlanEntry.from_proto(plan)
        self._tell(ViewChange(ChangeKind.PLAN))

    def _set_live(self, live: plan_pb2.LiveSet) -> list[WorkerKey]:
        nodes: dict[str, NodeEntry] = {}
        workers: dict[WorkerKey, WorkerEntry] = {}
        for n in live.nodes:
            nodes[n.node_id] = NodeEntry(n.node_id, n.instance_manager_address, tuple(w.worker_id for w in n.workers))
            for w in n.workers:
                workers[(n.node_id, w.worker_id)] = WorkerEntry(n.node_id, w.worker_id, w.address, w.device_memory_bytes)
        gone_workers = [k for k in self.workers if k not in workers]
        gone_nodes = [n for n in self.nodes if n not in nodes]
        changed = nodes != self.nodes or workers != self.workers
        self.nodes, self.workers = nodes, workers
        if changed:
            self.worker_keys = tuple(sorted(workers, key=lambda k: (k[1], k[0])))
            self.live_version += 1
        gone_set = set(gone_nodes)
        dropped = [r for r in self._reporters if r in gone_workers or (r[0] in gone_set)]
        for reporter in dropped:
            self._drop_reporter(reporter)
        for key in gone_workers:
            self.loads.pop(key, None)
        return sorted(set(gone_workers) | set(dropped))

    def _drop_reporter(self, reporter: WorkerKey) -> list[str]:
        held = self._reporters.pop(reporter, None)
        self._reporter_bytes.pop(reporter, None)
        if not held:
            return []
        node_id, worker_id = reporter
        for cid, tier in held:
            copies = self._copies.get(cid)
            if copies is not None:
                copies.pop((node_id, worker_id, tier), None)
                if not copies:
                    del self._copies[cid]
        return [cid for cid, _ in held]

    def _residency(self, change: plan_pb2.ResidencyChange) -> tuple[str, ...]:
        reporter = (change.node_id, change.worker_id)
        touched: list[str] = self._drop_reporter(reporter) if change.full_snapshot else []
        held = self._reporters.setdefault(reporter, {})
        total = self._reporter_bytes.get(reporter, 0)
        for delta in change.copies:
            # The gRPC edge: a tier this build does not know is skipped.
            if delta.tier not in Tier._value2member_map_ or delta.tier == Tier.UNSPECIFIED:
                continue
            tier = Tier(delta.tier)
            cid = delta.component_id
            slot = (cid, tier)
            copy_key = (change.node_id, change.worker_id, tier)
            total -= held.pop(slot, 0)
            if delta.present:
                held[slot] = delta.bytes
                total += delta.bytes
                self._copies.setdefault(cid, {})[copy_key] = delta.bytes
            else:
                copies = self._copies.get(cid)
                if copies is not None:
                    copies.pop(copy_key, None)
                    if not copies:
                        del self._copies[cid]
            touched.append(cid)
        if held:
            self._reporter_bytes[reporter] = total
        else:
            del self._reporters[reporter]
            self._reporter_bytes.pop(reporter, None)
        return tuple(dict.fromkeys(touched))

    def _load(self, load: plan_pb2.WorkerLoad, now: float) -> bool:
        key = (load.worker.node_id, load.worker.worker_id)
        held = self.loads.get(key)
        if held is not None and load.measured_unix and load.measured_unix < held.measured_unix:
            return False
        self.loads[key] = WorkerLoadEntry(
            load.queue_length,
            load.running,
            load.device_memory_free_bytes,
            load.device_memory_total_bytes,
            load.max_queue,
            load.measured_unix,
            now,
        )
        return True


_EMPTY: Mapping[CopyKey, int] = {}
_EMPTY_REPORTER: Mapping[tuple[str, Tier], int] = {}


class ViewReplica:
    """Follows the coordinator's ``WatchView`` into a :class:`View` and keeps serving it when the stream is down.

    ``stub`` is a coordinator stub on the caller's channel. With ``plans_only`` only plan
    events (and the snapshot) are asked for. Reconnection waits ``backoff_initial_s``,
    doubling up to ``backoff_max_s``; it starts over after a watch that delivered events.
    """

    def __init__(
        self,
        stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub,
        *,
        plans_only: bool = False,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 5.0,
        view: View | None = None,
    ) -> None:
        if backoff_initial_s <= 0:
            raise ValueError("backoff_initial_s must be positive")
        self.view = view or View()
        self._stub = stub
        self._plans_only = plans_only
        self._backoff_initial = backoff_initial_s
        self._backoff_max = max(backoff_initial_s, backoff_max_s)
        self.connected = False
        """True while a watch is open and delivered its first event."""
        self.last_event_unix = 0.0
        """Wall time when the last event arrived (0: none yet)."""
        self._last_event_monotonic: float | None = None
        self.watches = 0
        """Watches opened (the first, then one per reconnection)."""
        self.failures = 0
        """Watches that ended with an error."""
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()

    # -- state for readers --------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """True once a snapshot was applied: the view can serve decisions (even while disconnected)."""
        return self.view.synced

    def staleness_s(self) -> float | None:
        """Seconds since the last event arrived (None: none yet)."""
        if self._last_event_monotonic is None:
            return None
        return time.monotonic() - self._last_event_monotonic

    def detail(self) -> str:
        """One line for health details and stats: connected or not, how stale, which plan."""
        stale = self.staleness_s()
        age = "no event yet" if stale is None else f"last event {stale:.1f} s ago"
        if self.connected:
            state = "following the coordinator's view"
        elif self.synced:
            state = f"change stream down ({self.last_error or 'reconnecting'}); routing on the last view"
        else:
            state = f"no view yet ({self.last_error or 'connecting'})"
        return f"{state}; {age}; plan v{self.view.plan.version}"

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """Waits until a snapshot was applied; False after ``timeout`` seconds without one."""
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- running ----------------------------------------------------------------------

    def start(self) -> None:
        """Starts following on the running event loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="view-replica")

    async def stop(self) -> None:
        """Stops following; the view keeps its last state."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.connected = False

    async def _run(self) -> None:
        delay = self._backoff_initial
        while True:
            delivered = False
            try:
                delivered = await self._watch()
                self.last_error = "stream ended by the coordinator"
            except aio.AioRpcError as err:
                self.failures += 1
                self.last_error = f"{err.code().name}: {err.details()}"
            except grpc.RpcError as err:  # pragma: no cover - aio raises AioRpcError
                self.failures += 1
                self.last_error = str(err)
            if self.connected:
                log.warning("view stream lost; routing on the last view", extra={"detail": self.last_error})
            elif self.failures == 1 and not delivered:
                log.warning("cannot follow the view yet; retrying", extra={"detail": self.last_error, "retry_s": delay})
            else:
                log.debug("view watch failed", extra={"detail": self.last_error, "retry_s": delay})
            self.connected = False
            if delivered:
                delay = self._backoff_initial
            await asyncio.sleep(delay)
            delay = min(delay * 2.0, self._backoff_max)

    async def _watch(self) -> bool:
        """One watch, until the stream ends; True when it delivered at least one event."""
        self.watches += 1
        request = coordinator_pb2.WatchViewRequest(after_event_id=self.view.last_event_id, plans_only=self._plans_only)
        call = self._stub.WatchView(request)
        delivered = False
        try:
            async for response in call:
                self._on_event(response.event)
                if not delivered:
                    delivered = True
                    self.connected = True
                    log.info(
                        "following the coordinator's view",
                        extra={"after_event_id": request.after_event_id, "first": response.event.WhichOneof("change")},
                    )
        finally:
            call.cancel()
        return delivered

    def _on_event(self, event: plan_pb2.ViewEvent) -> None:
        self.last_event_unix = time.time()
        self._last_event_monotonic = time.monotonic()
        try:
            kind = self.view.apply(event)
        except Exception:
            # A malformed event must not stop the replica; the next snapshot repairs the state.
            log.exception("view event could not be applied; skipped", extra={"event_id": event.event_id})
            return
        if kind is ChangeKind.SNAPSHOT:
            self._synced.set()
