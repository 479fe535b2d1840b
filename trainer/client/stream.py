"""One endpoint's connection: a gRPC channel and the ScoreStream that multiplexes on it.

Many requests are in flight on one stream; responses come back in any order and are
routed to their waiters by request_id. One writer task sends the requests in order
(gRPC allows one pending write per call). When the stream ends - the server died,
drained or refused us - every request still waiting on it gets `StreamBroken` with the
cause, and the client retries them (on this endpoint's next stream or on another
endpoint) with the same request ids.

A waiter that gives up (cancelled, deadline) leaves its entry in place until the answer
arrives: a retry of the same request id on the same stream then re-attaches to that
entry instead of sending a duplicate, which keeps request ids unique among the requests
in flight on one stream, as the protocol requires.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import grpc

from teacher_service.v1 import teacher_pb2 as pb
from teacher_service.v1 import teacher_pb2_grpc as pb_grpc
from trainer.client.errors import AttemptFailure, StreamBroken
from trainer.client.types import ClientConfig

log = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, str]]


def make_channel(
    target: str, config: ClientConfig, authority: str | None = None
) -> grpc.aio.Channel:
    """An aio channel to `target` with the config's TLS, message limits and keepalive.

    `authority` ("name:port") is the name the replica answers to when `target` is one
    of its resolved addresses: sent as HTTP/2 :authority and, with TLS, the name its
    certificate is checked against (unless `tls.server_name` says otherwise).
    """
    options: list[tuple[str, int | str]] = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # Reconnect about as fast as the client's own backoff, not gRPC's default (1 s
        # growing to 120 s): a replica that restarts should get traffic again quickly.
        # (Not grpc.min_reconnect_backoff_ms: gRPC core uses it as the minimum *connect
        # timeout*, and a small one would abort slow TLS handshakes.)
        ("grpc.initial_reconnect_backoff_ms", max(1, int(config.backoff_base_s * 1000))),
        ("grpc.max_reconnect_backoff_ms", max(1, int(config.backoff_max_s * 1000))),
    ]
    if config.keepalive_s is not None:
        options += [
            ("grpc.keepalive_time_ms", int(config.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(max(1.0, config.keepalive_s / 2) * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
    if authority is not None:
        options.append(("grpc.default_authority", authority))
    tls = config.tls
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    if tls.server_name or authority is not None:
        host = authority.rpartition(":")[0].strip("[]") if authority is not None else ""
        options.append(("grpc.ssl_target_name_override", tls.server_name or host))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca_cert.read_bytes() if tls.ca_cert else None,
        private_key=tls.client_key.read_bytes() if tls.client_key else None,
        certificate_chain=tls.client_cert.read_bytes() if tls.client_cert else None,
    )
    return grpc.aio.secure_channel(target, credentials, options=options)


async def watch_connection(channel: grpc.aio.Channel, on_lost: Callable[[], None]) -> None:
    """Calls `on_lost` each time `channel` leaves READY; runs until cancelled.

    A channel leaves READY when its connection ends or receives GOAWAY - which is what
    a server's maximum connection age sends. Streams already open keep running on the
    old connection for the server's grace period, then are cut; a new stream goes over
    a new connection. So the client retires its stream at once (it finishes what it
    carries, then half-closes) and opens the next one on the new connection, instead
    of losing the requests still on it when the grace period ends.
    """
    state = channel.get_state(try_to_connect=False)
    while True:
        await channel.wait_for_state_change(state)
        new = channel.get_state(try_to_connect=False)
        if state == grpc.ChannelConnectivity.READY and new != grpc.ChannelConnectivity.READY:
            on_lost()
        state = new


def call_metadata(config: ClientConfig) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every call: client id and bearer token when configured."""
    metadata: list[tuple[str, str]] = []
    if config.client_id:
        metadata.append(("x-client-id", config.client_id))
    if config.token:
        metadata.append(("authorization", f"Bearer {config.token}"))
    return tuple(metadata)


def failure_from_rpc_error(error: grpc.aio.AioRpcError) -> AttemptFailure:
    """A stream-level gRPC error as the failure of the requests the stream carried."""
    return AttemptFailure(error.code(), error.details() or "", connection_lost=True)


