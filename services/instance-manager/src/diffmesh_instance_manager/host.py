"""HOST tier: components copied into POSIX shared memory, described by tensor indexes.

Three seams for the pooled, direct-I/O data path:

* :class:`HostAllocator` hands out blocks (segment name + offset + length). This build's
  :class:`SegmentAllocator` creates one segment per block; a pre-allocated pool with size
  classes implements the same interface.
* :class:`FileLoader` fills a block from an SSD file. :class:`BufferedLoader` uses
  ``readinto``; an ``O_DIRECT`` loader (aligned blocks, several reads in flight) plugs in
  here. File regions start on :data:`FILE_ALIGN` boundaries so such reads can land in place.
* :func:`plan_component` / :func:`materialize` split sizing (so the store can make room
  first) from copying.

Segments are named ``dm_<node_id>_<12 hex>`` and owned by this process: it unlinks them
on eviction and on stop, and removes stale ones left by a crash at start. Workers attach
read-write and must unregister the segment from Python 3.11's ``resource_tracker``.
Everything here is blocking and runs in worker threads.
"""

from __future__ import annotations

import re
import threading
import uuid
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Protocol

from diffmesh.artifacts import CONFIG_SUFFIXES, TENSOR_SUFFIX, folder_files, is_pickle_path
from diffmesh.errors import DataLoss, FailedPrecondition, InvalidArgument
from diffmesh.safetensors_header import SafetensorsHeader, SafetensorsHeaderError, read_header
from diffmesh.shm import node_prefix
from diffmesh.tiers import Tier
from diffmesh.v1 import instance_manager_pb2

from diffmesh_instance_manager.stale_shm import list_matching, remove_matching

FILE_ALIGN = 4096
READ_CHUNK = 64 * 1024 * 1024


def segment_pattern(node_id: str) -> re.Pattern[str]:
    """The names of ``node_id``'s per-component segments (``dm_<node_id>_<12 hex>``)."""
    # The exact suffix keeps node "a" from matching node "a_b"'s segments.
    return re.compile(rf"{re.escape(node_prefix(node_id))}[0-9a-f]{{12}}")


def list_segments(node_id: str) -> list[str]:
    """Names of this node's segments currently under /dev/shm."""
    return list_matching(segment_pattern(node_id))


def remove_stale_segments(node_id: str) -> list[str]:
    """Unlinks segments a crashed instance manager of ``node_id`` left behind."""
    return remove_matching(segment_pattern(node_id))


@dataclass(frozen=True)
class HostBlock:
    """A region of a shared-memory segment."""

    segment: str
    offset: int
    length: int


class HostAllocator(Protocol):
    """Hands out and takes back shared-memory blocks."""

    def allocate(self, nbytes: int) -> HostBlock:
        """A block of at least ``nbytes`` (``nbytes`` > 0)."""
        ...

    def view(self, block: HostBlock) -> memoryview:
        """A writable view of ``block``; the caller must ``release()`` it."""
        ...

    def free(self, block: HostBlock) -> None:
        """Returns ``block``."""
        ...

    def close(self) -> None:
        """Frees and unlinks everything."""
        ...


class SegmentAllocator:
    """One POSIX shared-memory segment per block."""

    def __init__(self, node_id: str) -> None:
        self.prefix = node_prefix(node_id)
        self._segments: dict[str, shared_memory.SharedMemory] = {}
        self._lock = threading.Lock()

    def allocate(self, nbytes: int) -> HostBlock:
        """Creates a segment of ``nbytes``."""
        shm = shared_memory.SharedMemory(name=f"{self.prefix}{uuid.uuid4().hex[:12]}", create=True, size=nbytes)
        with self._lock:
            self._segments[shm.name] = shm
        return HostBlock(shm.name, 0, nbytes)

    def view(self, block: HostBlock) -> memoryview:
        """A view of the block's bytes."""
        with self._lock:
            shm = self._segments[block.segment]
        buf = shm.buf
        assert buf is not None
        return buf[block.offset : block.offset + block.length]

    def free(self, block: HostBlock) -> None:
        """Closes and unlinks the block's segment (mappings workers hold stay valid)."""
        with self._lock:
            shm = self._segments.pop(block.segment, None)
        if shm is not None:
            _close_unlink(shm)

    def close(self) -> None:
        """Unlinks every segment this allocator created."""
        with self._lock:
            segments = list(self._segments.values())
            self._segments.clear()
        for shm in segments:
            _close_unlink(shm)

    def segment_names(self) -> list[str]:
        """Live segment names."""
        with self._lock:
            return sorted(self._segments)


def _close_unlink(shm: shared_memory.SharedMemory) -> None:
    try:
        shm.close()
    except BufferError:
        pass  # a copy is still writing into it; unlinking below still frees the name
    try:
        shm.unlink()  # also unregisters it from the resource tracker
    except FileNotFoundError:
        pass


class FileLoader(Protocol):
    """Copies one SSD file into a HOST block region."""

    @property
    def direct_bytes(self) -> int:
        """Bytes read with ``O_DIRECT`` so far (0 for a loader that never uses it)."""
        ...

    def read_into(self, path: Path, dest: memoryview, length: int | None = None) -> None:
        """Fills ``dest[:length]`` (default: all of it) with the first ``length`` bytes of ``path``;
        DataLoss if the file is shorter. Bytes of ``dest`` past ``length`` may be overwritten."""
        ...


