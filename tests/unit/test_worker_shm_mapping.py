"""The worker's zero-copy, read-only views of shared memory (real POSIX shared memory).

:func:`pack_component` lays a component artifact out in a real shared-memory segment and
describes it with a HostHandle exactly as the instance manager does (tensor offsets from
the start of the segment, the header's ``__metadata__``, inline configs). The other
``test_worker_*`` unit tests use it, so they exercise the worker without an instance manager.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffmesh.errors import DataLoss
from diffmesh.v1 import common_pb2, instance_manager_pb2
from diffmesh_worker.shm_mapping import SegmentMapper, file_state_dict, is_shared_view
from safetensors.torch import load_file, save_file

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


@pytest.fixture()
def packed() -> Iterator[Packed]:
    p = Packed()
    yield p
    p.close()


@pytest.fixture()
def tensors_file(tmp_path: Path) -> Path:
    path = tmp_path / "t.safetensors"
    save_file(
        {
            "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
            "b": torch.tensor([1.5, -2.0], dtype=torch.float16),
            "c": torch.arange(5, dtype=torch.int64),
            "empty": torch.zeros((0, 3), dtype=torch.float32),
        },
        str(path),
        metadata={"format": "pt", "note": "kept"},
    )
    return path


def test_views_equal_the_file_and_share_the_segment(packed: Packed, tensors_file: Path) -> None:
    handle = packed.pack(tensors_file, "t", common_pb2.COMPONENT_KIND_LORA)
    mapper = SegmentMapper()
    state = file_state_dict(mapper, handle.files[0], "t")
    expected = load_file(str(tensors_file))
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor)
    buf = mapper.map(handle.files[0].segment)
    assert all(is_shared_view(state[n], buf) for n in ("a", "b", "c"))
    assert dict(handle.files[0].metadata)["note"] == "kept"
    # One mapping per segment, reused.
    assert mapper.map(handle.files[0].segment) is buf and list(mapper.mappings()) == [handle.files[0].segment]


def test_mapping_is_read_only(packed: Packed, tensors_file: Path) -> None:
    handle = packed.pack(tensors_file, "t", common_pb2.COMPONENT_KIND_LORA)
    mapper = SegmentMapper()
    buf = mapper.map(handle.files[0].segment)
    with pytest.raises(TypeError):
        buf[0:1] = b"x"
    view = memoryview(buf)
    assert view.readonly
    view.release()


def test_views_outlive_the_segment_name(packed: Packed, tensors_file: Path) -> None:
    handle = packed.pack(tensors_file, "t", common_pb2.COMPONENT_KIND_LORA)
    mapper = SegmentMapper()
    state = file_state_dict(mapper, handle.files[0], "t")
    packed.close()  # the instance manager unlinks the segment
    mapper.forget_all()
    assert torch.equal(state["a"], torch.arange(12, dtype=torch.float32).reshape(3, 4))


def _broken(handle: instance_manager_pb2.HostHandle, **changes: object) -> instance_manager_pb2.ShmFile:
    shm_file = instance_manager_pb2.ShmFile()
    shm_file.CopyFrom(handle.files[0])
    for key, value in changes.items():
        setattr(shm_file.tensors[0], key, value)
    return shm_file


def test_inconsistent_index_is_data_loss(packed: Packed, tensors_file: Path) -> None:
    handle = packed.pack(tensors_file, "t", common_pb2.COMPONENT_KIND_LORA)
    mapper = SegmentMapper()
    size = len(mapper.map(handle.files[0].segment))
    cases: dict[str, dict[str, Any]] = {
        "unsupported dtype": dict(dtype="F128"),
        "needs": dict(length=handle.files[0].tensors[0].length + 4),
        "outside": dict(offset=size - 4),
    }
    for expected, change in cases.items():
        with pytest.raises(DataLoss, match=expected):
            file_state_dict(mapper, _broken(handle, **change), "t")
    with pytest.raises(DataLoss, match="does not exist"):
        mapper.map("diffmesh-no-such-segment")
    with pytest.raises(DataLoss, match="invalid"):
        mapper.map("../etc/passwd")


def test_many_dtypes_round_trip(packed: Packed, tmp_path: Path) -> None:
    values = {
        "bf16": torch.tensor([1.0, 2.5], dtype=torch.bfloat16),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([250, 3], dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "f64": torch.tensor(np.array([1e-300, 2.0])),
    }
    path = tmp_path / "d.safetensors"
    save_file(values, str(path))
    handle = packed.pack(path, "d", common_pb2.COMPONENT_KIND_LORA)
    state = file_state_dict(SegmentMapper(), handle.files[0], "d")
    assert all(torch.equal(state[k], v) for k, v in values.items())
