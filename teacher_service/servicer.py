"""The gRPC TeacherService: Info, Score and ScoreStream on top of per-teacher schedulers.

Layering: this module turns protobuf requests into validated `ScoreItem`s
(validation.py), hands them to the teacher's scheduler with the caller's identity and
deadline, and encodes results back (codec.py). It maps every `ServiceError` to its gRPC
status; anything else is a server bug, logged and reported as INTERNAL without detail.

Client identity (fairness and metrics): metadata `x-client-id` if sent, else the peer
address. Retry hints: trailing metadata `retry-after-ms` on Score, and
`RequestError.retry_after_ms` on ScoreStream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import grpc

from teacher_service.codec import encode_result
from teacher_service.errors import ErrorKind, ServiceError, invalid, unavailable
from teacher_service.metrics import Metrics
from teacher_service.types import ScoreItem, ScoreResult, TeacherMeta
from teacher_service.v1 import teacher_pb2 as pb
from teacher_service.v1 import teacher_pb2_grpc as pb_grpc
from teacher_service.validation import resolve_teacher, validate_request

log = logging.getLogger(__name__)

CLIENT_ID_KEY = "x-client-id"
RETRY_AFTER_KEY = "retry-after-ms"
MAX_CLIENT_ID_CHARS = 128

_STATUS = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


class Submitter(Protocol):
    """The part of `Scheduler` the servicer uses."""

    async def submit(
        self, item: ScoreItem, client_id: str, deadline: float | None = None
    ) -> ScoreResult: ...


@dataclass(frozen=True)
class HostedTeacher:
    """A teacher as the servicer sees it: its public description and its queue."""

    info: pb.TeacherInfo
    scheduler: Submitter


def client_id(context: grpc.aio.ServicerContext) -> str:
    """`x-client-id` metadata (truncated) if sent, else the peer address."""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_ID_KEY and isinstance(value, str) and value:
            return value[:MAX_CLIENT_ID_CHARS]
    return context.peer() or "unknown"


def call_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as an absolute time.monotonic(), or None without one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def status_code(error: ServiceError) -> grpc.StatusCode:
    return _STATUS[error.kind]


def retry_after_ms(error: ServiceError) -> int:
    """The retry hint in whole milliseconds (at least 1 when there is a hint)."""
    if error.retry_after_s <= 0:
        return 0
    return max(1, round(error.retry_after_s * 1000))


class TeacherServicer(pb_grpc.TeacherServiceServicer):
    """Implements the TeacherService RPCs; one instance serves every hosted teacher."""

    def __init__(
        self,
        teachers: Mapping[str, HostedTeacher],
        default_teacher: str,
        metrics: Metrics,
        server_version: str,
    ) -> None:
        self._teachers = dict(teachers)
        self._default = default_teacher
        self._metrics = metrics
        self._info = pb.InfoResponse(
            teachers=[t.info for t in teachers.values()],
            default_teacher=default_teacher,
            server_version=server_version,
        )
        self._draining = False
        self._inflight = 0  # sequences accepted and not yet answered
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def inflight(self) -> int:
        return self._inflight

    def begin_drain(self) -> None:
        """From now on new sequences get UNAVAILABLE; accepted ones still finish."""
        self._draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once every accepted sequence was answered, False on timeout."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, timeout_s))
        except TimeoutError:
            return False
        return True

    # -- RPCs --------------------------------------------------------------------------

    async def Info(
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.InfoResponse:
        self._metrics.requests.labels("Info", "OK").inc()
        return self._info

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        started = time.perf_counter()
        code = "OK"
        try:
            return await self.score_one(request, client_id(context), call_deadline(context))
        except ServiceError as error:
            code = status_code(error).name
            trailing: tuple[tuple[str, str], ...] = ()
            if retry_after_ms(error):
                trailing = ((RETRY_AFTER_KEY, str(retry_after_ms(error))),)
            await context.abort(status_code(error), error.message, trailing_metadata=trailing)
            raise AssertionError("unreachable: abort raises") from error
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            log.exception("Score failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (see server log)")
            raise
        finally:
            self.record("Score", code, started)

    async def ScoreStream(
        self,
        request_iterator: AsyncIterator[pb.ScoreRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ScoreStreamResponse]:
        stream = _Stream(self, client_id(context), call_deadline(context))
        self._metrics.inflight_streams.inc()
        try:
            async for response in stream.run(request_iterator):
                yield response
        finally:
            self._metrics.inflight_streams.dec()
            await stream.cancel()

    # -- shared by both scoring RPCs -----------------------------------------------------

    async def score_one(
        self, request: pb.ScoreRequest, client: str, deadline: float | None
    ) -> pb.ScoreResponse:
        """Validates, queues and encodes one sequence; raises ServiceError on refusal."""
        if self._draining:
            raise unavailable("server is draining; retry on another replica")
        name = resolve_teacher(request.teacher, self._teachers, self._default)
        teacher = self._teachers[name]
        valid = validate_request(request, teacher.info)
        self._inflight += 1
        self._idle.clear()
        try:
            result = await teacher.scheduler.submit(valid.item, client, deadline)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
        return encode_result(valid.request_id, name, result, valid.logprob_dtype)

    def record(self, method: str, code: str, started: float) -> None:
        self._metrics.requests.labels(method, code).inc()
        self._metrics.request_latency.labels(method).observe(time.perf_counter() - started)


class _Stream:
    """One ScoreStream call: reads requests, scores each in its own task, yields answers.

    Answers go out as each sequence finishes, in any order. Every task is referenced
    from `_tasks` until it ends; cancelling the call cancels them all, which removes
    their sequences from the scheduler's queue.
    """

    def __init__(self, servicer: TeacherServicer, client: str, deadline: float | None) -> None:
        self._servicer = servicer
        self._client = client
        self._deadline = deadline
        self._out: asyncio.Queue[pb.ScoreStreamResponse | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids_in_flight: set[str] = set()
        self._reader: asyncio.Task[None] | None = None

    async def run(
        self, requests: AsyncIterator[pb.ScoreRequest]
    ) -> AsyncIterator[pb.ScoreStreamResponse]:
        self._reader = asyncio.create_task(self._read(requests), name="score-stream-reader")
        while (response := await self._out.get()) is not None:
            yield response
        await self._reader  # re-raises a failed read (the call then ends with its status)

    async def cancel(self) -> None:
        pending = [t for t in (self._reader, *self._tasks) if t is not None and not t.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[pb.ScoreRequest]) -> None:
        try:
            async for request in requests:
                task = asyncio.create_task(self._one(request))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if self._tasks:
                await asyncio.gather(*list(self._tasks))
        finally:
            self._out.put_nowait(None)

    async def _one(self, request: pb.ScoreRequest) -> None:
        started = time.perf_counter()
        request_id = request.request_id
        code = "OK"
        duplicate = request_id in self._ids_in_flight
        try:
            if duplicate:
                raise invalid(f"request_id: {request_id!r} is already in flight on this stream")
            self._ids_in_flight.add(request_id)
            result = await self._servicer.score_one(request, self._client, self._deadline)
            response = pb.ScoreStreamResponse(request_id=request_id, result=result)
        except ServiceError as error:
            code = status_code(error).name
            response = pb.ScoreStreamResponse(request_id=request_id, error=_request_error(error))
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            log.exception("ScoreStream request %r failed", request_id)
            response = pb.ScoreStreamResponse(
                request_id=request_id,
                error=pb.RequestError(
                    code=grpc.StatusCode.INTERNAL.value[0], message="internal error"
                ),
            )
        finally:
            if not duplicate:
                self._ids_in_flight.discard(request_id)
            self._servicer.record("ScoreStream", code, started)
        self._out.put_nowait(response)


def _request_error(error: ServiceError) -> pb.RequestError:
    return pb.RequestError(
        code=status_code(error).value[0],
        message=error.message,
        retry_after_ms=retry_after_ms(error),
    )


def teacher_info(
    name: str,
    meta: TeacherMeta,
    max_top_k: int,
    max_query_ids: int,
    logprob_dtypes: tuple[int, ...],
) -> pb.TeacherInfo:
    """The public description of a loaded teacher."""
    return pb.TeacherInfo(
        name=name,
        model_name=meta.model_name,
        revision=meta.revision,
        vocab_size=meta.vocab_size,
        tokenizer_fingerprint=meta.tokenizer_fingerprint,
        # A top-K wider than the vocabulary means nothing; cap it there.
        max_top_k=min(max_top_k, meta.vocab_size),
        max_sequence_length=meta.max_sequence_length,
        backend=meta.backend,
        logprob_dtypes=list(logprob_dtypes),
        supports_query_ids=meta.supports_query_ids,
        max_query_ids=max_query_ids,
    )