class EndpointStream:
    """A live ScoreStream on one channel; `broken` is set once it has ended.

    Args:
        target: the endpoint, for messages.
        channel: the endpoint's channel (owned by the caller).
        metadata: sent when the stream opens.
        on_broken: called once with the cause when the stream ends on its own (not
            when `close` ends it), and whether requests were waiting on it.
    """

    def __init__(
        self,
        target: str,
        channel: grpc.aio.Channel,
        metadata: Metadata,
        on_broken: Callable[[AttemptFailure, bool], None],
    ) -> None:
        self.target = target
        self.broken: AttemptFailure | None = None
        self._on_broken = on_broken
        self._pending: dict[str, asyncio.Future[pb.ScoreStreamResponse]] = {}
        # Requests go out through one writer task, never from a waiter: a waiter that is
        # cancelled mid-write would leave it unknown whether the server got the request.
        self._outbox: asyncio.Queue[pb.ScoreRequest | None] = asyncio.Queue()
        self._call = pb_grpc.TeacherServiceStub(channel).ScoreStream(metadata=tuple(metadata))
        self._closing = False
        self.retiring = False  # no new requests; half-closed once the last one is answered
        self._reader = asyncio.create_task(self._read_loop(), name=f"score-stream-read-{target}")
        self._writer = asyncio.create_task(self._write_loop(), name=f"score-stream-write-{target}")

    @property
    def pending(self) -> int:
        """Requests sent or queued and not yet answered (including abandoned ones)."""
        return len(self._pending)

    def waiting_for(self, request_id: str) -> bool:
        """Whether `request_id` was sent (or queued) here and is not yet answered."""
        return request_id in self._pending

    def send(self, request: pb.ScoreRequest) -> asyncio.Future[pb.ScoreStreamResponse]:
        """Queues `request` for writing and returns the future of its response.

        The future fails with StreamBroken if the stream ends first. Await it through
        `asyncio.shield`: a waiter's cancellation must not cancel the entry, which stays
        until the answer arrives (the request is written regardless).
        """
        if self.broken is not None:
            raise StreamBroken(self.broken)
        existing = self._pending.get(request.request_id)
        if existing is not None:  # same id still in flight here: wait for that answer
            return existing
        future: asyncio.Future[pb.ScoreStreamResponse] = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = future
        self._outbox.put_nowait(request)
        return future

    def retire(self) -> None:
        """Takes no new requests and half-closes once nothing waits here any more.

        Used when the server says it is draining: it finishes what it accepted, and a
        half-closed stream lets it shut down then instead of at the end of its grace
        period. The client opens a fresh stream for this endpoint when it next needs one.
        """
        if not self.retiring and self.broken is None:
            self.retiring = True
            self._half_close_if_idle()

    @property
    def finished(self) -> bool:
        """True once the stream's reader has ended (nothing of it runs any more)."""
        return self._reader.done()

    def when_finished(self, callback: Callable[[], None]) -> None:
        """Calls `callback` once the stream's reader has ended."""
        self._reader.add_done_callback(lambda _task: callback())

    def _half_close_if_idle(self) -> None:
        if self.retiring and not self._pending and self.broken is None:
            self._closing = True  # ending now is expected, not a failure to report
            self._outbox.put_nowait(None)

    async def close(self) -> None:
        """Half-closes the stream, stops reading and fails whatever still waits."""
        self._closing = True
        if self.broken is None:
            self._outbox.put_nowait(None)  # done_writing after what is queued
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), 1.0)
            except asyncio.CancelledError:
                # The server ended the stream meanwhile (e.g. its connection aged out)
                # and _break cancelled the writer: that is not a cancellation of close.
                if not self._writer.cancelled():
                    raise
            except Exception:
                pass  # the reader holds the stream's real status
        self._call.cancel()
        for task in (self._reader, self._writer):
            task.cancel()
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)
        self._break(AttemptFailure(grpc.StatusCode.CANCELLED, "client closed", 0.0, True))

    async def _write_loop(self) -> None:
        try:
            while (request := await self._outbox.get()) is not None:
                await self._call.write(request)
            await self._call.done_writing()
        except grpc.aio.AioRpcError as error:
            self._break(failure_from_rpc_error(error))
        except (asyncio.InvalidStateError, grpc.aio.UsageError) as error:
            # The call already finished; the reader holds (or will hold) the real status.
            self._break(AttemptFailure(grpc.StatusCode.UNAVAILABLE, str(error), 0.0, True))
        except Exception as error:  # never leave waiters hanging on a dead writer
            log.exception("%s: ScoreStream writer failed", self.target)
            self._break(AttemptFailure(grpc.StatusCode.UNKNOWN, repr(error), 0.0, True))

    async def _read_loop(self) -> None:
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    failure = AttemptFailure(
                        grpc.StatusCode.UNAVAILABLE, "stream closed by the server", 0.0, True
                    )
                    break
                future = self._pending.pop(message.request_id, None)
                if future is None:
                    log.debug(
                        "%s: dropping response for unknown id %s", self.target, message.request_id
                    )
                elif not future.done():
                    future.set_result(message)
                self._half_close_if_idle()
        except grpc.aio.AioRpcError as error:
            failure = failure_from_rpc_error(error)
        except Exception as error:  # never leave waiters hanging on a dead reader
            log.exception("%s: ScoreStream reader failed", self.target)
            failure = AttemptFailure(grpc.StatusCode.UNKNOWN, repr(error), 0.0, True)
        self._break(failure)

    def _break(self, failure: AttemptFailure) -> None:
        if self.broken is not None:
            return
        self.broken = failure
        if asyncio.current_task() is not self._writer:
            self._writer.cancel()  # it may be parked on an empty outbox
        waiting, self._pending = self._pending, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(StreamBroken(failure))
                future.exception()  # mark retrieved: abandoned entries have no waiter
        if not self._closing:
            log.info(
                "%s: ScoreStream ended (%s) with %d requests waiting",
                self.target,
                failure.describe(),
                len(waiting),
            )
            self._on_broken(failure, bool(waiting))
