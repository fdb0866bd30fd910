"""A loopback HTTP REMOTE store for instance-manager tests: static files with single-range
``Range`` support and directory index pages, counting the GET requests of every path.
With a ``gate``, every file body waits (60 s at most) until the gate is set."""

from __future__ import annotations

import functools
import http.server
import os
import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    counts: Counter[str]
    lock: threading.Lock
    gate: threading.Event | None

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        with self.lock:
            self.counts[self.path] += 1
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            super().do_GET()
            return
        if not os.path.isfile(path):
            self.send_error(404)
            return
        size = os.path.getsize(path)
        start, end = 0, size - 1
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m:
            start = int(m.group(1))
            end = min(size - 1, int(m.group(2))) if m.group(2) else size - 1
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if self.gate is not None:
            self.gate.wait(60)
        with open(path, "rb") as f:
            f.seek(start)
            self.wfile.write(f.read(end - start + 1))


@dataclass
class RangedHttp:
    """The server's base URL, its document root and the GET requests per path."""

    url: str
    root: Path
    counts: Counter[str]
    gate: threading.Event | None = None

    def gets(self, prefix: str) -> int:
        """GET requests of files (not index pages) whose path starts with ``prefix``."""
        return sum(n for path, n in list(self.counts.items()) if path.startswith(prefix) and not path.endswith("/"))


@contextmanager
def ranged_http(root: Path, gate: threading.Event | None = None) -> Iterator[RangedHttp]:
    """Serves ``root`` on a free loopback port until the block ends (file bodies wait for ``gate`` when given)."""
    counts: Counter[str] = Counter()
    handler = type("Handler", (_Handler,), {"counts": counts, "lock": threading.Lock(), "gate": gate})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield RangedHttp(f"http://127.0.0.1:{server.server_port}", root, counts, gate)
    finally:
        if gate is not None:
            gate.set()
        server.shutdown()
        server.server_close()
