"""Log hygiene against clients: bounded lines, rate-limited refusals.

Any user of the ``alloc`` and ``free`` files can make the daemon log: a 4 KiB
write must not become a 4 KiB line, and a loop of refused writes must not
become a flood of warnings.  Like the kernel's ``printk_ratelimit()`` (a
burst of 10 per 5 seconds per call site, then "callbacks suppressed"), each
place that logs a warning a client can cause gets a token bucket; what the
bucket drops is counted and the count rides on the next line let through.

One filter on the daemon's stderr handler does both, so it covers the core
and the fusefs boundary alike (fusefs imports nothing from cmad).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

MAX_LINE = 1024  # characters of one log message; the rest is cut with a marker
BURST = 10
INTERVAL = 5.0  # seconds to refill a whole burst


class TokenBucket:
    """``burst`` events at once, refilled at ``burst`` per ``interval`` seconds."""

    def __init__(self, burst: int = BURST, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.burst, self.interval, self.clock = burst, interval, clock
        self.tokens = float(burst)
        self.stamp = clock()
        self.missed = 0  # events refused since the last one allowed

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.burst
                          / self.interval)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.missed += 1
        return False


def caused_by_client(record: logging.LogRecord) -> bool:
    """Warnings a client can cause at will: the core marks its own
    (``extra={"client": True}``); the fusefs boundary logs a refusal that says
    something about who asked (EPERM, EACCES) at WARNING."""
    if getattr(record, "client", False):
        return True
    return record.name == "fusefs" and record.levelno == logging.WARNING


def bound(text: str, limit: int = MAX_LINE) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...(+{len(text) - limit} chars cut)"


class ClientLogFilter(logging.Filter):
    """Bounds every line; rate-limits client-caused warnings per call site; drops
    the boundary's line for a refusal the core has just warned about (its
    ``extra={"why": ...}``), so one refusal is one line."""

    def __init__(self, burst: int = BURST, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self._bucket = lambda: TokenBucket(burst, interval, clock)
        self.buckets: dict[tuple[str, int], TokenBucket] = {}
        self._warned: str | None = None  # the why of the core's last client warning

    def _repeats_a_warning(self, record: logging.LogRecord) -> bool:
        if getattr(record, "why", None):
            self._warned = record.why
            return False
        if self._warned and record.name == "fusefs" and record.getMessage().endswith(
                self._warned):
            self._warned = None
            return True
        return False

    def filter(self, record: logging.LogRecord) -> bool:
        if self._repeats_a_warning(record):
            return False
        note = ""
        if caused_by_client(record):
            site = (record.pathname, record.lineno)
            bucket = self.buckets.get(site)
            if bucket is None:
                bucket = self.buckets[site] = self._bucket()
            if not bucket.allow():
                return False
            if bucket.missed:
                note = f" ({bucket.missed} similar lines suppressed)"
                bucket.missed = 0
        message = record.getMessage()
        if note or len(message) > MAX_LINE:
            record.msg, record.args = bound(message) + note, None
        return True


def install(handlers: list[logging.Handler] | None = None) -> ClientLogFilter:
    """Put one filter on the root logger's handlers (the daemon's stderr), once."""
    log_filter = ClientLogFilter()
    for handler in handlers if handlers is not None else logging.getLogger().handlers:
        if not any(isinstance(f, ClientLogFilter) for f in handler.filters):
            handler.addFilter(log_filter)
    return log_filter
