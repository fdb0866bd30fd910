"""Names of the POSIX shared-memory objects diffmesh creates on a node.

One place for the directory and the naming scheme, used by the instance manager (which
creates and removes the segments), the worker (which maps them read-only) and the
launcher (which checks that nothing is left behind).
"""

from __future__ import annotations

from pathlib import Path

SHM_DIR = Path("/dev/shm")
"""Where Linux exposes POSIX shared-memory objects."""

SHM_PREFIX = "dm_"
"""Prefix of every object diffmesh creates."""


def node_prefix(node_id: str) -> str:
    """Prefix of every segment of one node (``dm_<node_id>_``)."""
    return f"{SHM_PREFIX}{node_id}_"


def pool_segment_name(node_id: str) -> str:
    """Name of a node's pre-allocated HOST pool segment."""
    return f"{node_prefix(node_id)}pool"


def node_lock_path(node_id: str, directory: Path = SHM_DIR) -> Path:
    """Path of the lock file that keeps a node id to one live instance manager."""
    return directory / f"{SHM_PREFIX}{node_id}.lock"
