"""The per-teacher batching loop: a fair queue across clients, token-budget batches.

Every hosted teacher has one `Scheduler`. Requests from all connections land in
per-client FIFO queues; the loop forms batches by deficit round robin over the clients
(each visit grants a client `quantum_tokens` of credit, spent on its queued sequences),
so a trainer with a huge backlog gets the same share of each batch as one with a single
sequence. A batch closes when it reaches `max_batch_tokens` or `max_batch_size`, or when
the oldest queued sequence has waited `max_wait_s`.

The loop keeps at most `backend.max_concurrent_batches` batches in flight and forms the
next batch only when a slot frees, so sequences keep arriving into the queue while the
backend computes and the next batch is as full as the traffic allows.

Admission is bounded in tokens, per client and in total (RESOURCE_EXHAUSTED with a retry
hint from the measured throughput). A request whose deadline passed before its batch
started is failed with DEADLINE_EXCEEDED; a request whose caller went away (task
cancelled) leaves the queue at once and is never computed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field

from teacher_service.backends.base import Backend
from teacher_service.errors import (
    ErrorKind,
    ServiceError,
    deadline_exceeded,
    exhausted,
    unavailable,
)
from teacher_service.metrics import Metrics
from teacher_service.types import ScoreItem, ScoreResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching and admission knobs of one teacher's queue.

    Attributes:
        max_batch_tokens: sum of sequence lengths (prompt + response) per batch; a
            single longer sequence still runs, alone.
        max_batch_size: sequences per batch.
        max_wait_s: how long the oldest queued sequence waits for company before a
            partial batch is sent.
        max_queued_tokens: bound on tokens queued by all clients together.
        max_client_queued_tokens: bound on tokens queued by one client.
        quantum_tokens: credit a client gets per round-robin visit; smaller means finer
            interleaving, larger means fewer rounds per batch.
    """

    max_batch_tokens: int = 16384
    max_batch_size: int = 256
    max_wait_s: float = 0.002
    max_queued_tokens: int = 2_000_000
    max_client_queued_tokens: int = 500_000
    quantum_tokens: int = 512

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_batch_size", "max_queued_tokens", "quantum_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_client_queued_tokens < 1:
            raise ValueError("SchedulerConfig.max_client_queued_tokens must be >= 1")
        if self.max_wait_s < 0:
            raise ValueError(f"SchedulerConfig.max_wait_s must be >= 0, got {self.max_wait_s}")


@dataclass(eq=False)
class _Pending:
    """A queued sequence and the future its caller awaits."""

    item: ScoreItem
    client: str
    deadline: float | None
    future: asyncio.Future[ScoreResult]
    enqueued: float = field(default_factory=time.monotonic)
    queued: bool = True  # False once taken into a batch or withdrawn

    @property
    def tokens(self) -> int:
        return self.item.length


