"""REMOTE tier: which artifact URIs may be read, and fetching them with sha256 verification.

Schemes: ``file://`` (or an absolute path) and ``http(s)://`` through fsspec (files are
read in ranges of :data:`HTTP_CHUNK` bytes — ``Range`` requests, so a dropped connection
resumes from where it stopped, up to :data:`HTTP_RETRIES` times per range; folders are
walked through the server's HTML index pages). ``s3://`` answers UNIMPLEMENTED: there is
no S3 in this build's test environment, so the scheme stays refused rather than shipped
untested.

A URI is refused when it contains a ``..`` segment (INVALID_ARGUMENT, field ``uri``),
names or contains a pickle checkpoint (INVALID_ARGUMENT, field ``uri``), or lies —
symlinks followed for files, by scheme + host + path prefix for URLs — outside
``allowed_roots`` (PERMISSION_DENIED). HTTP redirects are not followed (a redirect could
leave the allowed prefix). Everything here is blocking and runs in worker threads.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from diffmesh.artifacts import CHUNK, TENSOR_SUFFIX, folder_digest_from, folder_files, is_pickle_path
from diffmesh.errors import DataLoss, InvalidArgument, NotFound, PermissionDenied, Unavailable, Unimplemented

HTTP_SCHEMES = ("http", "https")
HTTP_CHUNK = 8 * 1024 * 1024
HTTP_RETRIES = 3
HTTP_MAX_FILES = 10_000
HTTP_MAX_DEPTH = 8


@dataclass(frozen=True)
class Source:
    """A validated artifact location: a local ``path`` (file scheme) or a ``url`` (http/https)."""

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
    parts = urlsplit(root)
    if parts.scheme.lower() not in HTTP_SCHEMES or not parts.netloc:
        return None
    path = unquote(parts.path)
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
        if scheme == "s3":
            raise Unimplemented(f"{what}: s3:// artifacts are not supported in this build (file:// and http(s):// only)")
        if scheme in HTTP_SCHEMES:
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
            raise InvalidArgument("uri", f"{what}: {uri!r} has no host")
        if parts.query or parts.fragment:
            raise InvalidArgument("uri", f"{what}: {uri!r} has a query or fragment; artifact URLs must be plain paths")
        raw = unquote(parts.path)
        if ".." in raw.split("/"):
            raise InvalidArgument("uri", f"{what}: {uri!r} contains a '..' segment")
        if is_pickle_path(raw):
            raise InvalidArgument("uri", f"{what}: {uri!r} is a pickle checkpoint; only safetensors are loaded")
        scheme, netloc = parts.scheme.lower(), parts.netloc.lower()
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
    """``file://`` fetcher (and dispatcher: URL sources go to :class:`HttpFetcher`)."""

    def __init__(self) -> None:
        self._http: HttpFetcher | None = None

    def fetch(self, source: Source, expected_sha256: str, dest: Path) -> int:
        """Copies ``source`` to ``dest`` and checks the catalog digest."""
        if source.url:
            if self._http is None:
                self._http = HttpFetcher()
            return self._http.fetch(source, expected_sha256, dest)
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


