"""HostPool: one real shared-memory segment of size-class slabs; no leaks in /dev/shm."""

from __future__ import annotations

import itertools
import logging
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from diffmesh.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from diffmesh.shm import pool_segment_name
from diffmesh_instance_manager.direct_io import read_into
from diffmesh_instance_manager.pool import (
    HostPool,
    PoolBlock,
    PoolExhausted,
    list_pools,
    plan_slabs,
    remove_stale_pools,
)
from diffmesh_instance_manager.size_classes import SizeClass

MiB = 1024 * 1024
SHM = Path("/dev/shm")
CLASSES = [SizeClass(4 * MiB, 0.5, 3, 2 * MiB), SizeClass(12 * MiB, 0.5, 3, 11 * MiB)]


@pytest.fixture
def node() -> Iterator[str]:
    """A node id unique to the test; asserts that no pool segment of it is left behind."""
    node_id = f"pooltest{os.getpid()}x{random.randrange(1 << 30):x}"
    yield node_id
    leftover = list_pools(node_id)
    remove_stale_pools(node_id)
    assert leftover == []


def test_plan_slabs_splits_capacity_by_weight_times_size() -> None:
    # Demands 0.5·4 and 0.5·12 → shares 16 and 48 MiB of 64 MiB.
    assert plan_slabs(64 * MiB, CLASSES) == [4, 4]
    # 70 MiB: shares 17.5 / 52.5 → 4 + 4 blocks, then 6 MiB left: one more 4 MiB block.
    assert plan_slabs(70 * MiB, CLASSES) == [5, 4]
    # A class whose share rounds to zero still gets one block when it fits.
    assert plan_slabs(16 * MiB, [SizeClass(2 * MiB, 0.99, 1, MiB), SizeClass(12 * MiB, 0.01, 1, MiB)]) == [2, 1]


def test_allocate_prefers_the_smallest_fitting_class_then_falls_back(node: str) -> None:
    with HostPool(node, 64 * MiB, CLASSES) as pool:
        assert pool.segment.startswith(pool_segment_name(node))
        assert (SHM / pool.segment).stat().st_size == 64 * MiB
        small = [pool.allocate(3 * MiB) for _ in range(4)]
        assert {b.block_size for b in small} == {4 * MiB}
        assert [b.offset for b in small] == [0, 4 * MiB, 8 * MiB, 12 * MiB]
        spill = pool.allocate(MiB)  # small class full → a 12 MiB block
        assert (spill.block_size, spill.class_index, spill.offset) == (12 * MiB, 1, 16 * MiB)
        big = [pool.allocate(12 * MiB) for _ in range(3)]
        with pytest.raises(PoolExhausted) as info:
            pool.allocate(5 * MiB)
        assert isinstance(info.value, ResourceExhausted)
        assert info.value.classes == [1]
        assert info.value.retry_after_s > 0
        with pytest.raises(FailedPrecondition, match="largest block"):
            pool.allocate(13 * MiB)
        with pytest.raises(InvalidArgument):
            pool.allocate(0)
        pool.free(small[1])
        again = pool.allocate(2 * MiB)
        assert again.offset == small[1].offset  # the lowest free block of the class
        offsets = sorted((b.offset, b.offset + b.block_size) for b in [*small, spill, *big])
        for (_, end), (start, _) in itertools.pairwise(offsets):
            assert end <= start
        assert all(b.offset % (2 * MiB) == 0 for b in [*small, spill, *big])


def test_stats_report_occupancy_and_internal_fragmentation(node: str) -> None:
    with HostPool(node, 64 * MiB, CLASSES, prefault=False) as pool:
        assert pool.stats().fragmentation == 0.0
        a = pool.allocate(3 * MiB)
        pool.allocate(10 * MiB)
        st = pool.stats()
        assert [(c.block_size, c.blocks, c.used, c.used_bytes) for c in st.classes] == [
            (4 * MiB, 4, 1, 3 * MiB),
            (12 * MiB, 4, 1, 10 * MiB),
        ]
        assert [c.wasted_bytes for c in st.classes] == [MiB, 2 * MiB]
        assert st.allocated_bytes == 16 * MiB
        assert st.fragmentation == pytest.approx(3 / 16)
        assert st.capacity_bytes == 64 * MiB
        pool.free(a)
        assert pool.stats().classes[0].used == 0


def test_free_refuses_foreign_and_double_frees(node: str) -> None:
    with HostPool(node, 32 * MiB, CLASSES, prefault=False) as pool:
        b = pool.allocate(MiB)
        pool.free(b)
        with pytest.raises(ValueError, match="not allocated"):
            pool.free(b)
        with pytest.raises(ValueError, match="does not belong"):
            pool.free(PoolBlock("dm_other_pool_00000000", 0, MiB, 4 * MiB, 0))
        with pytest.raises(ValueError, match="block boundary"):
            pool.free(PoolBlock(pool.segment, MiB, MiB, 4 * MiB, 0))
        assert pool.allocate(MiB).offset == 0  # still serving


