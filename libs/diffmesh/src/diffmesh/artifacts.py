"""Artifact formats and digests (torch-free).

A component artifact is one ``.safetensors`` file or a diffusers folder of safetensors
files plus small JSON/text configs. Pickle checkpoints are refused everywhere: loading
them executes code. The digest of a folder is the sha256 of its sorted
``relpath\\tsha256\\n`` lines, so it does not depend on file system order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
CONFIG_SUFFIXES = (".json", ".txt", ".model")
TENSOR_SUFFIX = ".safetensors"
CHUNK = 8 * 1024 * 1024


def is_pickle_path(path: str) -> bool:
    """True when ``path`` names a pickle checkpoint format."""
    return path.lower().rstrip("/").endswith(PICKLE_SUFFIXES)


def file_sha256(path: Path) -> str:
    """Hex sha256 of one file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def folder_files(root: Path) -> list[Path]:
    """Regular files under ``root``, sorted by relative path (hidden files skipped)."""
    return sorted(
        (p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def folder_digest_from(entries: list[tuple[str, str]]) -> str:
    """Folder digest from ``(relpath, file_sha256)`` pairs."""
    h = hashlib.sha256()
    for rel, digest in sorted(entries):
        h.update(f"{rel}\t{digest}\n".encode())
    return h.hexdigest()


def artifact_sha256(path: Path) -> str:
    """Digest of a file or folder artifact."""
    if path.is_dir():
        return folder_digest_from([(p.relative_to(path).as_posix(), file_sha256(p)) for p in folder_files(path)])
    return file_sha256(path)


def artifact_bytes(path: Path) -> int:
    """Total size of a file or folder artifact."""
    if path.is_dir():
        return sum(p.stat().st_size for p in folder_files(path))
    return path.stat().st_size
