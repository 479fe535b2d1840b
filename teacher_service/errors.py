"""Errors raised below the servicer, each mapped to one gRPC status code there.

The scheduler and backends do not import grpc (strict layering); they raise these and
the servicer translates `kind` into a status code and `retry_after_s` into a hint.
"""

from __future__ import annotations

import enum


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
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return f"ServiceError({self.kind.value}, {self.message!r})"


def invalid(message: str) -> ServiceError:
    return ServiceError(ErrorKind.INVALID_ARGUMENT, message)


def exhausted(message: str, retry_after_s: float) -> ServiceError:
    return ServiceError(ErrorKind.RESOURCE_EXHAUSTED, message, retry_after_s)


def unavailable(message: str, retry_after_s: float = 1.0) -> ServiceError:
    return ServiceError(ErrorKind.UNAVAILABLE, message, retry_after_s)


def deadline_exceeded(message: str) -> ServiceError:
    return ServiceError(ErrorKind.DEADLINE_EXCEEDED, message)
