"""What every REMOTE fetcher shares: the validated :class:`Source`, the :class:`Fetcher`
interface, the digest check and the fsynced folder copy.

The scheme modules (:mod:`.file_fetch`, :mod:`.ranged_fetch`, :mod:`.http_fetch`,
:mod:`.s3_fetch`) import this module; it imports none of them. Everything here is
blocking and runs in worker threads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from diffmesh.artifacts import folder_digest_from
from diffmesh.errors import DataLoss


@dataclass(frozen=True)
class Source:
    """A validated artifact location: a local ``path`` (file scheme) or a ``url`` (http/https/s3)."""

    component_id: str
    uri: str
    path: Path
    is_dir: bool
    url: str = ""

    @property
    def scheme(self) -> str:
        """The URI scheme that picks the fetcher: ``file`` for a local path, else the URL's (lower case)."""
        return urlsplit(self.url).scheme.lower() if self.url else "file"


class Fetcher(Protocol):
    """Copies a source to ``dest`` (a temporary path) and returns the bytes written; raises DataLoss on a digest mismatch."""

    def fetch(self, source: Source, expected_sha256: str, dest: Path) -> int:
        """Blocking copy with verification; ``dest`` does not exist yet."""
        ...


def check_digest(source: Source, expected_sha256: str, got: str) -> None:
    """DATA_LOSS unless ``got`` is the catalog's digest."""
    if got != expected_sha256.lower():
        raise DataLoss(
            f"component {source.component_id!r}: sha256 mismatch for {source.uri}: catalog has {expected_sha256}, "
            f"artifact hashes to {got}; nothing was published"
        )


def copy_folder(dest: Path, rels: list[str], copy_one: Callable[[str, Path], tuple[str, int]]) -> tuple[str, int]:
    """Creates ``dest`` and copies every relative path into it with ``copy_one(rel, out) -> (sha256, bytes)``;
    fsyncs every folder written; returns the folder digest and the bytes copied."""
    dest.mkdir(parents=True)
    entries: list[tuple[str, str]] = []
    total = 0
    dirs = {dest}
    for rel in rels:
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        dirs.add(out.parent)
        digest, size = copy_one(rel, out)
        entries.append((rel, digest))
        total += size
    for d in dirs:
        fsync_dir(d)
    return folder_digest_from(entries), total


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or create inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
