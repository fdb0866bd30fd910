"""A TCP proxy on loopback for network-fault tests: it forwards bytes between a client and a
real HTTP server, counts the HTTP requests that pass by method and path, and can cut a
response halfway (close the connection after N body bytes) for requests whose path
matches a rule — what a dropped connection does to a transfer.

Only request heads are parsed (GET and HEAD carry no body); responses are forwarded as
bytes. One thread pair per connection; ``close`` stops everything.
"""

from __future__ import annotations

import re
import socket
import threading
from collections import Counter
from dataclasses import dataclass

_REQUEST_LINE = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (/[^ ?\r\n]*)(?:\?[^ \r\n]*)? HTTP/1\.[01]\r\n")


@dataclass
class _Rule:
    path_contains: str
    after_bytes: int
    method: str
    times: int | None  # None: every matching request
    skip: int  # matching requests let through before the first cut


class CuttingProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream``; see the module docstring."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.requests: Counter[str] = Counter()
        self.cuts = 0
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closed = threading.Event()
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def cut(
        self, path_contains: str, after_bytes: int, times: int | None = None, skip: int = 0, method: str = "GET"
    ) -> None:
        """Cuts the response of ``method`` requests whose path contains ``path_contains`` after ``after_bytes``
        bytes: ``times`` of them (None: all), after letting ``skip`` matching requests through."""
        with self._lock:
            self._rules.append(_Rule(path_contains, after_bytes, method, times, skip))

    def clear(self) -> None:
        """Drops every cut rule."""
        with self._lock:
            self._rules.clear()

    def count(self, method: str, path: str) -> int:
        """How many ``method path`` requests passed (path without the query)."""
        with self._lock:
            return self.requests[f"{method} {path}"]

    def _budget_for(self, method: str, path: str) -> int | None:
        with self._lock:
            for rule in self._rules:
                if rule.method == method and rule.path_contains in path and (rule.times is None or rule.times > 0):
                    if rule.skip > 0:
                        rule.skip -= 1
                        return None
                    if rule.times is not None:
                        rule.times -= 1
                    return rule.after_bytes
        return None

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, upstream))
            budget: list[int | None] = [None]  # response bytes left before the cut, for the current request
            threading.Thread(target=self._requests, args=(client, upstream, budget), daemon=True).start()
            threading.Thread(target=self._responses, args=(upstream, client, budget), daemon=True).start()

    def _requests(self, src: socket.socket, dst: socket.socket, budget: list[int | None]) -> None:
        pending = b""
        try:
            while data := src.recv(65536):
                pending = (pending + data)[-8192:]
                for m in _REQUEST_LINE.finditer(pending):
                    method, path = m.group(1).decode(), m.group(2).decode()
                    with self._lock:
                        self.requests[f"{method} {path}"] += 1
                    budget[0] = self._budget_for(method, path)
                if _REQUEST_LINE.search(pending):
                    pending = b""
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(dst)

    def _responses(self, src: socket.socket, dst: socket.socket, budget: list[int | None]) -> None:
        try:
            while data := src.recv(65536):
                left = budget[0]
                if left is not None and len(data) >= left:
                    dst.sendall(data[:left])
                    with self._lock:
                        self.cuts += 1
                    break
                if left is not None:
                    budget[0] = left - len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(dst)
            _shut(src)
            with self._lock:
                self._sockets.difference_update((src, dst))

    def close(self) -> None:
        """Stops accepting and closes every connection."""
        self._closed.set()
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            _shut(s)


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
