"""Fire-and-forget tasks of the store (prefetches, freeing evicted copies, index saves), kept so they can be stopped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class BackgroundTasks:
    """Tasks nobody awaits: a failure is logged, never raised; :meth:`cancel_all` stops them at shutdown."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str, component_id: str = "") -> None:
        """Runs ``coro`` in the background; a failure is logged as ``"<what> failed"``."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self.tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning(f"{what} failed", extra={"component_id": component_id, "error": str(t.exception())})

        task.add_done_callback(done)

    def cancel_all(self) -> list[asyncio.Task[Any]]:
        """Cancels every running task; returns them (to be awaited)."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        return tasks
