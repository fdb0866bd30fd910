"""The mesh-wide policy switch: ``DIFFMESH_POLICY=diffmesh|lru``.

Every service reads it through :func:`policy_mode`, so one environment variable switches
the whole mesh between the policy plane (``diffmesh``) and the baseline the simulator calls
``lru`` (least-loaded routing, LRU at every tier, no plan, no prefetch, no fusion, no peer
copies). :class:`PolicyMode` is pure (no protobuf); :func:`to_proto` and :func:`from_proto`
convert at the gRPC edge to and from ``diffmesh.v1.PolicyMode``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import StrEnum

ENV_VAR = "DIFFMESH_POLICY"
"""The environment variable :func:`policy_mode` reads."""


class PolicyMode(StrEnum):
    """Which policy set the mesh runs; each has a simulator system of the same name."""

    DIFFMESH = "diffmesh"
    LRU = "lru"


def policy_mode(environ: Mapping[str, str] = os.environ) -> PolicyMode:
    """The mode ``DIFFMESH_POLICY`` selects (unset or empty: ``diffmesh``).

    Raises:
        ValueError: the variable holds anything but ``diffmesh`` or ``lru`` (case-insensitive).
    """
    raw = environ.get(ENV_VAR, "").strip().lower()
    if not raw:
        return PolicyMode.DIFFMESH
    try:
        return PolicyMode(raw)
    except ValueError:
        choices = "|".join(mode.value for mode in PolicyMode)
        raise ValueError(f"{ENV_VAR} must be one of {choices}, got {environ[ENV_VAR]!r}") from None


def to_proto(mode: PolicyMode) -> int:
    """The ``diffmesh.v1.PolicyMode`` value of ``mode``."""
    from diffmesh.v1 import plan_pb2

    return plan_pb2.POLICY_MODE_LRU if mode is PolicyMode.LRU else plan_pb2.POLICY_MODE_DIFFMESH


def from_proto(value: int) -> PolicyMode:
    """The mode a ``diffmesh.v1.PolicyMode`` value names (UNSPECIFIED reads as ``diffmesh``)."""
    from diffmesh.v1 import plan_pb2

    return PolicyMode.LRU if value == plan_pb2.POLICY_MODE_LRU else PolicyMode.DIFFMESH
