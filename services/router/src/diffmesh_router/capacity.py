"""Waking requests that wait for room when every worker's queue was full."""

from __future__ import annotations

import asyncio
import contextlib


class CapacitySignal:
    """Notified whenever room may have appeared: a request this router sent ended, or a worker reported its load."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Wakes every current waiter (later waiters wait for the next notification)."""
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> bool:
        """Waits for the next notification; False after ``timeout`` seconds without one."""
        event = self._event
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), max(0.0, timeout))
            return True
        return False
