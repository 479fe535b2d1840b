"""Backend health: when a teacher backend can no longer serve, so probes can say so.

A backend reports `dead_reason()`: None while it can serve, else one line saying why
not. The server fails liveness (HTTP /healthz), readiness (/readyz) and the gRPC health
service with that line, so Kubernetes restarts the pod instead of leaving it Ready
while every request gets INTERNAL.

Two causes:
  * the engine is gone (vLLM: its engine-core process died; see `VllmBackend`);
  * `FailureStreak`: `limit` batches in a row raised inside the backend. One failed
    batch can be a bad request the validator could not foresee; a streak means the
    device or the model is broken (CUDA errors are sticky: every later forward fails).
    A batch that succeeds ends the streak. Requests refused as the caller's mistake
    (INVALID_ARGUMENT) and cancelled batches are neither failures nor successes.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

DEFAULT_MAX_FAILED_BATCHES = 3
_MAX_ERROR_CHARS = 200  # of the last error, in the reason (probe bodies stay small)


class FailureStreak:
    """Counts backend batches that failed in a row.

    Args:
        limit: failed batches in a row after which the backend is dead (>= 1).
        backend: a word for messages ("torch", "vllm").
    """

    def __init__(self, limit: int = DEFAULT_MAX_FAILED_BATCHES, backend: str = "backend") -> None:
        if limit < 1:
            raise ValueError(f"max_failed_batches must be >= 1, got {limit}")
        self._limit = limit
        self._backend = backend
        self._count = 0
        self._last = ""
        self._lock = threading.Lock()  # updated from the event loop and executor threads

    @property
    def count(self) -> int:
        return self._count

    def succeeded(self) -> None:
        with self._lock:
            if self._count >= self._limit:
                log.warning(
                    "%s backend scored a batch again after %d failures", self._backend, self._count
                )
            self._count = 0

    def failed(self, error: BaseException) -> None:
        with self._lock:
            self._count += 1
            self._last = f"{type(error).__name__}: {error}"[:_MAX_ERROR_CHARS]
            if self._count == self._limit:
                log.error(
                    "%s backend: %d batches in a row failed (last: %s); reporting unhealthy",
                    self._backend,
                    self._count,
                    self._last,
                )

    def reason(self) -> str | None:
        """None below the limit, else what failed."""
        with self._lock:
            if self._count < self._limit:
                return None
            return (
                f"{self._backend} backend: {self._count} batches in a row failed "
                f"(limit {self._limit}); last error: {self._last}"
            )
