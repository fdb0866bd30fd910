"""Waiting on a condition instead of sleeping for a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(check: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.05) -> T:
    """Polls ``check`` until it returns something truthy and returns that value.

    Raises ``AssertionError`` naming ``what`` after ``timeout`` seconds. No timing is asserted:
    the timeout only bounds a test that would otherwise hang.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
