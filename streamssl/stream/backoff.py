"""Retry shards that fail, without hammering their server or the log.

A cycled pattern source hands the same URLs out again and again; a shard URL that is dead (an HTTP server
gone, a file removed) would be retried at once every time it comes round: with every URL dead, hundreds of
curl runs a second and as many log lines. ``ShardBackoff`` keeps, per URL, how often it failed in a row and
when it may be tried again (the delay doubles from ``base_s`` up to ``max_s``); the sample stream skips a
URL that is still backing off, and when every URL it meets is failing, it waits for the first to be due
instead of spinning. ``RateLimitedLog`` caps how many lines of one kind reach the log per interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class ShardBackoff:
    """Per-URL exponential backoff of shards that failed to give a single sample.

    Args:
        base_s: delay after the first failure; doubled after each further failure in a row.
        max_s: the longest delay.
        clock: monotonic clock (injectable for tests).
    """

    def __init__(self, *, base_s: float = 1.0, max_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self._clock = clock
        self._failing: dict[str, tuple[int, float]] = {}  # url -> (failures in a row, not before)

    def failed(self, url: str) -> float:
        """Record a failure of ``url``; returns the delay before it may be tried again."""
        count = self._failing.get(url, (0, 0.0))[0] + 1
        delay = min(self.max_s, self.base_s * 2 ** (count - 1))
        self._failing[url] = (count, self._clock() + delay)
        return delay

    def succeeded(self, url: str) -> None:
        self._failing.pop(url, None)

    def wait_s(self, url: str) -> float:
        """Seconds until ``url`` may be tried (0: now)."""
        entry = self._failing.get(url)
        return max(0.0, entry[1] - self._clock()) if entry else 0.0

    def failures(self, url: str) -> int:
        return self._failing.get(url, (0, 0.0))[0]

    @property
    def n_failing(self) -> int:
        """URLs whose last read failed."""
        return len(self._failing)


class RateLimitedLog:
    """At most ``limit`` lines per ``interval_s`` reach ``logger``; the count of lines held back is told with
    the next line that passes."""

    def __init__(self, logger: logging.Logger, *, limit: int = 10, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.limit = limit
        self.interval_s = interval_s
        self._clock = clock
        self._window_start = -float("inf")
        self._in_window = 0
        self._held = 0

    def warning(self, msg: str, *args: object) -> bool:
        """Log at WARNING unless over the limit; True when it was logged."""
        now = self._clock()
        if now - self._window_start >= self.interval_s:
            self._window_start, self._in_window = now, 0
        if self._in_window >= self.limit:
            self._held += 1
            return False
        self._in_window += 1
        if self._held:
            msg, args = msg + " (%d similar lines held back)", (*args, self._held)
            self._held = 0
        self.logger.warning(msg, *args)
        return True


__all__ = ["RateLimitedLog", "ShardBackoff"]
