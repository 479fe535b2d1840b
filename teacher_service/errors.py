"""Errors raised below the servicer, each mapped to one gRPC status code there.

The scheduler and backends do not import grpc (strict layering); they raise these and
the servicer translates `kind` into a status code and `retry_after_s` into a hint.

Messages are bounded: a value taken from a request (a teacher name, a request id, a
shape) goes into a message through `echo`, which cuts it to `MAX_ECHO_CHARS` with a
marker, and a whole message is cut to `MAX_MESSAGE_CHARS`. gRPC carries the message in
a trailer, and a client refuses trailers over its metadata limit (8 KiB by default):
an unbounded echo would turn the error into RESOURCE_EXHAUSTED at the client.
"""

from __future__ import annotations

import enum

MAX_ECHO_CHARS = 64
MAX_MESSAGE_CHARS = 1024


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    INTERNAL = "INTERNAL"


class ServiceError(Exception):
    """A failure of one request; `message` names the field and the bound for user errors."""

    def __init__(self, kind: ErrorKind, message: str, retry_after_s: float = 0.0) -> None:
        message = truncate(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return f"ServiceError({self.kind.value}, {self.message!r})"


def truncate(text: str, limit: int) -> str:
    """`text` itself when it has at most `limit` characters, else its head and a marker
    saying how much was cut ("...[+N chars]")."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[+{len(text) - limit} chars]"


def echo(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """`repr(value)` for an error message, cut to `limit` characters (see `truncate`).

    A str or bytes is cut before repr, so a 1 MiB name costs no 1 MiB repr.
    """
    if isinstance(value, str | bytes) and len(value) > limit:
        return f"{value[:limit]!r}...[+{len(value) - limit} chars]"
    return truncate(repr(value), limit)


def invalid(message: str) -> ServiceError:
    return ServiceError(ErrorKind.INVALID_ARGUMENT, message)


def exhausted(message: str, retry_after_s: float) -> ServiceError:
    return ServiceError(ErrorKind.RESOURCE_EXHAUSTED, message, retry_after_s)


def unavailable(message: str, retry_after_s: float = 1.0) -> ServiceError:
    return ServiceError(ErrorKind.UNAVAILABLE, message, retry_after_s)


def deadline_exceeded(message: str) -> ServiceError:
    return ServiceError(ErrorKind.DEADLINE_EXCEEDED, message)


def internal(message: str) -> ServiceError:
    """A server-side failure (never a user's mistake); `message` says what failed."""
    return ServiceError(ErrorKind.INTERNAL, message)
