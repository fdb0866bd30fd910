"""Policies: placement and caching decisions as pure code.

No I/O and no clocks (time is an argument); deterministic for a seed.

Today the running services call only part of this package:

* the router ranks workers by expected completion time with the functions of
  :mod:`~diffmesh.policy.routing` that the simulator's routing calls too (and with
  :func:`~diffmesh.policy.locality.rank_workers` only on a cold start, before its replica
  of the view synced);
* the instance manager chooses eviction victims with
  :class:`~diffmesh.policy.eviction.UtilityEviction` over
  :class:`~diffmesh.policy.popularity.DecayedCounter` rates
  (:class:`~diffmesh.policy.eviction.LRUEviction` under ``DIFFMESH_POLICY=lru``) and
  admits COLD copies into HOST with :class:`~diffmesh.policy.admission.ColdAdmission`;
* the worker evicts its device tier with the same ``UtilityEviction`` (``LRUEviction``
  under lru);
* the coordinator's policy loop calls :func:`~diffmesh.policy.planner.plan` every
  ``PLAN_SECONDS``, and through it: bands (:mod:`~diffmesh.policy.popularity`, counted in
  Redis with the same forward decay, :func:`~diffmesh.policy.popularity.forward_growth`),
  HOT replicas (:mod:`~diffmesh.policy.replicas`), fusion targets
  (:mod:`~diffmesh.policy.fusion_plan`) and scaling advice (:mod:`~diffmesh.policy.scaling`);
  WARM prefetch picks come from :mod:`~diffmesh.policy.prefetch`.

The simulator places its HOT replicas with the same
:func:`~diffmesh.policy.planner.plan_hot`, picks fusion targets with the same
:func:`~diffmesh.policy.fusion_plan.plan_fusion`, assigns bands with the same
:func:`~diffmesh.policy.popularity.assign_bands` and estimates adapter loads with
:func:`~diffmesh.policy.routing.adapters_load_s`; when it replans, its peer tier and its
branch-and-bound routing are still its own code, and scaling advice is not simulated.
Called only by the simulator: the byte-bounded tiers
(:class:`~diffmesh.policy.eviction.BoundedCache`) and the LFU/GDSF baselines. A simulated
result speaks for the running system only where both use the same policy.
"""
