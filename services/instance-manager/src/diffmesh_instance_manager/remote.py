"""REMOTE tier: which artifact URIs may be read, and fetching them with sha256 verification.

Only ``file://`` URIs (or absolute paths) are served in this build; ``http(s)://`` and
``s3://`` answer UNIMPLEMENTED until the fsspec fetchers land behind :class:`Fetcher`.
A URI is refused when it contains a ``..`` segment (INVALID_ARGUMENT, field ``uri``),
names or contains a pickle checkpoint (INVALID_ARGUMENT, field ``uri``), or resolves —
symlinks followed — outside ``allowed_roots`` (PERMISSION_DENIED).
Everything here is blocking and runs in worker threads.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from diffmesh.artifacts import CHUNK, TENSOR_SUFFIX, folder_digest_from, folder_files, is_pickle_path
from diffmesh.errors import DataLoss, InvalidArgument, NotFound, PermissionDenied, Unimplemented


@dataclass(frozen=True)
class Source:
    """A validated artifact location."""

    component_id: str
    uri: str
    path: Path
    is_dir: bool


def _root_path(root: str) -> Path | None:
    if root.startswith("file://"):
        root = unquote(urlsplit(root).path)
    if not root.startswith("/"):
        return None  # URL prefixes of other schemes: for the fsspec fetchers
    return Path(os.path.realpath(root))


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class RemoteAccess:
    """Validates artifact URIs against the configured roots."""

    def __init__(self, allowed_roots: list[str]) -> None:
        self.roots = [p for p in (_root_path(r) for r in allowed_roots) if p is not None]

    def resolve(self, component_id: str, uri: str) -> Source:
        """The local source of ``uri``, or the error that refuses it."""
        what = f"component {component_id!r}"
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        if scheme in ("http", "https", "s3"):
            raise Unimplemented(f"{what}: {scheme}:// artifacts are not supported yet (file:// only)")
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise InvalidArgument(
                    "uri", f"{what}: file URI {uri!r} names host {parts.netloc!r}; only local files are allowed"
                )
            raw = unquote(parts.path)
        elif scheme == "" and uri.startswith("/"):
            raw = uri
        else:
            raise InvalidArgument("uri", f"{what}: unsupported URI {uri!r} (expected file:// with an absolute path)")
        if ".." in raw.split("/"):
            raise InvalidArgument("uri", f"{what}: {uri!r} contains a '..' segment")
        if is_pickle_path(raw):
            raise InvalidArgument("uri", f"{what}: {uri!r} is a pickle checkpoint; only safetensors are loaded")
        real = Path(os.path.realpath(raw))
        if not any(_within(real, root) for root in self.roots):
            raise PermissionDenied(
                f"uri of {what} ({uri}) is outside the allowed roots {[str(r) for r in self.roots]} (DIFFMESH_IM_ALLOWED_ROOTS)"
            )
        if not real.exists():
            raise NotFound("artifact", uri)
        if real.is_dir():
            for f in folder_files(real):
                rel = f.relative_to(real).as_posix()
                if is_pickle_path(rel):
                    raise InvalidArgument(
                        "uri", f"{what}: folder {uri!r} contains pickle checkpoint {rel!r}; only safetensors are loaded"
                    )
                target = Path(os.path.realpath(f))
                if not any(_within(target, root) for root in self.roots):
                    raise PermissionDenied(f"uri of {what}: {rel!r} inside {uri} links outside the allowed roots")
            return Source(component_id, uri, real, True)
        if not real.name.endswith(TENSOR_SUFFIX):
            raise InvalidArgument("uri", f"{what}: {uri!r} is neither a .safetensors file nor a folder")
        return Source(component_id, uri, real, False)


class Fetcher(Protocol):
    """Copies a source to ``dest`` (a temporary path) and returns the bytes written; raises DataLoss on a digest mismatch."""

    def fetch(self, source: Source, expected_sha256: str, dest: Path) -> int:
        """Blocking copy with verification; ``dest`` does not exist yet."""
        ...


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


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or create inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileFetcher:
    """``file://`` fetcher: streams the file (or every file of a folder) while hashing it."""

    def fetch(self, source: Source, expected_sha256: str, dest: Path) -> int:
        """Copies ``source`` to ``dest`` and checks the catalog digest."""
        if source.is_dir:
            dest.mkdir(parents=True)
            entries: list[tuple[str, str]] = []
            total = 0
            dirs = {dest}
            for f in folder_files(source.path):
                rel = f.relative_to(source.path).as_posix()
                out = dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                dirs.add(out.parent)
                digest, size = _copy_hashed(f, out)
                entries.append((rel, digest))
                total += size
            for d in dirs:
                fsync_dir(d)
            got = folder_digest_from(entries)
        else:
            got, total = _copy_hashed(source.path, dest)
        if got != expected_sha256.lower():
            raise DataLoss(
                f"component {source.component_id!r}: sha256 mismatch for {source.uri}: catalog has {expected_sha256}, "
                f"artifact hashes to {got}; nothing was published"
            )
        return total
