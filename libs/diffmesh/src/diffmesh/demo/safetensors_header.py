"""Make a safetensors file's header byte-reproducible.

safetensors writes ``__metadata__`` from a hash map, so a file with more than one
metadata entry (a LoRA with adapter metadata) gets a different key order, and so a
different sha256, in every process. The header is re-written with sorted keys; tensor
offsets are relative to the data section and do not change.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

_LEN = struct.Struct("<Q")


def canonicalize_header(path: Path) -> None:
    """Rewrite ``path``'s JSON header with sorted keys (space-padded to 8 bytes), in place."""
    with open(path, "r+b") as f:
        (size,) = _LEN.unpack(f.read(_LEN.size))
        header = json.loads(f.read(size))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(canonical) <= size:
            # Same room as before: overwrite the header only, padding with spaces.
            f.seek(_LEN.size)
            f.write(canonical.ljust(size, b" "))
            return
        data = f.read()
    padded = canonical.ljust(-(-len(canonical) // 8) * 8, b" ")
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as out:
        out.write(_LEN.pack(len(padded)) + padded + data)
    os.replace(tmp, path)
