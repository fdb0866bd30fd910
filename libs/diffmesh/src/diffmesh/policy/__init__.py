"""Policies: placement and caching decisions as pure code.

No I/O and no clocks (time is an argument); deterministic for a seed.

Today the running services call only part of this package:

* the router ranks workers with :func:`~diffmesh.policy.locality.rank_workers`;
* the instance manager chooses eviction victims with
  :class:`~diffmesh.policy.eviction.UtilityEviction` over
  :class:`~diffmesh.policy.popularity.DecayedCounter` rates.

Everything else is called only by the simulator (:mod:`diffmesh.sim`): ECT routing
(:mod:`~diffmesh.policy.routing`), popularity bands, HOT replicas
(:mod:`~diffmesh.policy.replicas`), the fusion planner (:mod:`~diffmesh.policy.fusion_plan`),
the WARM prefetcher (:mod:`~diffmesh.policy.prefetch`), COLD admission
(:mod:`~diffmesh.policy.admission`), the byte-bounded tiers and baseline evictions of
:mod:`~diffmesh.policy.eviction`. :mod:`~diffmesh.policy.scaling` has no caller beyond
its tests. A simulated result therefore speaks for the running system only where both
use the same policy.
"""
