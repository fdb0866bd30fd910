"""One running instance manager per node id and IPC namespace.

At start the instance manager removes the shared-memory segments a crashed predecessor
left behind. That is only safe when no *live* instance manager uses the same node id, so
each one holds an exclusive ``flock`` on ``/dev/shm/dm_<node_id>.lock`` for its lifetime.
The kernel drops the lock when the process dies, so a crash never blocks a restart.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from diffmesh.errors import FailedPrecondition
from diffmesh.shm import SHM_DIR, node_lock_path


class NodeLock:
    """An exclusive lock on a node id; ``release()`` (or process exit) frees it."""

    def __init__(self, node_id: str, directory: Path = SHM_DIR) -> None:
        self.path = node_lock_path(node_id, directory)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise FailedPrecondition(
                f"node id {node_id!r} is already used by a running instance manager on this host "
                f"({self.path} is locked): give each instance manager its own DIFFMESH_IM_NODE_ID"
            ) from None

    def release(self) -> None:
        """Unlinks the lock file and releases the lock."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
