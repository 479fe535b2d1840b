"""Exceptions the teacher client raises, and the internal record of a failed attempt.

Callers see four kinds of failure:
- HandshakeError: the teacher does not match the student (or is not hosted) - fix the
  configuration, never retry.
- TeacherRequestError: the server refused this request (INVALID_ARGUMENT, ...); its
  message is the server's, naming the field and the bound.
- TeacherUnavailableError: retries ran out (replicas down, queues full), or the
  server refused the credentials (UNAUTHENTICATED).
- TeacherDeadlineError: no result within ClientConfig.deadline_s.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def status_from_int(value: int) -> grpc.StatusCode:
    """The StatusCode of a google.rpc.Code number (UNKNOWN for values gRPC lacks)."""
    return _BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


class TeacherError(RuntimeError):
    """Base of every teacher-client error; `code` is the gRPC status when there is one."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class HandshakeError(TeacherError):
    """The connected teacher differs from what the student expects; says what differs."""


class TeacherRequestError(TeacherError):
    """The server rejected a request for a reason a retry cannot fix."""


class TeacherUnavailableError(TeacherError):
    """No endpoint produced a result within the retry budget."""


class TeacherDeadlineError(TeacherError, TimeoutError):
    """The request's deadline passed before any attempt produced a result."""


@dataclass(frozen=True)
class AttemptFailure:
    """Why one attempt of one request did not produce a result.

    `connection_lost` means the stream broke before the answer arrived (the server may
    or may not have scored it; a retry with the same request id is safe either way).
    """

    code: grpc.StatusCode
    message: str
    retry_after_s: float = 0.0
    connection_lost: bool = False

    def describe(self) -> str:
        what = "connection lost" if self.connection_lost else self.code.name
        return f"{what}: {self.message}" if self.message else what


class StreamBroken(Exception):
    """Raised to a request's waiter when the stream carrying it ended; holds the cause."""

    def __init__(self, failure: AttemptFailure) -> None:
        super().__init__(failure.describe())
        self.failure = failure