class Scheduler:
    """Fair, token-budgeted batching of one teacher's requests from all clients."""

    def __init__(
        self, teacher: str, backend: Backend, config: SchedulerConfig, metrics: Metrics
    ) -> None:
        self._teacher = teacher
        self._backend = backend
        self._config = config
        self._metrics = metrics
        self._queues: dict[str, collections.deque[_Pending]] = {}
        self._ring: collections.deque[str] = collections.deque()  # clients with work
        self._deficit: dict[str, int] = collections.defaultdict(int)
        self._in_turn: set[str] = set()  # clients whose round-robin turn is under way
        self._client_tokens: dict[str, int] = collections.defaultdict(int)
        self._queued_tokens = 0
        self._queue_depth = 0
        self._slots = asyncio.Semaphore(max(1, backend.max_concurrent_batches))
        self._work = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._batches: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._draining = False
        self._closed = False
        self._tokens_per_s = 0.0  # EMA of backend throughput, for retry hints

    # -- public API ----------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return self._queue_depth

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    async def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name=f"scheduler-{self._teacher}")

    async def submit(
        self, item: ScoreItem, client_id: str, deadline: float | None = None
    ) -> ScoreResult:
        """Queues `item` and waits for its result (see the module docstring)."""
        self._admit(item, client_id)
        pending = _Pending(item, client_id, deadline, asyncio.get_running_loop().create_future())
        self._enqueue(pending)
        try:
            return await pending.future
        except asyncio.CancelledError:
            if pending.queued:
                self._withdraw(pending, reason="cancelled")
            raise

    def drain(self) -> None:
        """Refuses new work from now on; queued and running batches still complete."""
        self._draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once nothing is queued or computing, False if `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stops the loop; whatever is still queued fails with UNAVAILABLE."""
        self._draining = self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for queue in self._queues.values():
            for pending in queue:
                if pending.queued and not pending.future.done():
                    pending.future.set_exception(unavailable("teacher is shutting down"))
        self._queues.clear()
        self._ring.clear()
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)

    # -- admission and queue bookkeeping ---------------------------------------------

    def _admit(self, item: ScoreItem, client: str) -> None:
        if self._draining:
            self._metrics.rejected.labels(self._teacher, "draining").inc()
            raise unavailable("server is draining; retry on another replica", 1.0)
        tokens = item.length
        if self._queued_tokens + tokens > self._config.max_queued_tokens:
            self._metrics.rejected.labels(self._teacher, "queue_full").inc()
            raise exhausted(
                f"teacher queue is full: {self._queued_tokens} queued tokens + {tokens} "
                f"exceeds max_queued_tokens={self._config.max_queued_tokens}",
                self._retry_after(self._queued_tokens),
            )
        mine = self._client_tokens[client]
        if mine + tokens > self._config.max_client_queued_tokens:
            self._metrics.rejected.labels(self._teacher, "client_queue_full").inc()
            raise exhausted(
                f"client queue is full: {mine} queued tokens + {tokens} exceeds "
                f"max_client_queued_tokens={self._config.max_client_queued_tokens}",
                self._retry_after(mine),
            )

    def _retry_after(self, backlog_tokens: int) -> float:
        """Seconds until about half the backlog has drained, from measured throughput."""
        if self._tokens_per_s <= 0:
            return 0.5
        return min(30.0, max(0.05, 0.5 * backlog_tokens / self._tokens_per_s))

    def _enqueue(self, pending: _Pending) -> None:
        queue = self._queues.get(pending.client)
        if queue is None:
            queue = self._queues[pending.client] = collections.deque()
        if not queue:
            self._ring.append(pending.client)
        queue.append(pending)
        self._count(pending, +1)
        self._idle.clear()
        self._work.set()

    def _withdraw(self, pending: _Pending, reason: str) -> None:
        """Takes a sequence out of the count; it is dropped from its deque lazily."""
        pending.queued = False
        self._count(pending, -1)
        self._metrics.rejected.labels(self._teacher, reason).inc()
        self._maybe_idle()

    def _count(self, pending: _Pending, sign: int) -> None:
        self._queued_tokens += sign * pending.tokens
        self._queue_depth += sign
        self._client_tokens[pending.client] += sign * pending.tokens
        if self._client_tokens[pending.client] == 0:
            del self._client_tokens[pending.client]
        self._metrics.queue_depth.labels(self._teacher).set(self._queue_depth)
        self._metrics.queued_tokens.labels(self._teacher).set(self._queued_tokens)

    def _maybe_idle(self) -> None:
        if self._queue_depth == 0 and not self._batches:
            self._idle.set()

    # -- the loop -------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if self._queue_depth == 0:
                self._work.clear()
                await self._work.wait()
            await self._slots.acquire()
            await self._gather_company()
            batch = self._take_batch()
            if not batch:  # everything queued was cancelled or past its deadline
                self._slots.release()
                continue
            # The set keeps a reference to each running batch; _compute removes its own.
            self._batches.add(asyncio.create_task(self._compute(batch)))

    async def _gather_company(self) -> None:
        """Waits until a full batch is queued or the oldest sequence waited max_wait_s.

        Every arrival wakes the wait (`_work`), so a batch that fills up leaves at once
        instead of sleeping out the rest of max_wait_s.
        """
        cfg = self._config
        while True:
            oldest = min(
                (q[0].enqueued for q in self._queues.values() if q and q[0].queued),
                default=time.monotonic(),
            )
            remaining = cfg.max_wait_s - (time.monotonic() - oldest)
            full = self._queued_tokens >= cfg.max_batch_tokens or (
                self._queue_depth >= cfg.max_batch_size
            )
            if remaining <= 0 or full:
                return
            self._work.clear()
            try:
                await asyncio.wait_for(self._work.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Pending]:
        """Deficit round robin over clients until the token or size budget is spent.

        A client's turn adds `quantum_tokens` to its credit and lasts until the credit no
        longer covers its next sequence or its queue is empty (it then leaves the ring and
        its credit lapses). When the batch fills up during a turn, the turn ends there
        too, keeping the unspent credit, and the next batch begins with the next client;
        but a client that got nothing into this batch (its sequence did not fit what was
        left) stays first in line. So each batch starts with someone who has waited, and
        a client is never skipped because the batch happened to be full at its turn.
        """
        cfg = self._config
        batch: list[_Pending] = []
        tokens = 0
        now = time.monotonic()
        while self._ring:
            client = self._ring[0]
            queue = self._queues[client]
            if client not in self._in_turn:
                self._in_turn.add(client)
                self._deficit[client] += cfg.quantum_tokens
            batch_full = False
            took = 0
            while queue:
                head = queue[0]
                if not head.queued:  # withdrawn (cancelled) earlier
                    queue.popleft()
                    continue
                if head.deadline is not None and head.deadline <= now:
                    queue.popleft()
                    self._expire(head)
                    continue
                if len(batch) >= cfg.max_batch_size or (
                    batch and tokens + head.tokens > cfg.max_batch_tokens
                ):
                    batch_full = True
                    break
                if head.tokens > self._deficit[client]:
                    break
                queue.popleft()
                self._deficit[client] -= head.tokens
                head.queued = False
                self._count(head, -1)
                batch.append(head)
                tokens += head.tokens
                took += 1
            if not queue:
                self._ring.popleft()
                self._in_turn.discard(client)
                self._deficit.pop(client, None)
                del self._queues[client]
            elif batch_full:
                if took:
                    self._in_turn.discard(client)
                    self._ring.rotate(-1)
                break
            else:  # credit spent: the turn ends, the next client's begins
                self._in_turn.discard(client)
                self._ring.rotate(-1)
            # An empty batch always ends up taking something: credit grows every turn and
            # the first sequence of a batch always fits.
        self._maybe_idle()
        return batch

    def _expire(self, pending: _Pending) -> None:
        """Fails a queued sequence whose deadline passed before its batch started."""
        self._withdraw(pending, reason="deadline")
        if not pending.future.done():
            pending.future.set_exception(
                deadline_exceeded("deadline passed while the request was queued")
            )

    async def _compute(self, batch: list[_Pending]) -> None:
        """Runs one batch through the backend and delivers each result or error."""
        started = time.monotonic()
        teacher = self._teacher
        m = self._metrics
        for pending in batch:
            m.queue_wait.labels(teacher).observe(started - pending.enqueued)
        live = [p for p in batch if not p.future.done()]
        tokens = sum(p.tokens for p in live)
        try:
            if live:
                m.batch_size.labels(teacher).observe(len(live))
                m.batch_tokens.labels(teacher).observe(tokens)
                try:
                    results = await self._backend.score([p.item for p in live])
                except ServiceError as err:
                    if err.kind is not ErrorKind.INVALID_ARGUMENT or len(live) == 1:
                        raise
                    # One client's item was refused by the backend (a limit only it knows):
                    # score the batch item by item so nobody else's work fails with it.
                    await self._score_one_by_one(live)
                    return
                for pending, result in zip(live, results, strict=True):
                    self._deliver(pending, result)
        except ServiceError as err:
            self._fail(live, err)
        except Exception:
            log.exception("backend of teacher %s failed on a batch of %d", teacher, len(live))
            self._fail(live, ServiceError(ErrorKind.INTERNAL, "teacher backend failed"))
        finally:
            elapsed = time.monotonic() - started
            if live:
                m.compute.labels(teacher).observe(elapsed)
                rate = tokens / max(elapsed, 1e-6)
                self._tokens_per_s = (
                    rate if self._tokens_per_s == 0 else (0.8 * self._tokens_per_s + 0.2 * rate)
                )
            self._slots.release()
            self._batches.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._maybe_idle()

    def _deliver(self, pending: _Pending, result: ScoreResult) -> None:
        m = self._metrics
        rows = pending.item.num_rows
        m.tokens_scored.labels(self._teacher).inc(rows)
        m.client_tokens.labels(m.client_label(pending.client)).inc(rows)
        if not pending.future.done():
            pending.future.set_result(result)

    async def _score_one_by_one(self, batch: list[_Pending]) -> None:
        for pending in batch:
            if pending.future.done():
                continue
            try:
                (result,) = await self._backend.score([pending.item])
            except ServiceError as err:
                self._fail([pending], err)
            else:
                self._deliver(pending, result)

    @staticmethod
    def _fail(batch: list[_Pending], err: ServiceError) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(err)
