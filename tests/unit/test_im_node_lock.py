"""Only one live instance manager per node id: the second one is refused, a released lock is free again."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffmesh.errors import FailedPrecondition
from diffmesh_instance_manager.node_lock import NodeLock


def test_second_holder_is_refused_until_release(tmp_path: Path) -> None:
    first = NodeLock("node-a", tmp_path)
    with pytest.raises(FailedPrecondition, match="node-a"):
        NodeLock("node-a", tmp_path)
    other = NodeLock("node-b", tmp_path)  # other node ids are independent
    first.release()
    assert not (tmp_path / "dm_node-a.lock").exists()
    again = NodeLock("node-a", tmp_path)
    again.release()
    other.release()
    first.release()  # idempotent