def test_churn_never_fragments_the_pool(node: str) -> None:
    rng = random.Random(42)
    with HostPool(node, 96 * MiB, CLASSES, prefault=False) as pool:
        live: list[PoolBlock] = []
        for _ in range(2000):
            if live and (rng.random() < 0.5):
                pool.free(live.pop(rng.randrange(len(live))))
            else:
                try:
                    live.append(pool.allocate(rng.randrange(1, 12 * MiB)))
                except PoolExhausted:
                    pool.free(live.pop(rng.randrange(len(live))))
        for b in live:
            pool.free(b)
        # After any history, the whole capacity is again allocatable as the full set of blocks.
        counts = [c.blocks for c in pool.stats().classes]
        full = [pool.allocate(c.block_size) for c, n in zip(pool.classes, counts, strict=True) for _ in range(n)]
        assert sum(b.block_size for b in full) == pool.capacity_bytes
        assert all(c.free == 0 for c in pool.stats().classes)


def test_blocks_are_shared_memory_visible_to_another_process(node: str, tmp_path: Path) -> None:
    with HostPool(node, 32 * MiB, CLASSES) as pool:
        b = pool.allocate(3 * MiB + 5)
        payload = os.urandom(b.length)
        src = tmp_path / "component.bin"
        src.write_bytes(payload)
        view = pool.block_view(b)
        result = read_into(src, view, chunk_size=MiB, threads=3)  # in place: the block is aligned and has room
        view.release()
        assert result.bytes_read == len(payload)
        code = (
            "import sys, hashlib\n"
            "from multiprocessing import shared_memory, resource_tracker\n"
            "shm = shared_memory.SharedMemory(name=sys.argv[1])\n"
            "resource_tracker.unregister(shm._name, 'shared_memory')\n"
            "off, n = int(sys.argv[2]), int(sys.argv[3])\n"
            "print(hashlib.sha256(shm.buf[off:off + n]).hexdigest())\n"
            "shm.close()\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, pool.segment, str(b.offset), str(b.length)], capture_output=True, text=True, check=True
        )
        import hashlib

        assert out.stdout.strip() == hashlib.sha256(payload).hexdigest()
        with pool.view(b) as v:
            assert bytes(v[:16]) == payload[:16]


def test_close_unlinks_even_with_a_live_view_and_is_idempotent(node: str, caplog: pytest.LogCaptureFixture) -> None:
    pool = HostPool(node, 16 * MiB, CLASSES, prefault=False)
    name = pool.segment
    assert (SHM / name).exists()
    view = pool.view(pool.allocate(MiB))
    with caplog.at_level(logging.WARNING):
        pool.close()
    assert "views still exist" in caplog.text
    assert not (SHM / name).exists()
    view.release()
    pool.close()
    with pytest.raises(FailedPrecondition, match="closed"):
        pool.allocate(MiB)


def test_stale_pool_segments_are_removed(node: str) -> None:
    stale = SHM / f"{pool_segment_name(node)}_deadbeef"
    stale.write_bytes(b"x")
    other = SHM / f"{pool_segment_name(node)}x_deadbeef"  # another node's name: untouched
    other.write_bytes(b"x")
    try:
        assert list_pools(node) == [stale.name]
        assert remove_stale_pools(node) == [stale.name]
        assert not stale.exists()
        assert other.exists()
    finally:
        other.unlink()


def test_pinning_is_a_no_op_without_cuda_and_required_pinning_fails_cleanly(node: str) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        with HostPool(node, 16 * MiB, CLASSES, pin=True) as pool:
            assert pool.pinned and pool.stats().pinned
        return
    with HostPool(node, 16 * MiB, CLASSES, prefault=False) as pool:
        assert not pool.pinned
    with pytest.raises(FailedPrecondition, match="CUDA"):
        HostPool(node, 16 * MiB, CLASSES, pin=True)
    assert list_pools(node) == []


def test_bad_configuration(node: str) -> None:
    with pytest.raises(InvalidArgument, match="host_capacity_bytes"):
        HostPool(node, 0, CLASSES)
    with pytest.raises(InvalidArgument, match="hold no block"):
        HostPool(node, MiB, CLASSES)
    with pytest.raises(InvalidArgument, match="multiple of"):
        HostPool(node, 64 * MiB, [SizeClass(3 * MiB, 1.0, 1, MiB)])
    assert list_pools(node) == []