class HttpFetcher:
    """``http(s)://`` fetcher through fsspec: ranged reads with resume, sha256 while streaming.

    A file is read in :data:`HTTP_CHUNK`-byte ``Range`` requests; a range that fails
    (connection closed mid-body, short body, 5xx) is retried from its start up to
    :data:`HTTP_RETRIES` times, then the fetch fails with UNAVAILABLE and the caller
    deletes the partial copy. A server that ignores ``Range`` (answers the whole file) is
    detected by the body length and refused.
    """

    def __init__(self, chunk: int = HTTP_CHUNK, retries: int = HTTP_RETRIES) -> None:
        import fsspec

        self.chunk = chunk
        self.retries = retries
        # No redirects: a redirect could leave the allowed URL prefix.
        self.fs = fsspec.filesystem("http", allow_redirects=False, skip_instance_cache=True)

    def fetch(self, source: Source, expected_sha256: str, dest: Path) -> int:
        """Streams ``source.url`` (a file, or every file under a folder URL) to ``dest`` and checks the digest."""
        if source.is_dir:
            base = source.url if source.url.endswith("/") else source.url + "/"
            files = self._walk(source, base)
            if not files:
                raise NotFound("artifact", source.uri)
            dest.mkdir(parents=True)
            entries: list[tuple[str, str]] = []
            total = 0
            dirs = {dest}
            for rel in files:
                out = dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                dirs.add(out.parent)
                digest, size = self._get(source, base + rel, out)
                entries.append((rel, digest))
                total += size
            for d in dirs:
                fsync_dir(d)
            got = folder_digest_from(entries)
        else:
            got, total = self._get(source, source.url, dest)
        if got != expected_sha256.lower():
            raise DataLoss(
                f"component {source.component_id!r}: sha256 mismatch for {source.uri}: catalog has {expected_sha256}, "
                f"artifact hashes to {got}; nothing was published"
            )
        return total

    def _walk(self, source: Source, base: str) -> list[str]:
        """Relative paths of every file under ``base`` (from the server's index pages)."""
        what = f"component {source.component_id!r}"
        out: list[str] = []
        pending = [(base, 0)]
        while pending:
            url, depth = pending.pop()
            try:
                listing = self.fs.ls(url, detail=True)
            except FileNotFoundError:
                raise NotFound("artifact", source.uri) from None
            except Exception as exc:  # noqa: BLE001 - aiohttp/fsspec errors: the remote is unreachable
                raise Unavailable(f"{what}: listing {url} failed: {exc}") from None
            for item in listing:
                name = str(item["name"])
                if not name.startswith(base) or name == base:
                    continue  # links out of the folder (parent, other hosts) are not part of it
                rel = unquote(name[len(base) :]).rstrip("/")
                if not rel or ".." in rel.split("/"):
                    continue
                if item.get("type") == "directory":
                    if depth + 1 > HTTP_MAX_DEPTH:
                        raise InvalidArgument("uri", f"{what}: folder {source.uri!r} is nested deeper than {HTTP_MAX_DEPTH}")
                    pending.append((name if name.endswith("/") else name + "/", depth + 1))
                    continue
                if is_pickle_path(rel):
                    raise InvalidArgument(
                        "uri", f"{what}: folder {source.uri!r} contains pickle checkpoint {rel!r}; only safetensors are loaded"
                    )
                out.append(rel)
                if len(out) > HTTP_MAX_FILES:
                    raise InvalidArgument("uri", f"{what}: folder {source.uri!r} holds more than {HTTP_MAX_FILES} files")
        return sorted(set(out))

    def _size(self, what: str, url: str) -> int:
        """The file's size from a HEAD request (no redirects, no compression)."""
        from fsspec.asyn import sync

        async def head() -> tuple[int, str | None]:
            session = await self.fs.set_session()
            async with session.head(url, allow_redirects=False, headers={"Accept-Encoding": "identity"}) as r:
                return r.status, r.headers.get("Content-Length")

        try:
            status, length = sync(self.fs.loop, head)
        except Exception as exc:  # noqa: BLE001 - aiohttp errors: the remote is unreachable
            raise Unavailable(f"{what}: {url} is unreachable: {exc}") from None
        if 300 <= status < 400:
            raise PermissionDenied(f"{what}: {url} redirects (HTTP {status}); redirects are not followed")
        if status in (404, 410):
            raise NotFound("artifact", url)
        if status >= 400:
            raise Unavailable(f"{what}: {url} answered HTTP {status}")
        if length is None or not length.isdigit():
            raise Unavailable(f"{what}: {url} did not report its size (Content-Length)")
        return int(length)

    def _get(self, source: Source, url: str, dest: Path) -> tuple[str, int]:
        what = f"component {source.component_id!r}"
        size = self._size(what, url)
        h = hashlib.sha256()
        with open(dest, "wb") as fout:
            pos = 0
            while pos < size:
                end = min(size, pos + self.chunk)
                data = self._range(what, url, pos, end)
                h.update(data)
                fout.write(data)
                pos = end
            fout.flush()
            os.fsync(fout.fileno())
        return h.hexdigest(), size

    def _range(self, what: str, url: str, start: int, end: int) -> bytes:
        last: BaseException | None = None
        for _ in range(self.retries):
            try:
                data = self.fs.cat_file(url, start=start, end=end)
            except FileNotFoundError:
                raise NotFound("artifact", url) from None
            except Exception as exc:  # noqa: BLE001 - retried: connection dropped, short body, 5xx
                last = exc
                continue
            if len(data) == end - start:
                return bytes(data)
            if len(data) > end - start:
                raise Unavailable(f"{what}: {url} ignores HTTP Range requests (answered {len(data)} bytes for {end - start})")
            last = OSError(f"short body: {len(data)} of {end - start} bytes")
        raise Unavailable(
            f"{what}: fetching bytes {start}-{end} of {url} failed {self.retries} times ({last}); nothing was published"
        )
