"""Safetensors headers (torch-free): parse and validate them, and make them byte-reproducible.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON header + the data
section. The header maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the data section) plus an optional ``__metadata__`` map of strings.

Reading: everything that would let a reader build a tensor view outside the file, or of
the wrong size, is refused with :class:`SafetensorsHeaderError` before any byte is used: a
truncated file, a header length larger than the file, malformed JSON, an unknown dtype,
offsets out of range or overlapping, and ``prod(shape) x dtype size`` differing from the
byte length.

Writing: :func:`canonicalize_header` rewrites a file's header with sorted keys, so the
same tensors and metadata always give the same bytes (and sha256).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Bytes per element of every dtype safetensors defines.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

#: The torch dtype (an attribute of the ``torch`` module) of every dtype safetensors defines.
TORCH_DTYPE_NAMES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
}

#: Header length limit (the reference implementation's limit is 100 MB as well).
MAX_HEADER_BYTES = 100 * 1024 * 1024
_PREFIX = 8


class SafetensorsHeaderError(ValueError):
    """The file is not a valid safetensors file; ``problem`` says why (e.g. ``truncated``)."""

    def __init__(self, problem: str, detail: str) -> None:
        super().__init__(f"{problem}: {detail}")
        self.problem = problem
        self.detail = detail


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of the safetensors dtype ``name`` (e.g. ``F16``); imports torch on first use.

    Raises :class:`SafetensorsHeaderError` (problem ``unknown dtype``) for a name safetensors
    does not define or this torch build lacks.
    """
    import torch

    dtype = getattr(torch, TORCH_DTYPE_NAMES.get(name, ""), None)
    if not isinstance(dtype, torch.dtype):
        raise SafetensorsHeaderError("unknown dtype", f"{name!r} is not one of {sorted(TORCH_DTYPE_NAMES)} in this torch")
    return dtype


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a header; ``begin``/``end`` are offsets from the start of the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Byte length of the tensor's data."""
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header."""

    header_len: int
    file_size: int
    tensors: list[TensorInfo] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_offset(self) -> int:
        """Offset of the data section from the start of the file."""
        return _PREFIX + self.header_len

    @property
    def data_bytes(self) -> int:
        """Sum of the tensors' byte lengths."""
        return sum(t.nbytes for t in self.tensors)


def header_length(prefix: bytes, file_size: int) -> int:
    """The header length ``N`` from the first 8 bytes, checked against ``file_size``."""
    if file_size < _PREFIX or len(prefix) < _PREFIX:
        raise SafetensorsHeaderError("truncated", f"file has {file_size} bytes, fewer than the 8-byte header length prefix")
    (n,) = struct.unpack("<Q", prefix[:_PREFIX])
    if n > file_size - _PREFIX:
        raise SafetensorsHeaderError(
            "header too long", f"header length {n} is larger than the {file_size - _PREFIX} bytes after the prefix"
        )
    if n > MAX_HEADER_BYTES:
        raise SafetensorsHeaderError("header too long", f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if n < 2:
        raise SafetensorsHeaderError("malformed header", f"header length {n} cannot hold a JSON object")
    return int(n)


def _as_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SafetensorsHeaderError("malformed header", f"{what} must be a non-negative integer, got {value!r}")
    return value


def parse_header_json(raw: bytes, header_len: int, file_size: int) -> SafetensorsHeader:
    """Validates the JSON header bytes ``raw`` of a file of ``file_size`` bytes."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsHeaderError("malformed header", f"header is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise SafetensorsHeaderError("malformed header", f"header must be a JSON object, got {type(doc).__name__}")
    data_size = file_size - _PREFIX - header_len
    metadata: dict[str, str] = {}
    tensors: list[TensorInfo] = []
    for name, entry in doc.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in entry.items()):
                raise SafetensorsHeaderError("malformed header", "__metadata__ must map strings to strings")
            metadata = dict(entry)
            continue
        if not isinstance(entry, dict):
            raise SafetensorsHeaderError("malformed header", f"tensor {name!r}: entry must be an object")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise SafetensorsHeaderError("unknown dtype", f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(DTYPE_SIZES)}")
        shape_raw = entry.get("shape")
        if not isinstance(shape_raw, list):
            raise SafetensorsHeaderError("malformed header", f"tensor {name!r}: shape must be a list")
        shape = tuple(_as_int(d, f"tensor {name!r} shape entry") for d in shape_raw)
        offsets = entry.get("data_offsets")
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise SafetensorsHeaderError("malformed header", f"tensor {name!r}: data_offsets must be [begin, end]")
        begin = _as_int(offsets[0], f"tensor {name!r} data_offsets[0]")
        end = _as_int(offsets[1], f"tensor {name!r} data_offsets[1]")
        if begin > end or end > data_size:
            raise SafetensorsHeaderError(
                "offsets out of range",
                f"tensor {name!r}: data_offsets [{begin}, {end}] outside the {data_size}-byte data section",
            )
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if expected != end - begin:
            raise SafetensorsHeaderError(
                "size mismatch",
                f"tensor {name!r}: shape {list(shape)} x {dtype} is {expected} bytes but data_offsets span {end - begin}",
            )
        tensors.append(TensorInfo(name, dtype, shape, begin, end))
    tensors.sort(key=lambda t: (t.begin, t.end))
    for prev, cur in itertools.pairwise(tensors):
        if cur.begin < prev.end:
            raise SafetensorsHeaderError(
                "overlapping offsets",
                f"tensors {prev.name!r} [{prev.begin}, {prev.end}] and {cur.name!r} [{cur.begin}, {cur.end}] overlap",
            )
    return SafetensorsHeader(header_len=header_len, file_size=file_size, tensors=tensors, metadata=metadata)


def parse_buffer(buf: bytes | bytearray | memoryview) -> SafetensorsHeader:
    """Validates the header of a whole safetensors file held in ``buf``."""
    view = memoryview(buf)
    n = header_length(bytes(view[:_PREFIX]), len(view))
    return parse_header_json(bytes(view[_PREFIX : _PREFIX + n]), n, len(view))


def read_header(path: Path) -> SafetensorsHeader:
    """Reads and validates the header of the safetensors file at ``path`` (reads only the header)."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        n = header_length(f.read(_PREFIX), size)
        raw = f.read(n)
    if len(raw) != n:
        raise SafetensorsHeaderError("truncated", f"{path}: header shorter than its declared {n} bytes")
    return parse_header_json(raw, n, size)


def canonicalize_header(path: Path) -> None:
    """Rewrite ``path``'s JSON header with sorted keys (space-padded to 8 bytes), in place.

    safetensors writes ``__metadata__`` from a hash map, so a file with more than one
    metadata entry (a LoRA with adapter metadata) gets a different key order, and so a
    different sha256, in every process. Tensor offsets are relative to the data section
    and do not change. The file is not validated; it is one safetensors just wrote.
    """
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(_PREFIX))
        header = json.loads(f.read(size))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(canonical) <= size:
            # Same room as before: overwrite the header only, padding with spaces.
            f.seek(_PREFIX)
            f.write(canonical.ljust(size, b" "))
            return
        data = f.read()
    padded = canonical.ljust(-(-len(canonical) // 8) * 8, b" ")
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(padded)) + padded + data)
    os.replace(tmp, path)
