"""REMOTE over ``file://`` (or an absolute path): a hashed, fsynced copy."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from diffmesh.artifacts import CHUNK, folder_files

from diffmesh_instance_manager.fetch_common import Source, check_digest, copy_folder


class FileFetcher:
    """``file://`` fetcher: a hashed, fsynced copy."""

    def fetch(self, source: Source, expected_sha256: str, dest: Path) -> int:
        """Copies ``source`` to ``dest`` and checks the catalog digest."""
        if source.is_dir:
            rels = [f.relative_to(source.path).as_posix() for f in folder_files(source.path)]
            got, total = copy_folder(dest, rels, lambda rel, out: _copy_hashed(source.path / rel, out))
        else:
            got, total = _copy_hashed(source.path, dest)
        check_digest(source, expected_sha256, got)
        return total


def _copy_hashed(src: Path, dst: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            h.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest(), size
