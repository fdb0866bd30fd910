"""REMOTE tier: which artifact URIs may be read, and fetching them with sha256 verification.

Schemes: ``file://`` (or an absolute path), ``http(s)://`` (:mod:`.http_fetch`) and
``s3://`` (:mod:`.s3_fetch`), both through fsspec and read in byte ranges with resume
(:mod:`.ranged_fetch`). :class:`RemoteFetcher` picks the fetcher by scheme.

A URI is refused when it contains a ``..`` segment (INVALID_ARGUMENT, field ``uri``),
names or contains a pickle checkpoint (INVALID_ARGUMENT, field ``uri``), or lies —
symlinks followed for files, by scheme + host (bucket) + path (key) prefix for URLs —
outside ``allowed_roots`` (PERMISSION_DENIED). HTTP redirects are not followed (a
redirect could leave the allowed prefix). Everything here is blocking and runs in worker
threads.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlsplit

from diffmesh.artifacts import CHUNK, TENSOR_SUFFIX, folder_digest_from, folder_files, is_pickle_path
from diffmesh.errors import DataLoss, InvalidArgument, NotFound, PermissionDenied

if TYPE_CHECKING:
    from diffmesh_instance_manager.http_fetch import HttpFetcher
    from diffmesh_instance_manager.s3_fetch import S3Fetcher, S3Options

HTTP_SCHEMES = ("http", "https")
#: Schemes read through fsspec in ranges: a ``url`` source.
URL_SCHEMES = (*HTTP_SCHEMES, "s3")
#: Ranged reads in flight per fetched file (``DIFFMESH_IM_REMOTE_RANGES_IN_FLIGHT``).
DEFAULT_IN_FLIGHT = 4


@dataclass(frozen=True)
class Source:
    """A validated artifact location: a local ``path`` (file scheme) or a ``url`` (http/https/s3)."""

    component_id: str
    uri: str
    path: Path
    is_dir: bool
    url: str = ""


@dataclass(frozen=True)
class _UrlRoot:
    scheme: str
    netloc: str
    path: str  # ends with "/"

    def contains(self, scheme: str, netloc: str, path: str) -> bool:
        return scheme == self.scheme and netloc == self.netloc and (path + "/").startswith(self.path)


def _url_root(root: str) -> _UrlRoot | None:
    """``http(s)://host[:port]/path/`` or ``s3://bucket/prefix/`` (a bare ``s3://bucket`` allows the whole bucket)."""
    parts = urlsplit(root)
    if parts.scheme.lower() not in URL_SCHEMES or not parts.netloc:
        return None
    path = parts.path if parts.scheme.lower() == "s3" else unquote(parts.path)
    return _UrlRoot(parts.scheme.lower(), parts.netloc.lower(), path if path.endswith("/") else path + "/")


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
        self.url_roots = [u for u in (_url_root(r) for r in allowed_roots) if u is not None]

    def resolve(self, component_id: str, uri: str) -> Source:
        """The source of ``uri`` (local files are checked to exist), or the error that refuses it."""
        what = f"component {component_id!r}"
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        if scheme in URL_SCHEMES:
            return self._resolve_url(component_id, uri)
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

    def _resolve_url(self, component_id: str, uri: str) -> Source:
        what = f"component {component_id!r}"
        parts = urlsplit(uri)
        if not parts.netloc:
            raise InvalidArgument("uri", f"{what}: {uri!r} has no {'bucket' if parts.scheme.lower() == 's3' else 'host'}")
        if parts.query or parts.fragment:
            raise InvalidArgument("uri", f"{what}: {uri!r} has a query or fragment; artifact URLs must be plain paths")
        scheme, netloc = parts.scheme.lower(), parts.netloc.lower()
        # S3 keys are literal (s3fs does not percent-decode them); HTTP paths are decoded. Both spellings are checked.
        raw = parts.path if scheme == "s3" else unquote(parts.path)
        if ".." in raw.split("/") or ".." in unquote(raw).split("/"):
            raise InvalidArgument("uri", f"{what}: {uri!r} contains a '..' segment")
        if is_pickle_path(raw):
            raise InvalidArgument("uri", f"{what}: {uri!r} is a pickle checkpoint; only safetensors are loaded")
        if not any(r.contains(scheme, netloc, raw.rstrip("/")) for r in self.url_roots):
            allowed = [f"{r.scheme}://{r.netloc}{r.path}" for r in self.url_roots]
            raise PermissionDenied(f"uri of {what} ({uri}) is outside the allowed roots {allowed} (DIFFMESH_IM_ALLOWED_ROOTS)")
        is_dir = not raw.endswith(TENSOR_SUFFIX)
        return Source(component_id, uri, Path(raw), is_dir, url=uri)


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


class RemoteFetcher:
    """The fetcher of every scheme: ``file://`` here, ``http(s)://`` and ``s3://`` built on first use."""

    def __init__(self, s3: S3Options | None = None, in_flight: int = DEFAULT_IN_FLIGHT) -> None:
        self.s3_options = s3
        self.in_flight = in_flight
        self.file = FileFetcher()
        self._http: HttpFetcher | None = None
        self._s3: S3Fetcher | None = None
        self._lock = threading.Lock()

    def fetch(self, source: Source, expected_sha256: str, dest: Path) -> int:
        """Copies ``source`` to ``dest`` with the fetcher of its scheme and checks the catalog digest."""
        if not source.url:
            return self.file.fetch(source, expected_sha256, dest)
        if urlsplit(source.url).scheme.lower() == "s3":
            return self._s3_fetcher().fetch(source, expected_sha256, dest)
        return self._http_fetcher().fetch(source, expected_sha256, dest)

    def _http_fetcher(self) -> HttpFetcher:
        with self._lock:  # fetches run in several threads at once
            if self._http is None:
                from diffmesh_instance_manager.http_fetch import HttpFetcher

                self._http = HttpFetcher(in_flight=self.in_flight)
            return self._http

    def _s3_fetcher(self) -> S3Fetcher:
        with self._lock:
            if self._s3 is None:
                from diffmesh_instance_manager.s3_fetch import S3Fetcher  # s3fs/botocore: imported on first use

                self._s3 = S3Fetcher(self.s3_options, in_flight=self.in_flight)
            return self._s3


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
