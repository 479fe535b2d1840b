"""The asynchronous teacher client: handshake, balancing, retries and failover.

Every request is a ScoreStream message on one endpoint's stream (see stream.py).
One request, one result, whatever happens to the replicas:

    attempt on the least-loaded endpoint
      -> result                        : decoded once, returned to the caller
      -> stream lost / UNAVAILABLE     : retried at once on another live endpoint (or
                                         after backoff when none), SAME request id
      -> RESOURCE_EXHAUSTED / DEADLINE : retried after jittered backoff >= server hint
      -> anything else                 : raised (TeacherRequestError)
    all of it inside the request's deadline (TeacherDeadlineError past it).

Replicas: a dns:///name:port endpoint is resolved by the client (replicas.py), one
connection per address, again every `resolve_interval_s`. New addresses join the
balancer (their handshake runs before their first request); a vanished address takes
no new requests, its stream finishes what it carries and its channel closes. When a
connection ages out (the server's GOAWAY) the endpoint's stream is retired the same
way and the next request opens a stream on a fresh connection.

Exactly once: only one attempt of a request is awaited at a time, the caller's result
is set by the single retry loop below, and answers arriving for an abandoned attempt
are dropped by the stream (or re-attached when the same id is retried on that stream).
Scoring is idempotent, so a request the dead replica had already scored costs compute,
never correctness.

Usage (inside a running event loop):

    client = AsyncTeacherClient(ClientConfig(endpoints=("teacher-0:50051",)))
    info = await client.connect(vocab_size=V, tokenizer_fingerprint=fp)
    scores = await client.score(ids, start, top_k=16)
    await client.close()
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Coroutine, Sequence
from typing import Any

import grpc
import torch

from teacher_service.v1 import teacher_pb2 as pb
from teacher_service.v1 import teacher_pb2_grpc as pb_grpc
from trainer.client.balance import Balancer, Endpoint
from trainer.client.errors import (
    AttemptFailure,
    HandshakeError,
    StreamBroken,
    TeacherDeadlineError,
    TeacherError,
    TeacherRequestError,
    TeacherUnavailableError,
    status_from_int,
)
from trainer.client.handshake import Expectation, check, select_teacher
from trainer.client.replicas import Membership
from trainer.client.retry import FATAL_STREAM_CODES, backoff_delay, is_retryable
from trainer.client.stream import EndpointStream, call_metadata, make_channel, watch_connection
from trainer.client.types import ClientConfig, ScoreSpec, TeacherInfo, TeacherScores
from trainer.client.wire import build_request, decode_scores

log = logging.getLogger(__name__)

Outcome = pb.ScoreStreamResponse | AttemptFailure
INFO_TIMEOUT_S = 10.0


class AsyncTeacherClient:
    """Scores sequences on a replicated teacher service; one instance per event loop."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._members = Membership(config.endpoints, config.resolver)
        self._authority: dict[str, str | None] = {}  # target -> name it answers to
        self._balancer = Balancer(
            (),  # filled by the first refresh (in connect)
            config.max_in_flight,
            cooldown_base_s=config.backoff_base_s,
            cooldown_max_s=config.backoff_max_s,
        )
        self._metadata = call_metadata(config)
        self._rng = random.Random()
        # Channels and streams belong to the loop they were made on: created lazily.
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._streams: dict[str, EndpointStream] = {}
        self._winding_down: set[EndpointStream] = set()  # retired, not yet finished
        self._tasks: set[asyncio.Task[None]] = set()  # watchers, refresh loop, closes
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._expect = Expectation()
        self._info: TeacherInfo | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._closed = False

    @property
    def info(self) -> TeacherInfo | None:
        """The teacher found by `connect` (from the first endpoint that answered)."""
        return self._info

    # -- handshake ---------------------------------------------------------------------

    async def connect(
        self, *, vocab_size: int | None = None, tokenizer_fingerprint: str | None = None
    ) -> TeacherInfo:
        """Calls Info on every endpoint and checks the teacher against the student.

        Raises HandshakeError when a reachable endpoint does not host the teacher, its
        vocab size or tokenizer fingerprint differs from the given ones, or replicas
        disagree with each other. Endpoints unreachable now are checked before their
        first request. Raises TeacherUnavailableError when none answers within the
        retry budget, TeacherRequestError when the server refuses the credentials.
        """
        self._expect = Expectation(vocab_size, tokenizer_fingerprint)
        self._info = None
        for endpoint in self._balancer.endpoints.values():
            endpoint.verified = False
        errors: dict[str, str] = {}
        for retry in range(self.config.max_retries + 1):
            errors.update(await self._refresh())
            self._start_refresher()
            targets = list(self._balancer.endpoints)
            outcomes = await asyncio.gather(
                *(self._fetch_info(t) for t in targets), return_exceptions=True
            )
            infos: list[TeacherInfo] = []
            for target, outcome in zip(targets, outcomes, strict=True):
                if isinstance(outcome, TeacherInfo):
                    infos.append(outcome)
                elif isinstance(outcome, grpc.aio.AioRpcError):
                    if outcome.code() in FATAL_STREAM_CODES:
                        raise TeacherRequestError(
                            f"Info refused by {target}: {outcome.code().name}: {outcome.details()}",
                            outcome.code(),
                        )
                    errors[target] = f"{outcome.code().name}: {outcome.details()}"
                else:
                    raise outcome  # HandshakeError or a bug: not retried
            if infos:
                for info in infos:
                    check(info, self._expect, infos[0])
                    if (endpoint := self._balancer.endpoints.get(info.endpoint)) is not None:
                        endpoint.verified = True
                for target, error in errors.items():
                    endpoint = self._balancer.endpoints.get(target)
                    if endpoint is not None and not endpoint.verified:
                        log.warning(
                            "teacher endpoint %s unreachable at connect (%s); "
                            "it is checked before its first request",
                            target,
                            error,
                        )
                self._info = infos[0]
                log.info(
                    "connected to teacher %r (%s, vocab %d) on %d/%d endpoints",
                    self._info.name,
                    self._info.model_name,
                    self._info.vocab_size,
                    len(infos),
                    len(targets),
                )
                return self._info
            if retry < self.config.max_retries:
                await asyncio.sleep(self._delay(retry + 1, 0.0))
        detail = "; ".join(f"{t}: {e}" for t, e in errors.items())
        raise TeacherUnavailableError(
            f"no teacher endpoint answered Info ({detail})", grpc.StatusCode.UNAVAILABLE
        )

    async def _fetch_info(self, target: str) -> TeacherInfo:
        stub = pb_grpc.TeacherServiceStub(self._channel(target))
        # Capped so that one black-holed replica cannot hold up connect for a whole deadline.
        timeout = min(self.config.deadline_s, INFO_TIMEOUT_S)
        response = await stub.Info(pb.InfoRequest(), metadata=self._metadata, timeout=timeout)
        return select_teacher(response, self.config.teacher, target)

    async def _ensure_connected(self) -> TeacherInfo:
        if self._info is not None:
            return self._info
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._info is None:
                await self.connect(
                    vocab_size=self._expect.vocab_size,
                    tokenizer_fingerprint=self._expect.tokenizer_fingerprint,
                )
        assert self._info is not None
        return self._info

    async def _verify(self, endpoint: Endpoint) -> AttemptFailure | None:
        """Checks an endpoint that missed the connect-time handshake; None when fine."""
        try:
            info = await self._fetch_info(endpoint.target)
            check(info, self._expect, self._info)
        except grpc.aio.AioRpcError as error:
            self._balancer.mark_failed(endpoint.target)
            return AttemptFailure(error.code(), error.details() or "", connection_lost=True)
        except HandshakeError as error:
            log.error("excluding teacher endpoint %s: %s", endpoint.target, error)
            self._balancer.disable(endpoint.target, str(error))
            return AttemptFailure(grpc.StatusCode.UNAVAILABLE, str(error), connection_lost=True)
        endpoint.verified = True
        return None

    # -- scoring -----------------------------------------------------------------------

    async def score(
        self,
        token_ids: torch.Tensor,
        start: int,
        top_k: int,
        *,
        query_ids: torch.Tensor | None = None,
        temperature: float = 1.0,
        logprob_dtype: torch.dtype = torch.float32,
        request_id: str | None = None,
    ) -> TeacherScores:
        """Scores one sequence: token_ids [L], rows for ids[start..L-1] (R = L - start)."""
        spec = ScoreSpec(token_ids, start, top_k, query_ids, temperature, logprob_dtype, request_id)
        return await self.score_spec(spec)

    async def score_batch(self, seqs: Sequence[ScoreSpec]) -> list[TeacherScores]:
        """Scores sequences concurrently; results in input order. The first failure
        cancels the others and is raised."""
        tasks = [asyncio.ensure_future(self.score_spec(spec)) for spec in seqs]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def score_spec(self, spec: ScoreSpec) -> TeacherScores:
        """Scores one ScoreSpec with retries and failover (see the module docstring)."""
        if self._closed:
            raise TeacherError("the teacher client is closed")
        spec.validate()
        request_id = spec.request_id or uuid.uuid4().hex
        history: list[str] = []  # one line per failed attempt, for the error message
        try:
            async with asyncio.timeout(self.config.deadline_s):
                info = await self._ensure_connected()
                # The resolved name, not "": every replica must use the handshake's teacher.
                request = build_request(spec, request_id, info.name)
                return await self._score_with_retries(request, spec, history)
        except TimeoutError as error:
            if isinstance(error, TeacherError):
                raise
            earlier = f"; earlier attempts: {'; '.join(history)}" if history else ""
            raise TeacherDeadlineError(
                f"request {request_id}: no teacher result within the deadline of "
                f"{self.config.deadline_s} s{earlier}",
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ) from None

    async def _score_with_retries(
        self, request: pb.ScoreRequest, spec: ScoreSpec, history: list[str]
    ) -> TeacherScores:
        avoid: str | None = None
        tokens = int(spec.token_ids.shape[0])  # a replica's work grows with L
        for retry in range(self.config.max_retries + 1):
            if self._closed:  # e.g. closed while this request slept in backoff
                raise TeacherError(f"request {request.request_id}: the client was closed")
            try:
                endpoint = await self._balancer.acquire(avoid, tokens)
            except LookupError as error:
                raise HandshakeError(str(error)) from None
            try:
                outcome = await self._attempt(endpoint, request)
            finally:
                self._balancer.release(endpoint, tokens)
            if isinstance(outcome, pb.ScoreStreamResponse):
                self._balancer.mark_ok(endpoint.target)
                return decode_scores(outcome, spec, endpoint.target)
            history.append(f"{endpoint.target}: {outcome.describe()}")
            if self._closed:
                raise TeacherError(f"request {request.request_id}: the client was closed")
            if not is_retryable(outcome):
                raise TeacherRequestError(
                    f"request {request.request_id} refused by {endpoint.target}: "
                    f"{outcome.describe()}",
                    outcome.code,
                )
            if outcome.code == grpc.StatusCode.UNAVAILABLE and not outcome.connection_lost:
                # Draining: stay away for its hint, and let it shut down once our
                # requests there are answered.
                self._balancer.mark_failed(endpoint.target, outcome.retry_after_s)
                stream = self._streams.get(endpoint.target)
                if stream is not None:
                    stream.retire()
            if retry == self.config.max_retries:
                break
            avoid = endpoint.target
            # A lost replica is not this request's fault: go straight to a live one.
            if outcome.connection_lost and self._balancer.has_other_up(endpoint.target):
                delay = 0.0
            else:
                delay = self._delay(retry + 1, outcome.retry_after_s)
            log.debug(
                "request %s: retry %d in %.3f s after %s",
                request.request_id,
                retry + 1,
                delay,
                history[-1],
            )
            await asyncio.sleep(delay)
        raise TeacherUnavailableError(
            f"request {request.request_id}: no result after {len(history)} attempts: "
            + "; ".join(history),
            grpc.StatusCode.UNAVAILABLE,
        )

    async def _attempt(self, endpoint: Endpoint, request: pb.ScoreRequest) -> Outcome:
        """One try on one endpoint: its response, or why there is none."""
        if not endpoint.verified:
            failure = await self._verify(endpoint)
            if failure is not None:
                return failure
        if endpoint.removed:  # its address left DNS while this attempt waited
            return AttemptFailure(
                grpc.StatusCode.UNAVAILABLE, "replica left DNS", connection_lost=True
            )
        try:
            future = self._stream(endpoint.target).send(request)
            response = await asyncio.shield(future)  # a cancelled waiter leaves the entry
        except StreamBroken as broken:
            return broken.failure
        if response.HasField("error"):
            error = response.error
            return AttemptFailure(
                status_from_int(error.code), error.message, error.retry_after_ms / 1000.0
            )
        return response

    # -- connections ---------------------------------------------------------------------

    def _channel(self, target: str) -> grpc.aio.Channel:
        channel = self._channels.get(target)
        if channel is None:
            authority = self._authority.get(target)
            channel = self._channels[target] = make_channel(target, self.config, authority)
            self._watchers[target] = self._spawn(
                watch_connection(channel, lambda: self._connection_lost(target)),
                f"teacher-connection-{target}",
            )
        return channel

    def _connection_lost(self, target: str) -> None:
        """The channel left READY (GOAWAY, e.g. the server's maximum connection age):
        the stream on the old connection finishes what it carries and half-closes."""
        stream = self._streams.get(target)
        if stream is not None:
            stream.retire()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- replicas ------------------------------------------------------------------------

    async def _refresh(self) -> dict[str, str]:
        """Resolves the dns:/// endpoints and applies the change; returns the errors."""
        change = await self._members.refresh()
        for target, authority in change.added.items():
            self._authority[target] = authority
            self._balancer.add(target)
        for target in change.removed:
            self._retire(target)
        return change.errors

    def _start_refresher(self) -> None:
        if self._refresher is None and self._members.resolves and not self._closed:
            self._refresher = self._spawn(self._refresh_forever(), "teacher-resolve")

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.resolve_interval_s)
            try:
                await self._refresh()
            except Exception:  # never let a resolver bug stop re-resolution for good
                log.exception("re-resolving the teacher endpoints failed")

    def _retire(self, target: str) -> None:
        """Takes `target` out of rotation; closes its channel once its stream is done."""
        self._balancer.remove(target)
        stream = self._streams.pop(target, None)
        if stream is not None and not stream.finished:
            stream.retire()  # what it carries finishes (or fails over if it dies)
            self._winding_down.add(stream)
            stream.when_finished(lambda: self._stream_done(stream, target))
        else:
            self._close_channel_if_unused(target)

    def _stream_done(self, stream: EndpointStream, target: str) -> None:
        self._winding_down.discard(stream)
        self._close_channel_if_unused(target)

    def _close_channel_if_unused(self, target: str) -> None:
        if target in self._balancer.endpoints or target in self._streams or self._closed:
            return  # back in DNS meanwhile, or close() handles it
        channel = self._channels.pop(target, None)
        watcher = self._watchers.pop(target, None)
        if watcher is not None:
            watcher.cancel()
        if channel is not None:
            self._spawn(channel.close(), f"teacher-close-{target}")

    def _stream(self, target: str) -> EndpointStream:
        """The endpoint's live stream, opening a new one after the last one broke."""
        stream = self._streams.get(target)
        if stream is None or stream.broken is not None or stream.retiring:
            if stream is not None and not stream.finished:
                # Still winding down (answers to come, or the server's EOF): keep a
                # reference so its tasks are neither collected nor leaked at close.
                old = stream
                self._winding_down.add(old)
                old.when_finished(lambda: self._winding_down.discard(old))
            stream = EndpointStream(
                target,
                self._channel(target),
                self._metadata,
                on_broken=lambda failure, _waiting: self._stream_broken(target, failure),
            )
            self._streams[target] = stream
        return stream

    def _stream_broken(self, target: str, failure: AttemptFailure) -> None:
        # A connection cut at the server's maximum age is routine, not a sick replica.
        aged_out = "max connection age" in failure.message
        if failure.code not in FATAL_STREAM_CODES and not aged_out:
            self._balancer.mark_failed(target, failure.retry_after_s)

    def _delay(self, retry: int, retry_after_s: float) -> float:
        return backoff_delay(
            retry, self.config.backoff_base_s, self.config.backoff_max_s, retry_after_s, self._rng
        )

    async def close(self) -> None:
        """Closes every stream and channel; requests still waiting fail."""
        if self._closed:
            return
        self._closed = True
        streams = [*self._streams.values(), *self._winding_down]
        self._streams, self._winding_down = {}, set()
        for stream in streams:
            await stream.close()
        tasks = list(self._tasks)
        for task in tasks:
            if not task.get_name().startswith("teacher-close-"):
                task.cancel()  # watchers and the refresh loop; channel closes finish
        await asyncio.gather(*tasks, return_exceptions=True)
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> AsyncTeacherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
