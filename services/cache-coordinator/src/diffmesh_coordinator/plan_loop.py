"""The policy loop: every ``PLAN_SECONDS`` one coordinator replica plans and publishes the plan.

Each pass (:meth:`PlanLoop.tick`):

1. takes or renews the planner lock (``{ns}plan-lock``, a TTL'd key holding this replica's
   token); a replica that does not hold it does nothing, so any number of replicas can
   run against one Redis and exactly one plans (another takes over within a lock TTL when
   it stops);
2. under ``DIFFMESH_POLICY=lru``: a plan with mode LRU and nothing else;
   otherwise reads the ranked pipelines (decayed popularity), the catalog sizes of their
   components, the live nodes and workers (device memory from the last ``ReportLoad``,
   else the registration), each node's SSD/HOST holdings and the previous plan, feeds the
   prefetch bandit the residency changes since the last pass, and calls the pure planner
   (:func:`diffmesh.policy.planner.plan`);
3. publishes the plan only when it differs from the stored one (measurements aside): the
   version then goes up by one, and the plan is stored and appended to the view stream in
   one transaction that also checks the lock and the version it replaces.

A pipeline naming a component that is not in the catalog (or with a malformed key) is
skipped with a log line; replicas of workers and nodes that left are dropped the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid

import redis.asyncio as aioredis
from diffmesh.pipeline_key import fused_id_of_key, parse_key
from diffmesh.policy.planner import PipelineDemand, PlanDecision, PlanInputs, PlannerSettings, PlanWorker, plan
from diffmesh.policy.popularity import BandThresholds
from diffmesh.policy_mode import PolicyMode
from diffmesh.tiers import Tier
from diffmesh.v1 import plan_pb2

from diffmesh_coordinator import view_events
from diffmesh_coordinator.plan_proto import decision_of, plan_message, plan_signature
from diffmesh_coordinator.popularity import DecayedPopularity, RankedPipeline
from diffmesh_coordinator.prefetch_rewards import PrefetchRewards
from diffmesh_coordinator.settings import CoordinatorSettings
from diffmesh_coordinator.store import CoordinatorStore

log = logging.getLogger(__name__)

MIN_LOCK_TTL_S = 2.0
"""The planner lock lives at least this long, and at least three plan periods."""

_REWARD_BATCH = 1000


def replica_token() -> str:
    """A token naming this coordinator process in the planner lock."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class PlanLoop:
    """Plans every ``plan_seconds`` while this replica holds the planner lock."""

    def __init__(
        self,
        store: CoordinatorStore,
        popularity: DecayedPopularity,
        settings: CoordinatorSettings,
        mode: PolicyMode,
        token: str | None = None,
    ) -> None:
        self.store = store
        self.popularity = popularity
        self.settings = settings
        self.mode = mode
        self.token = token or replica_token()
        self.planner = PlannerSettings(
            thresholds=BandThresholds(settings.hot_fraction, settings.warm_fraction),
            pin_budget_fraction=settings.pin_budget_fraction,
            fusion_top_k=settings.fusion_top_k,
            cold_min_uses=settings.cold_min_uses,
            scale_out_load=settings.scale_out_load,
        )
        self.rewards = PrefetchRewards(
            settings.prefetch_per_bucket,
            settings.prefetch_bucket_seconds,
            give_up_s=max(settings.prefetch_bucket_seconds, 20 * settings.plan_seconds),
        )
        self.lock_ttl_ms = round(1000 * max(MIN_LOCK_TTL_S, 3 * settings.plan_seconds))
        self.leader = False
        self.passes = 0
        """Passes made while holding the lock (published or not)."""
        self._previous: tuple[int, PlanDecision] | None = None
        self._reward_after = ""
        self._skipped: frozenset[str] = frozenset()

    async def run(self, stopping: asyncio.Event) -> None:
        """Plans every ``plan_seconds`` until ``stopping`` is set; Redis errors are logged and retried next period.

        ``stopping`` is checked as well as cancellation: redis-py may turn a cancellation in
        the middle of a command into a connection error.
        """
        while not stopping.is_set():
            try:
                await self.tick()
            except (aioredis.RedisError, OSError) as exc:
                if stopping.is_set():
                    break
                log.warning("planning failed", extra={"error": str(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.settings.plan_seconds)

    async def release(self) -> None:
        """Gives the planner lock up (another replica takes over at its next pass)."""
        if self.leader:
            await self.store.release_plan_lock(self.token)
            self.leader = False

    async def tick(self) -> int:
        """One pass; returns the version it published, 0 when it published nothing."""
        if not await self.store.hold_plan_lock(self.token, self.lock_ttl_ms):
            if self.leader:
                log.info("planner lock lost to another coordinator")
            self.leader = False
            return 0
        if not self.leader:
            self.leader = True
            self._previous = None
            info = await self.store.stream_info()
            self._reward_after = str(info.get("last-generated-id") or view_events.START_ID) if info else view_events.START_ID
            log.info("planning", extra={"token": self.token, "mode": self.mode.value})
        self.passes += 1
        now = self.store.clock()
        current = await self.store.get_plan()
        decision: PlanDecision | None = None
        host_last_used: dict[tuple[str, str], float] = {}
        if self.mode is PolicyMode.DIFFMESH:
            decision, host_last_used = await self._decide(now, current)
        plan_msg = plan_message(decision, self.mode, current.version + 1, now, self.popularity.lam)
        if current.version and plan_signature(plan_msg) == plan_signature(current):
            return 0
        if not await self.store.publish_plan(plan_msg, current.version, self.token):
            return 0
        if decision is not None:
            self._previous = (plan_msg.version, decision)
            self.rewards.issued(decision, now, host_last_used)
        log.info(
            "plan published",
            extra={
                "version": plan_msg.version,
                "mode": self.mode.value,
                "hot": len(plan_msg.hot),
                "pipelines": len(plan_msg.pipelines),
                "nodes": len(plan_msg.nodes),
            },
        )
        return plan_msg.version

    async def _decide(self, now: float, current: plan_pb2.Plan) -> tuple[PlanDecision, dict[tuple[str, str], float]]:
        store, settings = self.store, self.settings
        ranked = await self.popularity.ranked_pipelines(store.redis, store.keys, now, settings.rank_min_count)
        await self.popularity.prune(store.redis, store.keys, now, settings.rank_min_count)
        sizes = await store.catalog_sizes([c for p in ranked for c in p.component_ids])
        demands = self._demands(ranked, sizes)
        nodes = await store.list_nodes()
        loads = await store.loads()
        workers = []
        for n in nodes:
            for w in n.workers:
                load = loads.get((n.node_id, w.worker_id))
                memory = (load.device_memory_total_bytes if load else 0) or w.device_memory_bytes
                busy = float(load.queue_length + load.running) if load else 0.0
                workers.append(PlanWorker(n.node_id, w.worker_id, memory, busy))
        node_ids = [n.node_id for n in nodes]
        held = await store.holdings(node_ids)
        holdings = {n: {cid: Tier(t) for cid, (t, _, _) in h.items()} for n, h in held.items()}
        host_last_used = {(n, cid): used for n, h in held.items() for cid, (t, _, used) in h.items() if t == Tier.HOST}
        previous = self._previous[1] if self._previous and self._previous[0] == current.version else None
        if previous is None and current.version:
            previous = decision_of(current, self.popularity.lam)
        if previous is not None:
            self._log_departed(previous, {w.key for w in workers})
        await self._feed_rewards(now)
        decision = plan(
            PlanInputs(
                pipelines=demands,
                component_bytes=sizes,
                workers=workers,
                nodes=node_ids,
                holdings=holdings,
                previous=previous,
                choose_prefetch=self.rewards.chooser(now),
                fused_id_of=fused_id_of_key,
            ),
            self.planner,
        )
        return decision, host_last_used

    def _demands(self, ranked: list[RankedPipeline], sizes: dict[str, int]) -> list[PipelineDemand]:
        demands: list[PipelineDemand] = []
        skipped: dict[str, str] = {}
        for p in ranked:
            try:
                base, loras, controlnets = parse_key(p.key)
            except ValueError:
                skipped[p.key] = "not a canonical pipeline key"
                continue
            components = p.component_ids or (base, *(lid for lid, _ in loras), *controlnets)
            missing = [c for c in components if c not in sizes]
            if missing:
                skipped[p.key] = f"component {missing[0]!r} is not in the catalog"
                continue
            demands.append(PipelineDemand(p.key, p.count, tuple(components), tuple(lid for lid, _ in loras)))
        keys = frozenset(skipped)
        for key in sorted(keys - self._skipped):
            log.warning("pipeline skipped by the plan", extra={"pipeline_key": key, "reason": skipped[key]})
        self._skipped = keys
        return demands

    @staticmethod
    def _log_departed(previous: PlanDecision, live: set[tuple[str, str]]) -> None:
        for h in previous.hot:
            for node_id, worker_id in h.replicas:
                if (node_id, worker_id) not in live:
                    log.info(
                        "replica dropped: its worker left",
                        extra={"pipeline_key": h.key, "node_id": node_id, "worker_id": worker_id},
                    )

    async def _feed_rewards(self, now: float) -> None:
        """Feeds the residency changes appended since the last pass to the prefetch rewards."""
        while True:
            entries = await self.store.read_events(self._reward_after, _REWARD_BATCH, block_ms=None)
            for entry_id, fields in entries:
                self._reward_after = entry_id
                if fields.get(view_events.KIND_FIELD) == "residency":
                    self.rewards.observe(view_events.entry_event(entry_id, fields).residency)
            if len(entries) < _REWARD_BATCH:
                break
        self.rewards.expire(now)
