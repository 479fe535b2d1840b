"""One ScoreStream call: reads requests, scores each in its own task, sends answers.

Answers go out as each sequence finishes, in any order, keyed by request_id. A request
that fails (bytes that are not a ScoreRequest, a field out of bounds, a full queue, a
result the codec withholds) gets a `RequestError` on the stream and the stream stays
open for the others; a frame that could not be parsed is answered with an empty
request_id, since its id is unknown.

Flow control. What one stream holds in server memory is bounded in bytes. Each request
reserves, when it is read, twice its wire size (the message and its decoded arrays) plus
the wire size of its answer; the reservation is released when gRPC has taken the answer
for sending. While a stream's reservations reach `max_buffered_bytes`, the server stops
reading that stream's requests: HTTP/2 flow control then stops the client's sends, and
a trainer that stopped reading its answers stops adding work. One stream holds at most
`max_buffered_bytes` plus one request. Other streams and other clients are unaffected.

Every task is referenced from `_tasks` until it ends; cancelling the call cancels them
all, which removes their sequences from the scheduler's queue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from teacher_service.codec import response_bytes
from teacher_service.errors import ServiceError, echo, internal, invalid
from teacher_service.v1 import teacher_pb2 as pb

if TYPE_CHECKING:
    from teacher_service.servicer import TeacherServicer
    from teacher_service.validation import ValidRequest

# Framing of an answer beyond its arrays (field tags, lengths, teacher name), and the
# reservation for an answer that is an error (its message is at most ~1 KiB).
_ANSWER_OVERHEAD = 256
_ERROR_ANSWER_BYTES = 1536


class ScoreStreamCall:
    """The server side of one ScoreStream call (see the module docstring)."""

    def __init__(
        self,
        servicer: TeacherServicer,
        client: str,
        deadline: float | None,
        max_buffered_bytes: int,
    ) -> None:
        self._servicer = servicer
        self._metrics = servicer.metrics
        self._client = client
        self._deadline = deadline
        self._limit = max_buffered_bytes
        self._out: asyncio.Queue[tuple[pb.ScoreStreamResponse, int] | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids_in_flight: set[str] = set()
        self._reader: asyncio.Task[None] | None = None
        self._buffered = 0  # bytes reserved by requests read and answers not yet sent
        self._space = asyncio.Event()
        self._space.set()

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    async def run(self, requests: AsyncIterator[bytes]) -> AsyncIterator[pb.ScoreStreamResponse]:
        """Yields the answers; ends when the client has half-closed and all are sent."""
        self._reader = asyncio.create_task(self._read(requests), name="score-stream-reader")
        while (item := await self._out.get()) is not None:
            response, cost = item
            yield response
            # gRPC asks for the next answer once this one is written: release it now.
            self._release(cost)
        await self._reader  # re-raises a failed read (the call then ends with its status)

    async def cancel(self) -> None:
        pending = [t for t in (self._reader, *self._tasks) if t is not None and not t.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._release(self._buffered)

    # -- reading --------------------------------------------------------------------

    async def _read(self, requests: AsyncIterator[bytes]) -> None:
        try:
            while True:
                await self._wait_for_space()
                try:
                    raw = await anext(requests)
                except StopAsyncIteration:
                    break
                self._accept(raw)
            if self._tasks:
                await asyncio.gather(*list(self._tasks))
        finally:
            self._out.put_nowait(None)

    async def _wait_for_space(self) -> None:
        if self._buffered < self._limit:
            return
        self._metrics.streams_paused.inc()
        try:
            while self._buffered >= self._limit:
                self._space.clear()
                await self._space.wait()
        finally:
            self._metrics.streams_paused.dec()

    def _accept(self, raw: bytes | pb.ScoreRequest) -> None:
        """Parses and validates one frame; answers a refusal at once, else starts its task."""
        started = time.perf_counter()
        request_id = ""
        try:
            request = self._servicer.parse_request(raw, "ScoreStream")
            request_id = request.request_id
            if request_id in self._ids_in_flight:
                raise invalid(f"request_id: {echo(request_id)} is already in flight on this stream")
            name, valid = self._servicer.prepare(request)
        except ServiceError as error:
            self._servicer.record("ScoreStream", self._servicer.code_of(error), started)
            self._reserve(_ERROR_ANSWER_BYTES + len(request_id))
            self._answer(self._error(request_id, error), _ERROR_ANSWER_BYTES + len(request_id))
            return
        size = len(raw) if isinstance(raw, bytes) else request.ByteSize()
        cost = 2 * size + _reserved_answer(valid)
        self._reserve(cost)
        self._ids_in_flight.add(request_id)
        task = asyncio.create_task(self._score(name, valid, cost, started))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- scoring one request ----------------------------------------------------------

    async def _score(self, name: str, valid: ValidRequest, cost: int, started: float) -> None:
        request_id = valid.request_id
        code = "OK"
        try:
            result = await self._servicer.score_valid(name, valid, self._client, self._deadline)
            response = pb.ScoreStreamResponse(request_id=request_id, result=result)
        except ServiceError as error:
            code = self._servicer.code_of(error)
            response = self._error(request_id, error)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            self._servicer.report_bug("ScoreStream")
            response = self._error(request_id, internal("internal error (see server log)"))
        finally:
            self._ids_in_flight.discard(request_id)
            self._servicer.record("ScoreStream", code, started)
        self._answer(response, cost)

    def _error(self, request_id: str, error: ServiceError) -> pb.ScoreStreamResponse:
        return pb.ScoreStreamResponse(
            request_id=request_id, error=self._servicer.request_error(error)
        )

    # -- the byte budget ---------------------------------------------------------------

    def _answer(self, response: pb.ScoreStreamResponse, cost: int) -> None:
        self._out.put_nowait((response, cost))

    def _reserve(self, cost: int) -> None:
        self._buffered += cost
        self._metrics.stream_buffered_bytes.inc(cost)

    def _release(self, cost: int) -> None:
        cost = min(cost, self._buffered)
        self._buffered -= cost
        self._metrics.stream_buffered_bytes.dec(cost)
        if self._buffered < self._limit:
            self._space.set()


def _reserved_answer(valid: ValidRequest) -> int:
    """Bytes the answer to `valid` will take on the wire (see codec.response_bytes)."""
    item = valid.item
    query_width = 0 if item.query_ids is None else int(item.query_ids.shape[1])
    arrays = response_bytes(item.num_rows, item.top_k, query_width, valid.logprob_dtype)
    return arrays + _ANSWER_OVERHEAD + len(valid.request_id)
