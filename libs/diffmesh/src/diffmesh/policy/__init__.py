"""Policies: placement and caching decisions as pure code.

No I/O and no clocks (time is an argument); deterministic for a seed.

Today the running services call only part of this package:

* the router ranks workers by expected completion time with the functions of
  :mod:`~diffmesh.policy.routing` that the simulator's routing calls too (and with
  :func:`~diffmesh.policy.locality.rank_workers` only on a cold start, before its replica
  of the view synced);
* the instance manager chooses eviction victims with
  :class:`~diffmesh.policy.eviction.UtilityEviction` over
  :class:`~diffmesh.policy.popularity.DecayedCounter` rates;
* the coordinator's policy loop calls :func:`~diffmesh.policy.planner.plan` every
  ``PLAN_SECONDS``: bands (:mod:`~diffmesh.policy.popularity`, counted in Redis with the
  same forward decay, :func:`~diffmesh.policy.popularity.forward_growth`), HOT replicas
  (:mod:`~diffmesh.policy.replicas`), fusion targets (:mod:`~diffmesh.policy.fusion_plan`),
  WARM prefetch picks (:mod:`~diffmesh.policy.prefetch`) and scaling advice
  (:mod:`~diffmesh.policy.scaling`); the simulator places its HOT replicas with the same
  :func:`~diffmesh.policy.planner.plan_hot`.

Called only by the simulator (:mod:`diffmesh.sim`): COLD admission by score
(:mod:`~diffmesh.policy.admission`), the byte-bounded tiers and baseline evictions of
:mod:`~diffmesh.policy.eviction`. A simulated result speaks for the running system only
where both use the same policy.
"""
