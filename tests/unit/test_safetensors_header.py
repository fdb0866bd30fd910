"""diffmesh.safetensors_header: valid headers parse; every kind of corruption is refused by name."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from diffmesh.safetensors_header import DTYPE_SIZES, SafetensorsHeaderError, parse_buffer, read_header, torch_dtype
from safetensors.numpy import load_file, save_file


def _write_raw(path: Path, header: Mapping[str, object] | bytes, data: bytes = b"", declared_len: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if declared_len is None else declared_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


@pytest.fixture()
def real_file(tmp_path: Path) -> Path:
    path = tmp_path / "lora.safetensors"
    save_file(
        {
            "a.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
            "b.bias": np.arange(5, dtype=np.float16),
            "c.idx": np.array([7, 8], dtype=np.int64),
        },
        str(path),
        metadata={"format": "pt", "alpha": "8"},
    )
    return path


def test_real_file_parses_with_offsets_that_address_the_tensors(real_file: Path) -> None:
    header = read_header(real_file)
    assert header.metadata == {"format": "pt", "alpha": "8"}
    assert {t.name: (t.dtype, t.shape) for t in header.tensors} == {
        "a.weight": ("F32", (3, 4)),
        "b.bias": ("F16", (5,)),
        "c.idx": ("I64", (2,)),
    }
    blob = real_file.read_bytes()
    expected = load_file(str(real_file))
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    for t in header.tensors:
        start = header.data_offset + t.begin
        arr = np.frombuffer(blob[start : start + t.nbytes], dtype=dtypes[t.dtype]).reshape(t.shape)
        np.testing.assert_array_equal(arr, expected[t.name])
    assert parse_buffer(blob) == header
    assert header.data_bytes == 12 * 4 + 5 * 2 + 2 * 8


def _problem(path: Path) -> str:
    with pytest.raises(SafetensorsHeaderError) as info:
        read_header(path)
    with pytest.raises(SafetensorsHeaderError):
        parse_buffer(path.read_bytes())
    return info.value.problem


def test_file_shorter_than_the_length_prefix_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    assert _problem(path) == "truncated"


def test_file_cut_inside_the_data_is_refused(real_file: Path) -> None:
    blob = real_file.read_bytes()
    real_file.write_bytes(blob[:-5])
    assert _problem(real_file) == "offsets out of range"


def test_header_length_larger_than_the_file(tmp_path: Path) -> None:
    path = _write_raw(
        tmp_path / "h.safetensors", {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 10_000
    )
    assert _problem(path) == "header too long"


def test_malformed_json(tmp_path: Path) -> None:
    assert _problem(_write_raw(tmp_path / "m.safetensors", b'{"x": {"dtype": ', b"\0" * 8)) == "malformed header"
    assert _problem(_write_raw(tmp_path / "l.safetensors", b"[1, 2, 3]", b"")) == "malformed header"
    bad_meta = {"__metadata__": {"alpha": 8}}
    assert _problem(_write_raw(tmp_path / "n.safetensors", bad_meta)) == "malformed header"


def test_unknown_dtype(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "d.safetensors", {"x": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16)
    assert _problem(path) == "unknown dtype"


def test_offsets_out_of_range(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "o.safetensors", {"x": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 16)
    assert _problem(path) == "offsets out of range"
    reversed_ = _write_raw(tmp_path / "r.safetensors", {"x": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}, b"\0" * 16)
    assert _problem(reversed_) == "offsets out of range"


def test_overlapping_offsets(tmp_path: Path) -> None:
    header = {
        "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    assert _problem(_write_raw(tmp_path / "v.safetensors", header, b"\0" * 12)) == "overlapping offsets"


def test_shape_times_dtype_must_equal_byte_length(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "s.safetensors", {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    assert _problem(path) == "size mismatch"
    negative = _write_raw(tmp_path / "g.safetensors", {"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8)
    assert _problem(negative) == "malformed header"


def test_torch_dtype_covers_every_safetensors_dtype_with_its_size() -> None:
    for name, size in DTYPE_SIZES.items():
        assert torch_dtype(name).itemsize == size, name
    assert str(torch_dtype("F8_E4M3")) == "torch.float8_e4m3fn"
    with pytest.raises(SafetensorsHeaderError) as err:
        torch_dtype("F128")
    assert err.value.problem == "unknown dtype"
