"""The replay's REMOTE tier: an HTTP server on loopback over the model folder, bandwidth-capped.

It stands for the object store production loads from. Files are served with single-range
``Range`` support (the instance manager's HTTP fetcher reads ranges in parallel and
resumes), folders as HTML index pages (how that fetcher lists a folder), ``HEAD`` with
``Content-Length``. Every file body byte passes one shared :class:`TokenBucket`, so all
concurrent fetches together get at most the configured rate, like a cluster's uplink to
its store. The server counts the file body bytes it sent (``remote_bytes`` of the replay).
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffmesh.replay.token_bucket import TokenBucket

CHUNK = 64 * 1024
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


class RangeNotSatisfiable(ValueError):
    """A ``Range`` header that names no byte of the file."""


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The inclusive ``(start, end)`` of a single-range ``Range`` header; None: the whole file.

    ``bytes=a-b``, ``bytes=a-`` and ``bytes=-n`` (the last n bytes) are understood; a
    header in another form is ignored (whole file), as RFC 9110 allows.
    """
    m = _RANGE_RE.fullmatch(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):
        n = int(m.group(2))
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return max(0, size - n), size - 1
    start = int(m.group(1))
    end = min(size - 1, int(m.group(2))) if m.group(2) else size - 1
    if start >= size or end < start:
        raise RangeNotSatisfiable(header)
    return start, end


@dataclass(frozen=True)
class StoreCounters:
    """What the store served since it started."""

    body_bytes: int = 0
    """File body bytes sent (GET, full or ranged)."""
    gets: int = 0
    """File GETs answered (a ranged read is one)."""
    heads: int = 0
    """HEAD requests answered."""

    def minus(self, earlier: StoreCounters) -> StoreCounters:
        """The counts since ``earlier``."""
        return StoreCounters(self.body_bytes - earlier.body_bytes, self.gets - earlier.gets, self.heads - earlier.heads)


class _Handler(http.server.SimpleHTTPRequestHandler):
    store: RemoteStore

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self.store._count(heads=1)
        super().do_HEAD()

    def do_GET(self) -> None:
        path = self.translate_path(self.path)
        if os.path.isdir(path) or not os.path.isfile(path):
            super().do_GET()  # index page, redirect to the slash form, or 404
            return
        size = os.path.getsize(path)
        try:
            span = parse_range(self.headers.get("Range", ""), size)
        except RangeNotSatisfiable:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = span if span is not None else (0, size - 1)
        self.send_response(206 if span is not None else 200)
        if span is not None:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(max(0, end - start + 1)))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.store._count(gets=1)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0:
                    chunk = f.read(min(CHUNK, left))
                    if not chunk:
                        break
                    self.store.bucket.take(len(chunk))
                    # Counted before the write: a client may finish reading before this thread runs again.
                    self.store._count(body_bytes=len(chunk))
                    self.wfile.write(chunk)
                    left -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


class RemoteStore:
    """The HTTP server over ``root``; ``rate`` bytes/s for all file bodies together (None: unlimited),
    with bursts of ``burst`` bytes.

    Use as a context manager or :meth:`start` / :meth:`stop`; :attr:`url` has no trailing slash.
    """

    def __init__(self, root: Path, rate: float | None = None, burst: int = 2 * CHUNK, host: str = "127.0.0.1") -> None:
        self.root = Path(root).resolve()
        self.bucket = TokenBucket(rate, burst)
        self.host = host
        self._lock = threading.Lock()
        self._counters = StoreCounters()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        if self._server is None:
            raise RuntimeError("the REMOTE store is not running")
        return f"http://{self.host}:{self._server.server_address[1]}"

    def counters(self) -> StoreCounters:
        """A snapshot of the counters."""
        with self._lock:
            return self._counters

    def _count(self, body_bytes: int = 0, gets: int = 0, heads: int = 0) -> None:
        with self._lock:
            c = self._counters
            self._counters = StoreCounters(c.body_bytes + body_bytes, c.gets + gets, c.heads + heads)

    def set_rate(self, rate: float | None) -> None:
        """Changes the bandwidth cap (bytes per second; None: unlimited)."""
        self.bucket.set_rate(rate)

    def start(self) -> RemoteStore:
        """Starts serving on a free port in a background thread."""
        handler = type("StoreHandler", (_Handler,), {"store": self})
        self._server = _Server((self.host, 0), functools.partial(handler, directory=str(self.root)))
        self._thread = threading.Thread(target=self._server.serve_forever, name="replay-remote-store", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops the server (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> RemoteStore:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
