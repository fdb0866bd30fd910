"""Executes the coordinator's plan on this node: pins, prefetches, fused overlays and the admission rule.

A :class:`diffmesh.plan_follower.PlanFollower` hands every new plan version to
:meth:`PlanExecutor.apply`. The node's ``NodeDirective`` (the one whose ``node_id`` is
ours) says what to do:

* ``pinned_ids`` replace the store's pinned set (plus the ``pinned_components`` setting):
  those copies are never evicted from SSD or HOST while the plan holds;
* ``prefetch_ids`` start background HOST loads, the Prefetch RPC's path (ids already
  resident or loading are skipped);
* ``fuse_pipeline_keys`` name fusion targets (``plan.fusions``, else HOT pipelines of
  ``plan.hot``) whose FUSED overlay this node keeps HOST-resident: the Fuse RPC's work
  runs in the background, once per overlay (an overlay already HOST-resident, or being
  fused, is left alone).

The plan's ``AdmissionRule`` becomes the HOST tier's COLD admission rule (:mod:`.admission`).

Applying is idempotent and ordered: a plan whose version is not newer than the last one
applied is ignored. A plan under ``POLICY_MODE_LRU`` is ignored too (the baseline runs no
plan). A plan that names a component the catalog does not have, or a pipeline whose fusion
fails, is logged and that item skipped: the rest of the plan still applies, and applying
never raises.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

from diffmesh.pipeline_key import fused_id as default_fused_id
from diffmesh.tiers import Tier
from diffmesh.v1 import plan_pb2

from diffmesh_instance_manager.overlay_fuser import OverlayFuser
from diffmesh_instance_manager.store import ComponentStore

log = logging.getLogger(__name__)


class PlanExecutor:
    """Applies plans to ``store`` (and ``fuser``) for node ``node_id``; ``static_pins`` stay pinned whatever the plan.

    ``lru``: this node runs ``DIFFMESH_POLICY=lru`` and ignores every plan.
    """

    def __init__(
        self,
        store: ComponentStore,
        fuser: OverlayFuser,
        node_id: str,
        static_pins: Collection[str] = (),
        *,
        lru: bool = False,
    ) -> None:
        self.store = store
        self.fuser = fuser
        self.node_id = node_id
        self.static_pins = frozenset(static_pins)
        self.lru = lru
        self._fusing: set[str] = set()
        self._lock = asyncio.Lock()

    @property
    def version(self) -> int:
        """Version of the plan applied last (0: none)."""
        return self.store.plane.plan_version

    async def on_plan(self, plan: plan_pb2.Plan) -> None:
        """:meth:`apply`, as :class:`~diffmesh.plan_follower.PlanFollower` calls it."""
        await self.apply(plan)

    async def apply(self, plan: plan_pb2.Plan) -> bool:
        """Applies ``plan`` unless it is stale or an LRU plan; returns whether it was applied. Never raises."""
        async with self._lock:
            if self.lru or plan.mode == plan_pb2.POLICY_MODE_LRU:
                log.info("plan ignored: the mesh runs the lru baseline", extra={"version": plan.version})
                return False
            if plan.version <= self.version:
                log.info("stale plan ignored", extra={"version": plan.version, "applied": self.version})
                return False
            self.store.plane.plan_version = plan.version
            directive = next((d for d in plan.nodes if d.node_id == self.node_id), None)
            pins = set(self.static_pins)
            if directive is not None:
                pins.update(directive.pinned_ids)
            self.store.set_pinned(pins)
            if plan.HasField("admission"):
                self.store.admission.set_rule(plan.admission.admitted_ids, plan.admission.cold_min_uses)
            else:
                self.store.admission.clear_rule()
            prefetched = fused = 0
            if directive is not None:
                prefetched = await self._prefetch(list(directive.prefetch_ids), plan.version)
                fused = self._fuse(plan, list(directive.fuse_pipeline_keys))
            log.info(
                "plan applied",
                extra={
                    "version": plan.version,
                    "pinned": len(pins),
                    "prefetches": prefetched,
                    "fusions": fused,
                    "directive": directive is not None,
                },
            )
            return True

    async def _prefetch(self, ids: list[str], version: int) -> int:
        """Starts HOST loads of ``ids`` that are neither resident nor loading; returns how many started."""
        store = self.store
        started = 0
        for cid in dict.fromkeys(ids):
            if not cid or cid in store.host.entries or store.loading(Tier.HOST, cid):
                continue
            try:
                started += len(await store.prefetch([cid], Tier.HOST))
            except Exception as exc:  # noqa: BLE001 - one bad id (unknown to the catalog) must not stop the plan
                log.warning("plan prefetch skipped", extra={"version": version, "component_id": cid, "error": str(exc)})
        return started

    def _fuse(self, plan: plan_pb2.Plan, keys: list[str]) -> int:
        """Starts the background fusion of each fusion target in ``keys`` whose overlay is not here yet; returns how many."""
        targets: dict[str, plan_pb2.FusionTarget | plan_pb2.HotPipelinePlan] = {h.pipeline_key: h for h in plan.hot}
        targets.update((f.pipeline_key, f) for f in plan.fusions)
        started = 0
        for key in dict.fromkeys(keys):
            target = targets.get(key)
            if target is None:
                log.warning("plan fusion skipped: not a fusion target of the plan", extra={"version": plan.version, "key": key})
                continue
            spec = target.pipeline
            loras = [(ref.id, round(float(ref.scale), 6)) for ref in spec.loras]
            if not loras:
                log.warning("plan fusion skipped: the pipeline has no LoRAs", extra={"version": plan.version, "key": key})
                continue
            fused_id = target.fused_id or default_fused_id(spec.base_id, loras)
            if fused_id in self.store.host.entries or fused_id in self._fusing:
                continue  # already fused here, or being fused
            self._fusing.add(fused_id)
            self.store.background.spawn(self._fuse_one(spec.base_id, loras, fused_id, plan.version), "plan fusion", fused_id)
            started += 1
        return started

    async def _fuse_one(self, base_id: str, loras: list[tuple[str, float]], fused_id: str, version: int) -> None:
        try:
            rec, _, _, created = await self.fuser.fuse(base_id, loras, fused_id, holder="")
        except Exception as exc:  # noqa: BLE001 - a fusion that fails is skipped; the plan's other work goes on
            log.warning(
                "plan fusion failed", extra={"version": version, "component_id": fused_id, "base_id": base_id, "error": str(exc)}
            )
            return
        finally:
            self._fusing.discard(fused_id)
        self.store.plane.fusions_done += 1
        log.info("plan fusion done", extra={"version": version, "component_id": rec.id, "computed": created})
