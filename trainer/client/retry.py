"""Which failures the teacher client retries, and how long it waits before each retry.

Backoff is exponential with "full jitter": the n-th retry waits uniform(0, min(cap,
base * 2**(n-1))). Spreading retries uniformly keeps a crowd of trainers that lost the
same replica from stampeding the survivors in lock-step. A server's retry-after hint
(RESOURCE_EXHAUSTED / UNAVAILABLE) is a floor: the server knows its backlog.
"""

from __future__ import annotations

import random

import grpc

from trainer.client.errors import AttemptFailure

# Per-request codes a retry can cure: overload, draining, a server-side deadline.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)

# Stream-level codes that say the *caller* is wrong (credentials, method, metadata):
# every request on every replica would fail the same way, so they are not retried.
FATAL_STREAM_CODES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)


def is_retryable(failure: AttemptFailure) -> bool:
    """True when another attempt (same request id, maybe another replica) may succeed."""
    if failure.connection_lost:
        return failure.code not in FATAL_STREAM_CODES
    return failure.code in RETRYABLE_CODES


def backoff_delay(
    retry: int,
    base_s: float,
    cap_s: float,
    retry_after_s: float = 0.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number `retry` (1 for the first retry).

    uniform(0, min(cap_s, base_s * 2**(retry - 1))), raised to `retry_after_s` when the
    server gave a longer hint.
    """
    if retry < 1:
        raise ValueError(f"retry must be >= 1, got {retry}")
    # min() before the power would overflow for large retry counts; cap the exponent.
    ceiling = min(cap_s, base_s * 2.0 ** min(retry - 1, 60))
    jittered = (rng or random).uniform(0.0, ceiling)
    return max(jittered, retry_after_s)
