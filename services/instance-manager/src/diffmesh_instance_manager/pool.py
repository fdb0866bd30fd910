"""The HOST pool: one pre-allocated shared-memory segment split into size-class slabs.

The instance manager creates ONE POSIX shared-memory segment at start
(``/dev/shm/dm_<node>_pool_<8 hex>``), optionally pre-faults it (so loads do not pay for
tmpfs page allocation; on this project's VM that alone is the difference between 0.8 and
2+ GB/s for ``O_DIRECT`` reads into it) and registers it as pinned memory with
``cudaHostRegister`` when CUDA is present. The segment is split into one slab per
:class:`~diffmesh_instance_manager.size_classes.SizeClass`; a slab is an array of
fixed-size blocks. Capacity is divided between classes in proportion to
``weight x block size`` (the bytes the class's requests occupy).

``allocate(nbytes)`` hands out a free block of the smallest class whose blocks fit,
falling back to larger classes; ``free(block)`` returns it. Blocks never move and never
straddle, so the pool has no external fragmentation by construction; the waste is
internal (``block size - bytes used``), reported per class by :meth:`HostPool.stats`.
Every block starts at a multiple of 2 MiB from the segment start (which is page
aligned), so ``O_DIRECT`` reads can land in place.

Lifetime: :meth:`HostPool.close` unpins, unmaps and unlinks the segment. Never call it
while views of the segment may still be used — in this process (``view()`` results,
``torch.frombuffer`` tensors: they would dangle and read garbage) — workers' own
mappings stay valid after the unlink, the memory is freed when the last one goes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import heapq
import importlib.util
import logging
import mmap
import re
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import shared_memory

from diffmesh.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from diffmesh.shm import pool_segment_name

from diffmesh_instance_manager.host import HostBlock
from diffmesh_instance_manager.size_classes import BLOCK_GRANULARITY, SizeClass
from diffmesh_instance_manager.stale_shm import list_matching, remove_matching

log = logging.getLogger(__name__)

_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux ≥ 5.14


def pool_pattern(node_id: str) -> re.Pattern[str]:
    """The names of ``node_id``'s pool segments (``dm_<node_id>_pool_<8 hex>``)."""
    return re.compile(rf"{re.escape(pool_segment_name(node_id))}_[0-9a-f]{{8}}")


def list_pools(node_id: str) -> list[str]:
    """Names of ``node_id``'s pool segments under /dev/shm."""
    return list_matching(pool_pattern(node_id))


def remove_stale_pools(node_id: str) -> list[str]:
    """Unlinks pool segments that a crashed instance manager of ``node_id`` left behind."""
    return remove_matching(pool_pattern(node_id))


class PoolExhausted(ResourceExhausted):
    """No free block fits; ``classes`` are the indexes of the classes that would (evict from them)."""

    def __init__(self, nbytes: int, classes: list[int], retry_after_s: float = 1.0) -> None:
        super().__init__(f"HOST pool has no free block for {nbytes} bytes", retry_after_s)
        self.nbytes = nbytes
        self.classes = classes


@dataclass(frozen=True)
class PoolBlock(HostBlock):
    """A block handed out by the pool: a ``host.HostBlock`` (``offset`` from the segment start,
    ``length`` = bytes requested ≤ ``block_size``) plus its class."""

    block_size: int
    class_index: int


@dataclass(frozen=True)
class ClassStats:
    """Occupancy of one size class."""

    block_size: int
    blocks: int
    used: int
    used_bytes: int
    """Bytes requested by the blocks in use."""

    @property
    def free(self) -> int:
        """Free blocks."""
        return self.blocks - self.used

    @property
    def wasted_bytes(self) -> int:
        """Internal fragmentation: block bytes in use minus bytes requested."""
        return self.used * self.block_size - self.used_bytes


@dataclass(frozen=True)
class PoolStats:
    """Occupancy of the whole pool."""

    segment: str
    capacity_bytes: int
    classes: list[ClassStats]
    pinned: bool

    @property
    def allocated_bytes(self) -> int:
        """Block bytes handed out."""
        return sum(c.used * c.block_size for c in self.classes)

    @property
    def used_bytes(self) -> int:
        """Bytes requested by the blocks handed out."""
        return sum(c.used_bytes for c in self.classes)

    @property
    def fragmentation(self) -> float:
        """Internal fragmentation: wasted bytes / allocated bytes (0.0 when nothing is allocated)."""
        allocated = self.allocated_bytes
        return (allocated - self.used_bytes) / allocated if allocated else 0.0


