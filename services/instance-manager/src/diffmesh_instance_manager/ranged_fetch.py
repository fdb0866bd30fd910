"""Streaming an object-store or web artifact to the SSD tier in byte ranges, with resume and sha256.

The shared half of the ``http(s)://`` and ``s3://`` fetchers: a file is read in
``chunk``-byte ranges, ``in_flight`` of them at once (object stores cap each connection's
bandwidth; parallel ranged reads are how a client reaches the store's), hashed and
written in order while the next ones arrive. A range that fails (connection closed
mid-body, short body, 5xx) is retried from its start up to ``retries`` times, then the
fetch fails with UNAVAILABLE and the caller deletes the partial copy, so nothing is
published. A folder is listed by
the scheme, checked (no pickle checkpoints, no ``..``, at most :data:`MAX_FILES` files;
hidden files skipped, as the catalog digest skips them) and copied file by file. The
digest is compared with the catalog's once everything is on disk.

Scheme fetchers implement :meth:`RangedFetcher.size`, :meth:`RangedFetcher.read_range`
and :meth:`RangedFetcher.list_folder`; they raise ``FileNotFoundError`` for a missing
object and ``PermissionError`` for a refused one, or a diffmesh error directly, and set
:attr:`RangedFetcher.transport_errors` to what their client library raises when the
network fails. Only those are retried and end as UNAVAILABLE; any other exception is a
bug and propagates (the server answers INTERNAL and logs it).
"""

from __future__ import annotations

import hashlib
import http.client
import os
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from diffmesh.artifacts import is_pickle_path
from diffmesh.errors import DiffmeshError, InvalidArgument, NotFound, PermissionDenied, Unavailable

from diffmesh_instance_manager.fetch_common import Source, check_digest, copy_folder
from diffmesh_instance_manager.fetch_options import DEFAULT_IN_FLIGHT

DEFAULT_CHUNK = 8 * 1024 * 1024
DEFAULT_RETRIES = 3
MAX_FILES = 10_000
#: Failures of the connection itself, whatever the client library: socket errors and
#: timeouts (``OSError``, ``TimeoutError``, ``ConnectionError``) and broken HTTP replies.
BASE_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (OSError, http.client.HTTPException)


class RangedFetcher(ABC):
    """A :class:`~diffmesh_instance_manager.fetch_common.Fetcher` for URL sources read in ranges."""

    #: Shown in errors: ``"HTTP"``, ``"S3"``.
    label = "remote"
    #: What a failed transfer raises (retried, then UNAVAILABLE); scheme fetchers add their library's errors.
    transport_errors: tuple[type[BaseException], ...] = BASE_TRANSPORT_ERRORS

    def __init__(self, chunk: int = DEFAULT_CHUNK, retries: int = DEFAULT_RETRIES, in_flight: int = DEFAULT_IN_FLIGHT) -> None:
        if chunk < 1 or retries < 1 or in_flight < 1:
            raise ValueError(f"chunk, retries and in_flight must be >= 1, got {chunk}, {retries}, {in_flight}")
        self.chunk = chunk
        self.retries = retries
        self.in_flight = in_flight

    # ---- per scheme ------------------------------------------------------------------

    @abstractmethod
    def size(self, what: str, url: str) -> int:
        """The object's size in bytes (blocking)."""

    @abstractmethod
    def read_range(self, url: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object (blocking; may return fewer on a short body)."""

    @abstractmethod
    def list_folder(self, source: Source, base: str) -> list[str]:
        """Relative paths of every object under the folder URL ``base`` (ends with ``/``)."""

    # ---- shared --------------------------------------------------------------------------

    def fetch(self, source: Source, expected_sha256: str, dest: Path) -> int:
        """Streams ``source.url`` (a file, or every file under a folder URL) to ``dest`` and checks the digest."""
        if source.is_dir:
            base = source.url if source.url.endswith("/") else source.url + "/"
            files = self._checked(source, self.list_folder(source, base))
            if not files:
                raise NotFound("artifact", source.uri)
            got, total = copy_folder(dest, files, lambda rel, out: self._get(source, base + rel, out))
        else:
            got, total = self._get(source, source.url, dest)
        check_digest(source, expected_sha256, got)
        return total

    def _checked(self, source: Source, files: list[str]) -> list[str]:
        what = f"component {source.component_id!r}"
        out: set[str] = set()
        for rel in files:
            parts = rel.split("/")
            if not rel or ".." in parts or "" in parts or any(p.startswith(".") for p in parts):
                continue  # not part of the artifact: hidden, empty or escaping names
            if is_pickle_path(rel):
                raise InvalidArgument(
                    "uri", f"{what}: folder {source.uri!r} contains pickle checkpoint {rel!r}; only safetensors are loaded"
                )
            out.add(rel)
            if len(out) > MAX_FILES:
                raise InvalidArgument("uri", f"{what}: folder {source.uri!r} holds more than {MAX_FILES} files")
        return sorted(out)

    def _get(self, source: Source, url: str, dest: Path) -> tuple[str, int]:
        """Copies one object: up to ``in_flight`` ranges are read while earlier ones are hashed and written in order."""
        what = f"component {source.component_id!r}"
        size = self.size(what, url)
        ranges = [(pos, min(size, pos + self.chunk)) for pos in range(0, size, self.chunk)]
        h = hashlib.sha256()
        with open(dest, "wb") as fout, ThreadPoolExecutor(self.in_flight, thread_name_prefix="dm-fetch") as pool:
            pending: deque[Future[bytes]] = deque()
            asked = 0
            try:
                for _ in ranges:
                    while asked < len(ranges) and len(pending) < self.in_flight:
                        pending.append(pool.submit(self._range, what, url, *ranges[asked]))
                        asked += 1
                    data = pending.popleft().result()  # a range that kept failing raises here
                    h.update(data)
                    fout.write(data)
            except BaseException:
                for later in pending:
                    later.cancel()
                raise
            fout.flush()
            os.fsync(fout.fileno())
        return h.hexdigest(), size

    def _range(self, what: str, url: str, start: int, end: int) -> bytes:
        last: BaseException | None = None
        for _ in range(self.retries):
            try:
                data = self.read_range(url, start, end)
            except DiffmeshError:
                raise
            except FileNotFoundError:
                raise NotFound("artifact", url) from None
            except PermissionError as exc:
                raise PermissionDenied(f"{what}: {self.label} refused reading {url}: {exc}") from None
            except self.transport_errors as exc:  # retried: connection dropped, short body, 5xx
                last = exc
                continue
            if len(data) == end - start:
                return bytes(data)
            if len(data) > end - start:
                raise Unavailable(f"{what}: {url} ignores range requests (answered {len(data)} bytes for {end - start})")
            last = OSError(f"short body: {len(data)} of {end - start} bytes")
        raise Unavailable(
            f"{what}: fetching bytes {start}-{end} of {url} failed {self.retries} times ({last}); nothing was published"
        )
