"""REMOTE over ``http(s)://`` through fsspec: ``Range`` requests with resume (see :mod:`.ranged_fetch`).

The size comes from a ``HEAD`` request; redirects are refused (a redirect could leave the
allowed URL prefix); a server that ignores ``Range`` (answers the whole file) is detected
by the body length and refused; folders are walked through the server's HTML index pages,
at most :data:`MAX_DEPTH` levels deep.
"""

from __future__ import annotations

from urllib.parse import unquote

from diffmesh.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable

from diffmesh_instance_manager.fetch_common import Source
from diffmesh_instance_manager.fetch_options import DEFAULT_IN_FLIGHT
from diffmesh_instance_manager.ranged_fetch import (
    BASE_TRANSPORT_ERRORS,
    DEFAULT_CHUNK,
    DEFAULT_RETRIES,
    MAX_FILES,
    RangedFetcher,
)

MAX_DEPTH = 8


class HttpFetcher(RangedFetcher):
    """``http(s)://`` fetcher: ranged reads with resume, sha256 while streaming."""

    label = "HTTP"

    def __init__(self, chunk: int = DEFAULT_CHUNK, retries: int = DEFAULT_RETRIES, in_flight: int = DEFAULT_IN_FLIGHT) -> None:
        import aiohttp
        import fsspec

        super().__init__(chunk, retries, in_flight)
        # fsspec's HTTP filesystem is aiohttp: connection, payload and status errors are aiohttp.ClientError;
        # timeouts are TimeoutError (fsspec's FSTimeoutError too), an OSError.
        self.transport_errors = (*BASE_TRANSPORT_ERRORS, aiohttp.ClientError)
        # No redirects: a redirect could leave the allowed URL prefix.
        self.fs = fsspec.filesystem("http", allow_redirects=False, skip_instance_cache=True)

    def list_folder(self, source: Source, base: str) -> list[str]:
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
            except self.transport_errors as exc:
                raise Unavailable(f"{what}: listing {url} failed: {exc}") from None
            for item in listing:
                name = str(item["name"])
                if not name.startswith(base) or name == base:
                    continue  # links out of the folder (parent, other hosts) are not part of it
                rel = unquote(name[len(base) :]).rstrip("/")
                if not rel or ".." in rel.split("/"):
                    continue
                if item.get("type") == "directory":
                    if depth + 1 > MAX_DEPTH:
                        raise InvalidArgument("uri", f"{what}: folder {source.uri!r} is nested deeper than {MAX_DEPTH}")
                    pending.append((name if name.endswith("/") else name + "/", depth + 1))
                    continue
                out.append(rel)
                if len(out) > MAX_FILES:
                    raise InvalidArgument("uri", f"{what}: folder {source.uri!r} holds more than {MAX_FILES} files")
        return out

    def size(self, what: str, url: str) -> int:
        """The file's size from a HEAD request (no redirects, no compression)."""
        from fsspec.asyn import sync

        async def head() -> tuple[int, str | None]:
            session = await self.fs.set_session()
            async with session.head(url, allow_redirects=False, headers={"Accept-Encoding": "identity"}) as r:
                return r.status, r.headers.get("Content-Length")

        try:
            status, length = sync(self.fs.loop, head)
        except self.transport_errors as exc:
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

    def read_range(self, url: str, start: int, end: int) -> bytes:
        """One ``Range`` GET."""
        return bytes(self.fs.cat_file(url, start=start, end=end))
