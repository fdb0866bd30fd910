"""Components laid out in real POSIX shared memory the way the instance manager lays them out:
tensor offsets counted from the start of the segment (which does not start at offset 0), the
safetensors header's ``__metadata__``, configs inline. Worker unit tests map these handles, so
they exercise the worker without an instance manager."""

from __future__ import annotations

import json
import struct
from multiprocessing import shared_memory
from pathlib import Path

from diffmesh.v1 import common_pb2, instance_manager_pb2

PAD = 64  # a non-zero start, so offsets "from the start of the segment" are tested


class Packed:
    """Shared-memory segments holding packed components; unlinked by :meth:`close`."""

    def __init__(self) -> None:
        self.segments: list[shared_memory.SharedMemory] = []

    def pack(
        self, path: Path, component_id: str, kind: int, family: str = "sd15", tier: int = common_pb2.TIER_SSD
    ) -> instance_manager_pb2.HostHandle:
        """Copies ``path`` (a .safetensors file or a folder) into a new segment; returns its handle."""
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        tensors = [f for f in files if f.suffix == ".safetensors"]
        shm = shared_memory.SharedMemory(create=True, size=PAD + sum(f.stat().st_size for f in tensors))
        self.segments.append(shm)
        handle = instance_manager_pb2.HostHandle(component_id=component_id, kind=kind, family=family, source_tier=tier)  # type: ignore[arg-type]
        offset = PAD
        for f in files:
            rel = f.relative_to(path).as_posix() if path.is_dir() else ""
            data = f.read_bytes()
            if f.suffix != ".safetensors":
                handle.configs.add(relpath=rel, content=data)
                continue
            assert shm.buf is not None
            shm.buf[offset : offset + len(data)] = data
            n = struct.unpack("<Q", data[:8])[0]
            header = json.loads(data[8 : 8 + n])
            entry = handle.files.add(relpath=rel, segment=shm.name.lstrip("/"), offset=offset, length=len(data))
            entry.metadata.update(header.pop("__metadata__", None) or {})
            for name, info in header.items():
                begin, end = info["data_offsets"]
                entry.tensors.add(
                    name=name, dtype=info["dtype"], shape=info["shape"], offset=offset + 8 + n + begin, length=end - begin
                )
            handle.bytes += len(data)
            offset += len(data)
        return handle

    def close(self) -> None:
        """Unlinks every segment (live views keep their mappings until they are freed)."""
        for shm in self.segments:
            shm.unlink()
            try:
                shm.close()
            except BufferError:
                pass  # views exported from it are still alive; the memory goes with them
        self.segments.clear()