class BufferedLoader:
    """Plain ``readinto`` in large chunks (the fallback where ``O_DIRECT`` is refused)."""

    direct_bytes = 0

    def read_into(self, path: Path, dest: memoryview, length: int | None = None) -> None:
        """Reads the first ``length`` bytes of the file into ``dest``."""
        with open(path, "rb", buffering=0) as f:
            pos = 0
            total = len(dest) if length is None else length
            while pos < total:
                with dest[pos : min(total, pos + READ_CHUNK)] as chunk:
                    n = f.readinto(chunk)
                if not n:
                    raise DataLoss(f"{path}: file ended after {pos} of {total} bytes while loading into shared memory")
                pos += n


@dataclass(frozen=True)
class PlannedFile:
    """A safetensors file of a component and where it goes inside the block."""

    relpath: str
    path: Path
    offset: int
    size: int
    header: SafetensorsHeader


@dataclass
class ComponentPlan:
    """Everything needed to copy a component into HOST, computed before allocating."""

    component_id: str
    files: list[PlannedFile]
    configs: list[tuple[str, bytes]]
    block_bytes: int

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data over all files."""
        return sum(f.header.data_bytes for f in self.files)


@dataclass
class HostEntry:
    """A HOST-resident component."""

    component_id: str
    kind: int
    family: str
    base_id: str
    block: HostBlock | None
    plan: ComponentPlan
    last_used: float
    loaded_seconds: float = 0.0
    transient: bool = False
    """Not cached (refused by COLD admission): freed as soon as its last lease ends."""

    @property
    def bytes(self) -> int:
        """HOST bytes the copy occupies."""
        return self.block.length if self.block else 0


def _align(n: int) -> int:
    return (n + FILE_ALIGN - 1) // FILE_ALIGN * FILE_ALIGN


def plan_component(component_id: str, root: Path, is_dir: bool, config_cap: int) -> ComponentPlan:
    """Validates every safetensors header and lays the files out in one block."""
    what = f"component {component_id!r}"
    if is_dir:
        files = folder_files(root)
        tensor_files = [(f.relative_to(root).as_posix(), f) for f in files if f.name.endswith(TENSOR_SUFFIX)]
        config_files = [(f.relative_to(root).as_posix(), f) for f in files if f.name.endswith(CONFIG_SUFFIXES)]
        for f in files:
            if is_pickle_path(f.name):
                raise InvalidArgument("uri", f"{what}: contains pickle checkpoint {f.relative_to(root).as_posix()!r}")
    else:
        tensor_files = [("", root)]
        config_files = []
    planned: list[PlannedFile] = []
    offset = 0
    for rel, path in tensor_files:
        try:
            header = read_header(path)
        except SafetensorsHeaderError as exc:
            raise DataLoss(f"{what}: {rel or path.name} is not a valid safetensors file ({exc})") from None
        planned.append(PlannedFile(rel, path, offset, header.file_size, header))
        offset = _align(offset + header.file_size)
    configs: list[tuple[str, bytes]] = []
    total_cfg = sum(p.stat().st_size for _, p in config_files)
    if total_cfg > config_cap:
        raise FailedPrecondition(
            f"{what}: config files total {total_cfg} bytes, over the inline cap of {config_cap} (DIFFMESH_IM_CONFIG_MAX_BYTES)"
        )
    for rel, path in config_files:
        configs.append((rel, path.read_bytes()))
    return ComponentPlan(component_id, planned, configs, offset)


def materialize(plan: ComponentPlan, allocator: HostAllocator, loader: FileLoader) -> HostBlock | None:
    """Allocates a block and copies every planned file into it; frees the block on failure."""
    if plan.block_bytes == 0:
        return None
    block = allocator.allocate(plan.block_bytes)
    try:
        view = allocator.view(block)
        try:
            for f in plan.files:
                # The region runs to the file's 4 KiB-aligned end (padding before the next file), so an
                # O_DIRECT loader can read the unaligned tail in place too.
                with view[f.offset : min(len(view), _align(f.offset + f.size))] as region:
                    loader.read_into(f.path, region, f.size)
        finally:
            view.release()
    except BaseException:
        allocator.free(block)
        raise
    return block


def to_handle(entry: HostEntry, source_tier: Tier, load_seconds: float) -> instance_manager_pb2.HostHandle:
    """The wire handle of a HOST entry (tensor offsets from the start of the segment)."""
    handle = instance_manager_pb2.HostHandle(
        component_id=entry.component_id,
        kind=entry.kind,  # type: ignore[arg-type]
        family=entry.family,
        source_tier=int(source_tier),  # type: ignore[arg-type]
        bytes=entry.plan.tensor_bytes,
        load_seconds=load_seconds,
        base_id=entry.base_id,
    )
    block = entry.block
    for f in entry.plan.files:
        assert block is not None
        start = block.offset + f.offset
        data = start + f.header.data_offset
        shm_file = handle.files.add(relpath=f.relpath, segment=block.segment, offset=start, length=f.size)
        shm_file.metadata.update(f.header.metadata)
        for t in f.header.tensors:
            shm_file.tensors.add(name=t.name, dtype=t.dtype, shape=list(t.shape), offset=data + t.begin, length=t.nbytes)
    for rel, content in entry.plan.configs:
        handle.configs.add(relpath=rel, content=content)
    return handle
