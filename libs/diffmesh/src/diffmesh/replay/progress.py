"""A progress bar for the replay: rich's when it is installed and stderr is a terminal, else lines."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO


class ProgressBar:
    """``done/total`` requests of one policy's run, failures and requests in flight."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, every_s: float = 10.0) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.done = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._last_line = 0.0
        self._last_tenth = -1
        self._rich: Any = None
        self._task: Any = None
        if self.stream.isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            except ImportError:
                pass
            else:
                self._rich = Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[detail]}"),
                    TimeElapsedColumn(),
                    console=Console(file=self.stream),
                )
                self._rich.start()
                self._task = self._rich.add_task(label, total=total, detail="")

    def advance(self, ok: bool, in_flight: int) -> None:
        """One request answered."""
        with self._lock:
            self.done += 1
            self.failed += 0 if ok else 1
            detail = f"{self.failed} failed, {in_flight} in flight"
            if self._rich is not None:
                self._rich.update(self._task, completed=self.done, detail=detail)
                return
            now = time.monotonic()
            tenth = 10 * self.done // max(1, self.total)
            if tenth != self._last_tenth or now - self._last_line >= self.every_s:
                self._last_tenth, self._last_line = tenth, now
                print(f"[diffmesh] {self.label}: {self.done}/{self.total} answered, {detail}", file=self.stream, flush=True)

    def close(self) -> None:
        """Stops the bar."""
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
