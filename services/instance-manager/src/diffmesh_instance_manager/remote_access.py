"""Which artifact URIs the REMOTE tier may read: a URI becomes a validated :class:`Source`.

Schemes: ``file://`` (or an absolute path), ``http(s)://`` and ``s3://``; fetching is
elsewhere (:mod:`.fetchers` picks the fetcher of a source's scheme).

A URI is refused when it contains a ``..`` segment (INVALID_ARGUMENT, field ``uri``),
names or contains a pickle checkpoint (INVALID_ARGUMENT, field ``uri``), or lies —
symlinks followed for files, by scheme + host (bucket) + path (key) prefix for URLs —
outside ``allowed_roots`` (PERMISSION_DENIED). Blocking (it looks at the filesystem):
run it in a worker thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from diffmesh.artifacts import TENSOR_SUFFIX, folder_files, is_pickle_path
from diffmesh.errors import InvalidArgument, NotFound, PermissionDenied

from diffmesh_instance_manager.fetch_common import Source

HTTP_SCHEMES = ("http", "https")
#: Schemes read through fsspec in ranges: a ``url`` source.
URL_SCHEMES = (*HTTP_SCHEMES, "s3")


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