def plan_slabs(capacity_bytes: int, classes: Sequence[SizeClass]) -> list[int]:
    """Blocks per class for a pool of at most ``capacity_bytes``, split ∝ weight x block size.

    Every class with a non-zero share gets at least one block when the capacity allows;
    the remainder left by rounding down is filled greedily with blocks of the classes
    furthest below their share (ties: larger blocks first).
    """
    if not classes:
        raise ValueError("the pool needs at least one size class")
    demand = [max(c.weight, 0.0) * c.block_size for c in classes]
    total = sum(demand)
    if total <= 0:
        demand = [float(c.block_size) for c in classes]
        total = sum(demand)
    shares = [capacity_bytes * d / total for d in demand]
    sizes = [c.block_size for c in classes]
    counts = [0] * len(classes)
    left = capacity_bytes
    # One block for every class first (smallest first: they are cheapest to satisfy).
    for i in sorted(range(len(classes)), key=lambda i: sizes[i]):
        if demand[i] > 0 and sizes[i] <= left:
            counts[i] = 1
            left -= sizes[i]
    # Then each class up to its share, most-demanded first…
    for i in sorted(range(len(classes)), key=lambda i: -shares[i]):
        add = min(max(0, int(shares[i] // sizes[i]) - counts[i]), left // sizes[i])
        counts[i] += add
        left -= add * sizes[i]
    # …and the remainder to whichever fitting class falls furthest short of its share.
    while fitting := [i for i in range(len(classes)) if sizes[i] <= left]:
        i = min(fitting, key=lambda i: (counts[i] * sizes[i] - shares[i], -sizes[i]))
        counts[i] += 1
        left -= sizes[i]
    return counts


class HostPool:
    """One pre-allocated shared-memory segment of fixed-size blocks in size-class slabs.

    Thread-safe. ``pin``: None = ``cudaHostRegister`` when torch with CUDA is importable,
    True = require it (raises when it fails), False = never. ``prefault`` touches every
    page at creation so that later loads do not allocate memory.
    """

    def __init__(
        self,
        node_id: str,
        capacity_bytes: int,
        classes: Sequence[SizeClass],
        *,
        prefault: bool = True,
        pin: bool | None = None,
    ) -> None:
        if capacity_bytes <= 0:
            raise InvalidArgument("host_capacity_bytes", f"must be > 0, got {capacity_bytes}")
        for c in classes:
            if c.block_size <= 0 or c.block_size % BLOCK_GRANULARITY:
                raise InvalidArgument(
                    "size_classes", f"block size {c.block_size} is not a positive multiple of {BLOCK_GRANULARITY}"
                )
        order = sorted(range(len(classes)), key=lambda i: classes[i].block_size)
        self.classes: list[SizeClass] = [classes[i] for i in order]
        counts = plan_slabs(capacity_bytes, self.classes)
        if sum(counts) == 0:
            smallest = self.classes[0].block_size
            problem = f"{capacity_bytes} bytes hold no block of the smallest class ({smallest} bytes)"
            raise InvalidArgument("host_capacity_bytes", problem)
        self._counts = counts
        self._starts: list[int] = []
        offset = 0
        for n, c in zip(counts, self.classes, strict=True):
            self._starts.append(offset)
            offset += n * c.block_size
        self.size = offset
        self._free: list[list[int]] = [list(range(n)) for n in counts]  # min-heaps of block indexes
        self._used: list[dict[int, int]] = [{} for _ in counts]  # block index → bytes requested
        self._lock = threading.Lock()
        self._pinned = False
        self._closed = False
        name = f"{pool_segment_name(node_id)}_{uuid.uuid4().hex[:8]}"
        self._shm = shared_memory.SharedMemory(name=name, create=True, size=self.size)
        self.segment = self._shm.name.lstrip("/")
        try:
            if prefault:
                self._prefault()
            if pin is not False:
                self._pinned = self._pin(required=pin is True)
        except BaseException:
            self._shm.close()
            self._shm.unlink()
            raise

    # -- blocks -------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        """Bytes of the segment (the sum of all slabs)."""
        return self.size

    def fitting_classes(self, nbytes: int) -> list[int]:
        """Indexes of the classes whose blocks hold ``nbytes``, smallest first."""
        return [i for i, c in enumerate(self.classes) if c.block_size >= nbytes and self._counts[i] > 0]

    def allocate(self, nbytes: int) -> PoolBlock:
        """A block of the smallest fitting class with a free block.

        Raises :class:`PoolExhausted` (RESOURCE_EXHAUSTED) when every fitting class is
        full — evict from ``exc.classes`` and retry — and ``FailedPrecondition`` when
        ``nbytes`` exceeds the largest block.
        """
        if nbytes <= 0:
            raise InvalidArgument("nbytes", f"must be > 0, got {nbytes}")
        fitting = self.fitting_classes(nbytes)
        if not fitting:
            largest = max(c.block_size for c, n in zip(self.classes, self._counts, strict=True) if n)
            raise FailedPrecondition(f"{nbytes} bytes do not fit the HOST pool's largest block ({largest} bytes)")
        with self._lock:
            if self._closed:
                raise FailedPrecondition("the HOST pool is closed")
            for i in fitting:
                if self._free[i]:
                    idx = heapq.heappop(self._free[i])
                    self._used[i][idx] = nbytes
                    size = self.classes[i].block_size
                    return PoolBlock(self.segment, self._starts[i] + idx * size, nbytes, size, i)
        raise PoolExhausted(nbytes, fitting)

    def free(self, block: HostBlock) -> None:
        """Returns ``block`` to its class. Raises ``ValueError`` for a block not handed out by this pool."""
        i, idx = self._locate(block)
        with self._lock:
            if idx not in self._used[i]:
                raise ValueError(f"block at offset {block.offset} of {self.segment} is not allocated")
            del self._used[i][idx]
            heapq.heappush(self._free[i], idx)

    def class_of(self, block: HostBlock) -> int:
        """The index of the size class ``block`` belongs to. Raises ``ValueError`` for a block not of this pool."""
        return self._locate(block)[0]

    def _locate(self, block: HostBlock) -> tuple[int, int]:
        if block.segment != self.segment:
            raise ValueError(f"block of segment {block.segment!r} does not belong to pool {self.segment!r}")
        for i, (start, n, c) in enumerate(zip(self._starts, self._counts, self.classes, strict=True)):
            if start <= block.offset < start + n * c.block_size:
                idx, rem = divmod(block.offset - start, c.block_size)
                if rem:
                    break
                return i, idx
        raise ValueError(f"offset {block.offset} is not a block boundary of pool {self.segment!r}")

    def view(self, block: HostBlock) -> memoryview:
        """A writable view of the block's first ``block.length`` bytes; ``release()`` it when done."""
        buf = self._shm.buf
        if buf is None or self._closed:
            raise FailedPrecondition("the HOST pool is closed")
        return buf[block.offset : block.offset + block.length]

    def block_view(self, block: PoolBlock) -> memoryview:
        """A writable view of the whole block (``block.block_size`` bytes, room for aligned reads)."""
        buf = self._shm.buf
        if buf is None or self._closed:
            raise FailedPrecondition("the HOST pool is closed")
        return buf[block.offset : block.offset + block.block_size]

    def stats(self) -> PoolStats:
        """Occupancy per class and internal fragmentation."""
        with self._lock:
            classes = [
                ClassStats(c.block_size, n, len(used), sum(used.values()))
                for c, n, used in zip(self.classes, self._counts, self._used, strict=True)
            ]
        return PoolStats(self.segment, self.size, classes, self._pinned)

    # -- lifetime -----------------------------------------------------------------

    @property
    def pinned(self) -> bool:
        """Whether the segment is registered with CUDA as pinned host memory."""
        return self._pinned

    def close(self) -> None:
        """Unpins, unmaps and unlinks the segment. Idempotent.

        Must not be called while this process still uses views of the segment (they
        would dangle); workers' mappings stay valid after the unlink.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._pinned:
            self._unpin()
        try:
            self._shm.close()
        except BufferError:
            log.warning("HOST pool %s closed while views still exist; the mapping stays until they go", self.segment)
        with contextlib.suppress(FileNotFoundError):
            self._shm.unlink()

    def __enter__(self) -> HostPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- memory -------------------------------------------------------------------

    def _address(self) -> int:
        buf = self._shm.buf
        assert buf is not None
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))

    def _prefault(self) -> None:
        mm = getattr(self._shm, "_mmap", None)
        if mm is not None:
            try:
                mm.madvise(_MADV_POPULATE_WRITE)
                return
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
        ctypes.memset(self._address(), 0, self.size)  # kernels before 5.14: touch by writing

    def _pin(self, *, required: bool) -> bool:
        if importlib.util.find_spec("torch") is None:
            if required:
                raise FailedPrecondition("pinning the HOST pool needs torch with CUDA")
            return False
        import torch  # lazily: the instance manager runs without torch

        if not torch.cuda.is_available():
            if required:
                raise FailedPrecondition("pinning the HOST pool needs CUDA, which is not available")
            return False
        rc = torch.cuda.cudart().cudaHostRegister(self._address(), self.size, 0)
        code = int(getattr(rc, "value", rc))
        if code != 0:
            if required:
                raise FailedPrecondition(f"cudaHostRegister of the HOST pool failed with CUDA error {code}")
            log.warning("cudaHostRegister of %s failed with CUDA error %d; continuing unpinned", self.segment, code)
            return False
        return True

    def _unpin(self) -> None:
        import torch

        rc = torch.cuda.cudart().cudaHostUnregister(self._address())
        code = int(getattr(rc, "value", rc))
        if code != 0:
            log.warning("cudaHostUnregister of %s failed with CUDA error %d", self.segment, code)
        self._pinned = False
