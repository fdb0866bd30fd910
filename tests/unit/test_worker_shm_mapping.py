"""The worker's zero-copy, read-only views of shared memory (real POSIX shared memory).

Components are laid out in real segments by :class:`tests.support.shm_packing.Packed`, the way
the instance manager does it, so these tests exercise the worker without an instance manager.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffmesh.errors import DataLoss
from diffmesh.v1 import common_pb2, instance_manager_pb2
from diffmesh_worker.shm_mapping import SegmentMapper, file_state_dict, is_shared_view
from safetensors.torch import load_file, save_file

from tests.support.shm_packing import Packed


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
