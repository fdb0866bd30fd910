"""The REMOTE tier's fetcher: each source is fetched by the fetcher registered for its URI scheme.

This is the one module that knows every scheme module (:mod:`.file_fetch`,
:mod:`.http_fetch`, :mod:`.s3_fetch`); they import only the shared pieces
(:mod:`.fetch_common`, :mod:`.ranged_fetch`), so the dependencies run one way. A
scheme's fetcher is built on first use (the HTTP and S3 ones import fsspec, aiohttp,
s3fs and botocore), once, and shared by every fetch after.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from diffmesh.errors import InvalidArgument

from diffmesh_instance_manager.fetch_common import Fetcher, Source
from diffmesh_instance_manager.fetch_options import DEFAULT_IN_FLIGHT, S3Options
from diffmesh_instance_manager.file_fetch import FileFetcher
from diffmesh_instance_manager.http_fetch import HttpFetcher
from diffmesh_instance_manager.s3_fetch import S3Fetcher

FetcherFactory = Callable[[], Fetcher]


class _Slot:
    """One registered fetcher: how to build it, and the instance once built."""

    def __init__(self, factory: FetcherFactory) -> None:
        self.factory = factory
        self.fetcher: Fetcher | None = None


class SchemeFetchers:
    """A :class:`~diffmesh_instance_manager.fetch_common.Fetcher` that hands each source to its scheme's fetcher."""

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()  # fetches run in several threads at once

    def register(self, schemes: Iterable[str], factory: FetcherFactory) -> None:
        """Fetches sources of ``schemes`` with one fetcher built by ``factory`` on first use."""
        slot = _Slot(factory)
        for scheme in schemes:
            self._slots[scheme.lower()] = slot

    def fetcher_for(self, source: Source) -> Fetcher:
        """The fetcher of ``source``'s scheme (built now if this is its first use)."""
        slot = self._slots.get(source.scheme)
        if slot is None:
            raise InvalidArgument("uri", f"component {source.component_id!r}: no fetcher for scheme {source.scheme!r}")
        with self._lock:
            if slot.fetcher is None:
                slot.fetcher = slot.factory()
            return slot.fetcher

    def fetch(self, source: Source, expected_sha256: str, dest: Path) -> int:
        """Copies ``source`` to ``dest`` with the fetcher of its scheme and checks the catalog digest."""
        return self.fetcher_for(source).fetch(source, expected_sha256, dest)


def remote_fetcher(s3: S3Options | None = None, in_flight: int = DEFAULT_IN_FLIGHT) -> SchemeFetchers:
    """The fetcher of every scheme the REMOTE tier reads: ``file://``, ``http(s)://`` and ``s3://``."""
    fetchers = SchemeFetchers()
    fetchers.register(["file"], FileFetcher)
    fetchers.register(["http", "https"], lambda: HttpFetcher(in_flight=in_flight))
    fetchers.register(["s3"], lambda: S3Fetcher(s3, in_flight=in_flight))
    return fetchers
