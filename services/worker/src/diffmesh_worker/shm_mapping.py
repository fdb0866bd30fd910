"""Zero-copy views of HOST-tier shared memory.

The instance manager keeps each component's safetensors bytes in a POSIX shared-memory
segment and hands out a :class:`~diffmesh.v1.instance_manager_pb2.HostHandle` with the
tensor index. Here the segment is mapped **read-only** (``PROT_READ``): the shared HOST copy
serves every worker of the node, so nothing in this process may ever write into it — a
stray in-place op faults instead of silently corrupting other workers' weights. Tensors
are ``torch.frombuffer`` views of that mapping; no bytes are copied.

A mapping stays valid for as long as any tensor view of it lives (the views hold the
buffer export), even if the instance manager unlinks the segment meanwhile.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import warnings
from pathlib import Path

import torch
from diffmesh.errors import DataLoss
from diffmesh.safetensors_header import SafetensorsHeaderError, torch_dtype
from diffmesh.shm import SHM_DIR
from diffmesh.v1 import instance_manager_pb2


class SegmentMapper:
    """Maps shared-memory segments read-only, one mapping per segment name, reused while alive."""

    def __init__(self, root: Path = SHM_DIR) -> None:
        self.root = root
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()

    def map(self, segment: str) -> mmap.mmap:
        """The read-only mapping of ``segment`` (mapped on first use)."""
        if not segment or "/" in segment or segment in {".", ".."}:
            raise DataLoss(f"invalid shared-memory segment name {segment!r}")
        with self._lock:
            mapped = self._maps.get(segment)
            if mapped is not None and not mapped.closed:
                return mapped
            try:
                fd = os.open(self.root / segment, os.O_RDONLY)
            except FileNotFoundError as exc:
                raise DataLoss(f"shared-memory segment {segment!r} does not exist") from exc
            try:
                size = os.fstat(fd).st_size
                if size == 0:
                    raise DataLoss(f"shared-memory segment {segment!r} is empty")
                mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            self._maps[segment] = mapped
            return mapped

    def mappings(self) -> dict[str, mmap.mmap]:
        """The live mappings by segment name."""
        with self._lock:
            return dict(self._maps)

    def forget(self, segment: str) -> None:
        """Drops this mapper's reference; the mapping itself lives on while views of it exist."""
        with self._lock:
            self._maps.pop(segment, None)

    def forget_all(self) -> None:
        """Drops every reference (at shutdown)."""
        with self._lock:
            self._maps.clear()


def tensor_view(buf: mmap.mmap, entry: instance_manager_pb2.TensorEntry, where: str) -> torch.Tensor:
    """A zero-copy tensor over ``entry``'s bytes in ``buf``; DataLoss when the index is inconsistent."""
    try:
        dtype = torch_dtype(entry.dtype)
    except SafetensorsHeaderError:
        raise DataLoss(f"{where}: tensor {entry.name!r} has unsupported dtype {entry.dtype!r}") from None
    shape = [int(d) for d in entry.shape]
    if any(d < 0 for d in shape):
        raise DataLoss(f"{where}: tensor {entry.name!r} has a negative dimension")
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if entry.length != numel * itemsize:
        raise DataLoss(
            f"{where}: tensor {entry.name!r} is {entry.length} bytes, shape {shape} {entry.dtype} needs {numel * itemsize}"
        )
    if entry.offset < 0 or entry.offset + entry.length > len(buf):
        raise DataLoss(f"{where}: tensor {entry.name!r} lies outside its segment")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # The mapping is read-only on purpose (see the module docstring); torch warns that
        # writing through the view is undefined — nothing here ever writes.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(buf, dtype=dtype, count=numel, offset=int(entry.offset))
    return flat.view(shape)


def file_state_dict(mapper: SegmentMapper, shm_file: instance_manager_pb2.ShmFile, where: str) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file of a handle, as zero-copy views."""
    buf = mapper.map(shm_file.segment)
    end = shm_file.offset + shm_file.length
    if shm_file.offset < 0 or end > len(buf):
        raise DataLoss(f"{where}: file region {shm_file.relpath!r} lies outside segment {shm_file.segment!r}")
    out: dict[str, torch.Tensor] = {}
    for entry in shm_file.tensors:
        if shm_file.length and not (shm_file.offset <= entry.offset and entry.offset + entry.length <= end):
            raise DataLoss(f"{where}: tensor {entry.name!r} lies outside file region {shm_file.relpath!r}")
        out[entry.name] = tensor_view(buf, entry, where)
    return out


def is_shared_view(tensor: torch.Tensor, buf: mmap.mmap) -> bool:
    """True when ``tensor``'s storage lies inside the mapping ``buf`` (zero-copy check)."""
    if len(buf) == 0:
        return False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        start = torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr()
    ptr = tensor.untyped_storage().data_ptr()
    return start <= ptr < start + len(buf)
