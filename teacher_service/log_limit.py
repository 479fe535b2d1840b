"""Log lines that anyone reaching the port can trigger, at most one per interval.

A flood of corrupt requests (or of requests that hit a server bug) must not flood the
log: each kind of event logs its first occurrence, then nothing until `interval_s` has
passed; the next line says how many were not logged in between.

    limited = RateLimitedLog(logging.getLogger(__name__), interval_s=60.0)
    limited.warning("corrupt", "refused an unparsable request from %s: %s", peer, why)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

DEFAULT_INTERVAL_S = 60.0


class RateLimitedLog:
    """At most one record per key per `interval_s` on `logger`; the rest are counted."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: str, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Logs `msg % args` unless `key` logged within the interval; True when logged."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg += " (and %d more like it since the last such line, not logged)"
            args = (*args, suppressed)
        self._logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def error(self, key: str, msg: str, *args: object, exc_info: bool = False) -> bool:
        return self.log(logging.ERROR, key, msg, *args, exc_info=exc_info)
