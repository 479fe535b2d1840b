"""The gRPC TeacherService: Info, Score and ScoreStream on top of per-teacher schedulers.

Layering: this module turns request bytes into validated `ScoreItem`s (codec.py parses,
validation.py checks), hands them to the teacher's scheduler with the caller's identity
and deadline, and encodes results back (codec.py). It maps every `ServiceError` to its
gRPC status; anything else is a server bug, logged and reported as INTERNAL without
detail. ScoreStream calls live in stream.py.

Requests reach the servicer as raw bytes: `add_to_server` registers the methods without
a protobuf deserializer, because gRPC turns a deserializer's exception into a failed
call (UNKNOWN on Score, the end of a ScoreStream) with a traceback in the log. Parsing
here makes bytes that are not a message an INVALID_ARGUMENT for that one request,
counted in the request metrics, and logged at most once a minute.

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
from typing import Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from teacher_service.codec import encode_result, parse_message
from teacher_service.errors import ErrorKind, ServiceError, unavailable
from teacher_service.log_limit import RateLimitedLog
from teacher_service.metrics import Metrics
from teacher_service.stream import ScoreStreamCall
from teacher_service.types import ScoreItem, ScoreResult, TeacherMeta
from teacher_service.v1 import teacher_pb2 as pb
from teacher_service.v1 import teacher_pb2_grpc as pb_grpc
from teacher_service.validation import ValidRequest, resolve_teacher, validate_request

log = logging.getLogger(__name__)

CLIENT_ID_KEY = "x-client-id"
RETRY_AFTER_KEY = "retry-after-ms"
MAX_CLIENT_ID_CHARS = 128
# What one ScoreStream may hold in server memory (see stream.py).
DEFAULT_MAX_STREAM_BUFFER_BYTES = 64 * 1024 * 1024

_STATUS = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}

M = TypeVar("M", bound=Message)


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
    """Implements the TeacherService RPCs; one instance serves every hosted teacher.

    Register it with `add_to_server` (raw request bytes), not the generated helper.
    Each RPC also accepts an already parsed message (in-process callers).
    """

    def __init__(
        self,
        teachers: Mapping[str, HostedTeacher],
        default_teacher: str,
        metrics: Metrics,
        server_version: str,
        max_stream_buffer_bytes: int = DEFAULT_MAX_STREAM_BUFFER_BYTES,
    ) -> None:
        if max_stream_buffer_bytes < 1:
            raise ValueError(f"max_stream_buffer_bytes must be >= 1, got {max_stream_buffer_bytes}")
        self._teachers = dict(teachers)
        self._default = default_teacher
        self._metrics = metrics
        self._max_stream_buffer = max_stream_buffer_bytes
        self._info = pb.InfoResponse(
            teachers=[t.info for t in teachers.values()],
            default_teacher=default_teacher,
            server_version=server_version,
        )
        self._draining = False
        self._inflight = 0  # sequences accepted and not yet answered
        self._idle = asyncio.Event()
        self._idle.set()
        self._limited = RateLimitedLog(log)

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def metrics(self) -> Metrics:
        return self._metrics

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
        self, request: bytes | pb.InfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.InfoResponse:
        started = time.perf_counter()
        try:
            self.parse_request(request, "Info", pb.InfoRequest)
        except ServiceError as error:
            self.record("Info", self.code_of(error), started)
            await context.abort(status_code(error), error.message)
            raise AssertionError("unreachable: abort raises") from error
        self.record("Info", "OK", started)
        return self._info

    async def Score(
        self, request: bytes | pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        started = time.perf_counter()
        try:
            parsed = self.parse_request(request, "Score")
            response = await self.score_one(parsed, client_id(context), call_deadline(context))
        except ServiceError as error:
            # Counted before abort: the client has its status as soon as abort sends it.
            self.record("Score", self.code_of(error), started)
            trailing: tuple[tuple[str, str], ...] = ()
            if retry_after_ms(error):
                trailing = ((RETRY_AFTER_KEY, str(retry_after_ms(error))),)
            await context.abort(status_code(error), error.message, trailing_metadata=trailing)
            raise AssertionError("unreachable: abort raises") from error
        except asyncio.CancelledError:
            self.record("Score", "CANCELLED", started)
            raise
        except Exception:
            self.record("Score", "INTERNAL", started)
            self.report_bug("Score")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (see server log)")
            raise
        self.record("Score", "OK", started)
        return response

    async def ScoreStream(
        self,
        request_iterator: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ScoreStreamResponse]:
        stream = ScoreStreamCall(
            self, client_id(context), call_deadline(context), self._max_stream_buffer
        )
        self._metrics.inflight_streams.inc()
        try:
            async for response in stream.run(request_iterator):
                yield response
        finally:
            self._metrics.inflight_streams.dec()
            await stream.cancel()

    # -- shared by both scoring RPCs -----------------------------------------------------

    def parse_request(
        self, raw: bytes | Message, method: str, message_type: type[M] = pb.ScoreRequest
    ) -> M:
        """`raw` as a `message_type`; unparsable bytes raise INVALID_ARGUMENT and are
        logged at most once per interval (anyone who reaches the port can send them)."""
        try:
            return parse_message(raw, message_type)  # type: ignore[arg-type]
        except ServiceError as error:
            self._limited.warning("unparsable", "%s refused: %s", method, error.message)
            raise

    def prepare(self, request: pb.ScoreRequest) -> tuple[str, ValidRequest]:
        """The teacher's name and the validated request; raises ServiceError on refusal."""
        if self._draining:
            raise unavailable("server is draining; retry on another replica")
        name = resolve_teacher(request.teacher, self._teachers, self._default)
        return name, validate_request(request, self._teachers[name].info)

    async def score_valid(
        self, name: str, valid: ValidRequest, client: str, deadline: float | None
    ) -> pb.ScoreResponse:
        """Queues one validated sequence and encodes its answer; raises ServiceError."""
        self._inflight += 1
        self._idle.clear()
        try:
            result = await self._teachers[name].scheduler.submit(valid.item, client, deadline)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
        try:
            return encode_result(valid.request_id, name, result, valid.logprob_dtype)
        except ServiceError as error:  # a non-finite log-prob: the teacher is at fault
            self._limited.error("nonfinite", "teacher %s: %s", name, error.message)
            raise

    async def score_one(
        self, request: pb.ScoreRequest, client: str, deadline: float | None
    ) -> pb.ScoreResponse:
        """Validates, queues and encodes one sequence; raises ServiceError on refusal."""
        name, valid = self.prepare(request)
        return await self.score_valid(name, valid, client, deadline)

    def code_of(self, error: ServiceError) -> str:
        """The status code's name, as the request metrics label it."""
        return status_code(error).name

    def request_error(self, error: ServiceError) -> pb.RequestError:
        return _request_error(error)

    def report_bug(self, method: str) -> None:
        """Logs the exception being handled (a server bug), with its traceback, at most
        once per interval: a bug that every request hits must not flood the log."""
        self._limited.error("bug", "%s failed (server bug)", method, exc_info=True)

    def record(self, method: str, code: str, started: float) -> None:
        self._metrics.requests.labels(method, code).inc()
        self._metrics.request_latency.labels(method).observe(time.perf_counter() - started)


def add_to_server(servicer: TeacherServicer, server: grpc.aio.Server) -> None:
    """Registers the TeacherService methods, handing each request to the servicer as
    raw bytes (no request deserializer: see the module docstring)."""
    handlers = {
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info, response_serializer=pb.InfoResponse.SerializeToString
        ),
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score, response_serializer=pb.ScoreResponse.SerializeToString
        ),
        "ScoreStream": grpc.stream_stream_rpc_method_handler(
            servicer.ScoreStream, response_serializer=pb.ScoreStreamResponse.SerializeToString
        ),
    }
    service = pb.DESCRIPTOR.services_by_name["TeacherService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


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
