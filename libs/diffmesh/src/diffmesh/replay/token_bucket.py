"""A token bucket that caps a byte rate shared by every connection of the REMOTE store."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    """At most ``rate`` bytes per second on average, with bursts of up to ``burst`` bytes.

    A taker that finds too few tokens still takes them (the bucket goes into debt) and then
    sleeps until the debt is paid, so concurrent takers share the rate in arrival order and
    the long-run rate is exact. ``rate`` None: unlimited (nothing ever waits).
    """

    def __init__(
        self,
        rate: float | None,
        burst: int = 256 * 1024,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if burst < 1:
            raise ValueError(f"burst must be at least 1 byte, got {burst}")
        self._check_rate(rate)
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()

    @staticmethod
    def _check_rate(rate: float | None) -> None:
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be positive bytes per second (or None: unlimited), got {rate}")

    def set_rate(self, rate: float | None) -> None:
        """Changes the rate (None: unlimited); the bucket starts full again."""
        self._check_rate(rate)
        with self._lock:
            self.rate = rate
            self._tokens = float(self.burst)
            self._last = self._clock()

    def reserve(self, nbytes: int) -> float:
        """Takes ``nbytes`` tokens now; returns the seconds the caller must wait before sending them."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        with self._lock:
            if self.rate is None:
                return 0.0
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= nbytes
            return max(0.0, -self._tokens / self.rate)

    def take(self, nbytes: int) -> None:
        """Blocks until ``nbytes`` may be sent."""
        wait = self.reserve(nbytes)
        if wait > 0:
            self._sleep(wait)
