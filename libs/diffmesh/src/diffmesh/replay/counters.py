"""The services' own counters, read over their RPCs at the end of a policy's run.

- instance managers: ``Stats`` (tier hits/misses, and the policy plane's ``plan_version``,
  ``pinned_components``, ``prefetches_started``, ``prefetch_hits``, ``fusions_done``,
  ``admissions_refused``, ``peer_fetches``, ``peer_bytes``, ``remote_bytes``);
- the router: ``GetRouterStats`` (``locate_calls``, ``view_updates``, ``spills``, …);
- the coordinator: ``GetPlan``, polled during the run by :class:`PlanWatcher` (versions and
  HOT pipelines seen), and ``ListComponents`` of kind FUSED (overlays registered).

A service that does not implement an RPC (UNIMPLEMENTED) or cannot be reached leaves its
numbers ``None``, with a note saying why; nothing is estimated in their place.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import grpc

from diffmesh.tiers import Tier
from diffmesh.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    instance_manager_pb2,
    instance_manager_pb2_grpc,
    plan_pb2,
    router_pb2,
    router_pb2_grpc,
)

RPC_TIMEOUT_S = 10.0


def _why(err: grpc.RpcError) -> str:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return f"{code.name if code else 'ERROR'}: {details}"


def im_stats(address: str) -> tuple[instance_manager_pb2.StatsResponse | None, str]:
    """One instance manager's ``Stats``, or None and why not."""
    try:
        with grpc.insecure_channel(address) as channel:
            stub = instance_manager_pb2_grpc.InstanceManagerServiceStub(channel)
            return stub.Stats(instance_manager_pb2.StatsRequest(), timeout=RPC_TIMEOUT_S), ""
    except grpc.RpcError as err:
        return None, f"instance manager {address} Stats: {_why(err)}"


def router_stats(address: str) -> tuple[router_pb2.GetRouterStatsResponse | None, str]:
    """The router's ``GetRouterStats``, or None and why not."""
    try:
        with grpc.insecure_channel(address) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            return stub.GetRouterStats(router_pb2.GetRouterStatsRequest(), timeout=RPC_TIMEOUT_S), ""
    except grpc.RpcError as err:
        return None, f"router GetRouterStats: {_why(err)}"


def fused_registered(coordinator: str) -> tuple[int | None, str]:
    """How many FUSED overlays the coordinator's catalog holds, or None and why not."""
    count = 0
    token = ""
    try:
        with grpc.insecure_channel(coordinator) as channel:
            stub = coordinator_pb2_grpc.CacheCoordinatorServiceStub(channel)
            while True:
                page = stub.ListComponents(
                    coordinator_pb2.ListComponentsRequest(
                        kind=common_pb2.COMPONENT_KIND_FUSED, page_size=1000, page_token=token
                    ),
                    timeout=RPC_TIMEOUT_S,
                )
                count += len(page.components)
                token = page.next_page_token
                if not token:
                    return count, ""
    except grpc.RpcError as err:
        return None, f"coordinator ListComponents: {_why(err)}"


@dataclass
class PlanSeen:
    """What :class:`PlanWatcher` saw of the coordinator's plans."""

    replies: int = 0
    """Successful GetPlan calls (0: the plan could not be read at all)."""
    latest_version: int = 0
    versions: int = 0
    """Distinct plan versions observed."""
    max_hot: int = 0
    """Most HOT pipelines one plan listed."""
    max_plan_pins: int = 0
    """Most component pins (summed over nodes) one plan asked for."""
    max_plan_prefetches: int = 0
    """Most prefetch ids (summed over nodes) one plan asked for."""
    hot_keys: set[str] = field(default_factory=set)
    """Every pipeline key some plan ranked HOT."""
    unavailable: str = ""
    """Why GetPlan could not be read (empty: it could)."""


class PlanWatcher:
    """Polls the coordinator's ``GetPlan`` every ``interval_s`` in a background thread."""

    def __init__(self, coordinator: str, interval_s: float = 0.5) -> None:
        self.coordinator = coordinator
        self.interval_s = interval_s
        self.seen = PlanSeen()
        self._versions: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="replay-plan-watch", daemon=True)

    def start(self) -> PlanWatcher:
        """Starts polling."""
        self._thread.start()
        return self

    def stop(self) -> PlanSeen:
        """Polls once more, stops, and returns what was seen."""
        self._stop.set()
        self._thread.join(10)
        return self.seen

    def _loop(self) -> None:
        with grpc.insecure_channel(self.coordinator) as channel:
            stub = coordinator_pb2_grpc.CacheCoordinatorServiceStub(channel)
            while self._poll(stub):
                if self._stop.wait(self.interval_s):
                    self._poll(stub)  # the plan as the run ended
                    return

    def _poll(self, stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub) -> bool:
        """Reads the plan once; False when polling is pointless (the coordinator has no GetPlan)."""
        try:
            reply = stub.GetPlan(coordinator_pb2.GetPlanRequest(), timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as err:
            self.seen.unavailable = f"coordinator GetPlan: {_why(err)}"
            return err.code() != grpc.StatusCode.UNIMPLEMENTED
        self.seen.unavailable = ""
        self._record(reply.plan)
        return True

    def _record(self, plan: plan_pb2.Plan) -> None:
        if plan.version > 0:
            self._versions.add(plan.version)
        seen = self.seen
        seen.replies += 1
        seen.latest_version = max(seen.latest_version, plan.version)
        seen.versions = len(self._versions)
        seen.max_hot = max(seen.max_hot, len(plan.hot))
        seen.max_plan_pins = max(seen.max_plan_pins, sum(len(n.pinned_ids) for n in plan.nodes))
        seen.max_plan_prefetches = max(seen.max_plan_prefetches, sum(len(n.prefetch_ids) for n in plan.nodes))
        seen.hot_keys.update(h.pipeline_key for h in plan.hot)


@dataclass
class MeshCounters:
    """Every counter read from one mesh at the end of its run."""

    im: dict[str, instance_manager_pb2.StatsResponse] = field(default_factory=dict)
    router: router_pb2.GetRouterStatsResponse | None = None
    plan: PlanSeen = field(default_factory=PlanSeen)
    fused_registered: int | None = None
    notes: list[str] = field(default_factory=list)

    def im_sum(self, name: str) -> int | None:
        """A policy-plane counter of ``Stats`` summed over the nodes (None: no node answered)."""
        if not self.im:
            return None
        return int(sum(getattr(stats, name) for stats in self.im.values()))

    def ssd_misses(self) -> int | None:
        """SSD-tier misses summed over the nodes (every load into SSD: REMOTE, PEER or a re-derived overlay)."""
        if not self.im:
            return None
        return int(sum(t.misses for stats in self.im.values() for t in stats.tiers if Tier(t.tier) == Tier.SSD))


def collect(instance_managers: dict[str, str], router: str, coordinator: str, plan: PlanSeen) -> MeshCounters:
    """Reads every counter of a running mesh (``instance_managers``: node id → address)."""
    out = MeshCounters(plan=plan)
    if plan.unavailable:
        out.notes.append(plan.unavailable)
    for node_id, address in sorted(instance_managers.items()):
        stats, why = im_stats(address)
        if stats is not None:
            out.im[node_id] = stats
        else:
            out.notes.append(why)
    out.router, why = router_stats(router)
    if why:
        out.notes.append(why)
    out.fused_registered, why = fused_registered(coordinator)
    if why:
        out.notes.append(why)
    return out
