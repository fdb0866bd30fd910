"""Shared-memory objects of this node found by name: listing them, and removing a crashed predecessor's.

Each kind of object (per-component segments in :mod:`.host`, the pool in :mod:`.pool`)
passes the exact pattern of its names, so one node's names never match another's.
Blocking (it reads ``/dev/shm``); run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from diffmesh.shm import SHM_DIR


def list_matching(pattern: re.Pattern[str], directory: Path = SHM_DIR) -> list[str]:
    """Names under ``directory`` (``/dev/shm``) that match ``pattern`` entirely, sorted."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if pattern.fullmatch(p.name))


def remove_matching(pattern: re.Pattern[str], directory: Path = SHM_DIR) -> list[str]:
    """Unlinks every object :func:`list_matching` finds; returns the names removed."""
    removed = []
    for name in list_matching(pattern, directory):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / name)
            removed.append(name)
    return removed
