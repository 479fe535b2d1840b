"""The scheduler against a real PyTorch backend: fairness, budgets, admission, deadlines.

A thin recording wrapper around the real TorchBackend lets the tests see each batch the
scheduler formed; the scoring itself is the real model's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from teacher_service.backends.torch_backend import TorchBackend
from teacher_service.errors import ErrorKind, ServiceError
from teacher_service.metrics import Metrics
from teacher_service.scheduler import Scheduler, SchedulerConfig
from teacher_service.types import ScoreItem, ScoreResult, TeacherMeta
from tests.teacher_service.conftest import TINY_VOCAB
from tests.teacher_service.wire import assert_same_topk

VOCAB = TINY_VOCAB


class RecordingBackend:
    """Delegates to a real backend and records (client-visible) batch compositions."""

    def __init__(self, inner: TorchBackend, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.delay_s = delay_s  # widens the window in which requests pile up
        self.batches: list[list[ScoreItem]] = []

    @property
    def meta(self) -> TeacherMeta:
        return self.inner.meta

    @property
    def max_concurrent_batches(self) -> int:
        return 1

    async def start(self) -> None:
        await self.inner.start()

    async def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        self.batches.append(list(items))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return await self.inner.score(items)

    async def close(self) -> None:
        await self.inner.close()


def random_item(length: int, top_k: int = 4) -> ScoreItem:
    start = int(torch.randint(1, length, ()).item())
    return ScoreItem(torch.randint(0, VOCAB, (length,)), start=start, top_k=top_k)


async def make(tiny_model_dir: Path, delay_s: float = 0.0, **cfg: float) -> tuple:
    backend = RecordingBackend(TorchBackend(tiny_model_dir), delay_s)
    await backend.start()
    metrics = Metrics()
    scheduler = Scheduler("t", backend, SchedulerConfig(**cfg), metrics)  # type: ignore[arg-type]
    await scheduler.start()
    return scheduler, backend, metrics


def test_results_match_direct_backend_scoring(tiny_model_dir: Path) -> None:
    async def run() -> None:
        scheduler, backend, _ = await make(tiny_model_dir)
        items = [random_item(int(torch.randint(2, 40, ()).item())) for _ in range(24)]
        results = await asyncio.gather(
            *(scheduler.submit(it, f"c{i % 5}") for i, it in enumerate(items))
        )
        direct = await backend.inner.score(items)
        for got, want in zip(results, direct, strict=True):
            assert_same_topk(got.topk_ids, got.topk_logprobs, want.topk_ids, want.topk_logprobs)
            torch.testing.assert_close(got.token_logprobs, want.token_logprobs)
        # Batching really happened: fewer backend calls than sequences.
        assert len(backend.batches) < len(items)
        await scheduler.close()
        await backend.close()

    asyncio.run(run())


def test_batches_respect_token_and_size_budgets(tiny_model_dir: Path) -> None:
    async def run() -> None:
        scheduler, backend, _ = await make(
            tiny_model_dir, delay_s=0.01, max_batch_tokens=200, max_batch_size=6, max_wait_s=0.01
        )
        lengths = torch.randint(5, 60, (60,)).tolist()
        await asyncio.gather(
            *(scheduler.submit(random_item(n), f"c{i % 3}") for i, n in enumerate(lengths))
        )
        assert sum(len(b) for b in backend.batches) == len(lengths)
        for batch in backend.batches:
            assert len(batch) <= 6
            assert len(batch) == 1 or sum(it.length for it in batch) <= 200
        await scheduler.close()
        await backend.close()

    asyncio.run(run())


def test_flooding_client_cannot_starve_a_single_sequence(tiny_model_dir: Path) -> None:
    """A client with 400 queued sequences and one with a single sequence share batches.

    With FIFO the single sequence would wait for the whole backlog (~400/8 = 50
    batches); with fair queueing it rides in the first batch formed after it arrives.
    """

    async def run() -> None:
        scheduler, backend, _ = await make(
            tiny_model_dir, delay_s=0.005, max_batch_size=8, max_batch_tokens=100_000
        )
        flood = [
            asyncio.create_task(scheduler.submit(random_item(16), "flooder")) for _ in range(400)
        ]
        await asyncio.sleep(0.05)  # the backlog is queued and batches are running
        batches_before = len(backend.batches)
        lone = random_item(16)
        await scheduler.submit(lone, "lone")
        batches_until_lone = len(backend.batches) - batches_before
        assert batches_until_lone <= 2, f"lone request waited {batches_until_lone} batches"
        assert not all(t.done() for t in flood), "backlog drained before the lone request"
        await asyncio.gather(*flood)
        await scheduler.close()
        await backend.close()

    asyncio.run(run())


def test_queue_bounds_refuse_with_retry_hint(tiny_model_dir: Path) -> None:
    async def run() -> None:
        scheduler, backend, metrics = await make(
            tiny_model_dir, delay_s=0.2, max_client_queued_tokens=100, max_queued_tokens=150
        )
        first = asyncio.create_task(scheduler.submit(random_item(10), "a"))
        await asyncio.sleep(0.02)  # first is computing (slow), the queue is empty again
        queued = [asyncio.create_task(scheduler.submit(random_item(45), "a")) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ServiceError) as client_full:
            await scheduler.submit(random_item(20), "a")
        assert client_full.value.kind is ErrorKind.RESOURCE_EXHAUSTED
        assert "max_client_queued_tokens=100" in client_full.value.message
        assert client_full.value.retry_after_s > 0
        other = [asyncio.create_task(scheduler.submit(random_item(50), "b"))]
        await asyncio.sleep(0)
        with pytest.raises(ServiceError) as total_full:
            await scheduler.submit(random_item(20), "c")
        assert "max_queued_tokens=150" in total_full.value.message
        await asyncio.gather(first, *queued, *other)
        rejected = metrics.registry.get_sample_value(
            "teacher_service_rejected_total", {"teacher": "t", "reason": "client_queue_full"}
        )
        assert rejected == 1
        await scheduler.close()
        await backend.close()

    asyncio.run(run())


def test_expired_deadline_and_cancelled_requests_are_never_computed(tiny_model_dir: Path) -> None:
    async def run() -> None:
        scheduler, backend, _ = await make(tiny_model_dir, delay_s=0.2)
        blocker = asyncio.create_task(scheduler.submit(random_item(8), "a"))
        await asyncio.sleep(0.02)  # the backend is busy for 0.2 s
        expired_item, cancelled_item, kept_item = random_item(9), random_item(10), random_item(11)
        expired = asyncio.create_task(
            scheduler.submit(expired_item, "b", deadline=time.monotonic() + 0.05)
        )
        cancelled = asyncio.create_task(scheduler.submit(cancelled_item, "c"))
        kept = asyncio.create_task(scheduler.submit(kept_item, "d"))
        await asyncio.sleep(0.01)
        assert scheduler.queue_depth == 3
        cancelled.cancel()
        await asyncio.sleep(0)
        assert scheduler.queue_depth == 2
        with pytest.raises(ServiceError) as err:
            await expired
        assert err.value.kind is ErrorKind.DEADLINE_EXCEEDED
        await asyncio.gather(blocker, kept)
        computed = [it for batch in backend.batches for it in batch]
        assert any(it is kept_item for it in computed)
        assert not any(it is expired_item or it is cancelled_item for it in computed)
        assert scheduler.queue_depth == 0 and scheduler.queued_tokens == 0
        await scheduler.close()
        await backend.close()

    asyncio.run(run())


def test_drain_refuses_new_work_but_finishes_queued(tiny_model_dir: Path) -> None:
    async def run() -> None:
        scheduler, backend, _ = await make(tiny_model_dir, delay_s=0.05)
        queued = [asyncio.create_task(scheduler.submit(random_item(12), "a")) for _ in range(5)]
        await asyncio.sleep(0)
        scheduler.drain()
        with pytest.raises(ServiceError) as err:
            await scheduler.submit(random_item(12), "b")
        assert err.value.kind is ErrorKind.UNAVAILABLE
        assert await scheduler.wait_idle(10.0)
        # Every queued request got its result (they were delivered before idle was set).
        results = await asyncio.wait_for(asyncio.gather(*queued), 0.5)
        assert all(isinstance(r, ScoreResult) for r in results)
        await scheduler.close()
        await backend.close()

    asyncio.run(run())


def test_metrics_follow_the_queue(tiny_model_dir: Path) -> None:
    async def run() -> None:
        scheduler, backend, metrics = await make(tiny_model_dir)
        items = [random_item(20) for _ in range(10)]
        await asyncio.gather(*(scheduler.submit(it, "x") for it in items))
        rows = sum(it.num_rows for it in items)
        get = metrics.registry.get_sample_value
        assert get("teacher_service_tokens_scored_total", {"teacher": "t"}) == rows
        assert get("teacher_service_client_tokens_total", {"client": "x"}) == rows
        assert get("teacher_service_batch_size_count", {"teacher": "t"}) == len(backend.batches)
        assert get("teacher_service_queue_depth", {"teacher": "t"}) == 0
        await scheduler.close()
        await backend.close()

    asyncio.run(run())


class RefusingBackend(RecordingBackend):
    """Refuses any batch holding an item with top_k == 3, as a backend refuses an item
    past a limit only it knows (the vLLM backend's full-row budget, say)."""

    async def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        if any(it.top_k == 3 for it in items):
            raise ServiceError(ErrorKind.INVALID_ARGUMENT, "top_k: 3 refused by this backend")
        return await super().score(items)


def test_an_item_the_backend_refuses_fails_alone(tiny_model_dir: Path) -> None:
    async def run() -> None:
        backend = RefusingBackend(TorchBackend(tiny_model_dir), delay_s=0.05)
        await backend.start()
        scheduler = Scheduler("t", backend, SchedulerConfig(max_wait_s=0.05), Metrics())
        await scheduler.start()
        good = [random_item(int(torch.randint(3, 30, ()).item())) for _ in range(6)]
        bad = random_item(12, top_k=3)
        tasks = [asyncio.create_task(scheduler.submit(it, f"c{i}")) for i, it in enumerate(good)]
        tasks.insert(3, asyncio.create_task(scheduler.submit(bad, "bad")))
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        refused = outcomes.pop(3)
        assert isinstance(refused, ServiceError) and "top_k: 3" in refused.message
        direct = await backend.inner.score(good)
        for got, want in zip(outcomes, direct, strict=True):
            assert isinstance(got, ScoreResult)
            assert_same_topk(got.topk_ids, got.topk_logprobs, want.topk_ids, want.topk_logprobs)
        await scheduler.close()
        await backend.close()

    asyncio.run(run())


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_batch_tokens"):
        SchedulerConfig(max_batch_tokens=0)
    with pytest.raises(ValueError, match="max_wait_s"):
        SchedulerConfig(max_wait_s=-1)


# Two heavy clients with unequal demand: "short" queues many short sequences, "long"
# fewer, longer ones (more tokens in all). While both have work queued, deficit round
# robin gives each the same number of tokens, so short's share of the scheduled tokens
# must stay within FAIR_BAND. (A scheduler that lets each client fill a whole batch per
# turn gives short 128 of every 128 + 384 tokens: a share of 0.25.)
FAIR_BAND = (0.4, 0.6)


def test_two_heavy_clients_of_unequal_demand_get_equal_token_shares(tiny_model_dir: Path) -> None:
    async def run() -> list[tuple[int, int]]:
        scheduler, backend, _ = await make(
            tiny_model_dir,
            max_batch_size=8,
            max_batch_tokens=100_000,
            quantum_tokens=64,
            max_wait_s=0.05,
        )
        owner: dict[int, str] = {}
        tasks = []
        for client, count, length in (("short", 240, 16), ("long", 120, 48)):
            for _ in range(count):
                item = random_item(length)
                owner[id(item)] = client
                tasks.append(asyncio.create_task(scheduler.submit(item, client)))
        await asyncio.gather(*tasks)
        await scheduler.close()
        await backend.close()
        per_batch = []
        for batch in backend.batches:
            short = sum(it.length for it in batch if owner[id(it)] == "short")
            long = sum(it.length for it in batch if owner[id(it)] == "long")
            per_batch.append((short, long))
        return per_batch

    per_batch = asyncio.run(run())
    # Batches formed while both clients still had work queued: up to the one that took
    # either client's last sequence.
    totals = {"short": 240 * 16, "long": 120 * 48}
    taken = {"short": 0, "long": 0}
    contested = []
    for short, long in per_batch:
        contested.append((short, long))
        taken["short"] += short
        taken["long"] += long
        if taken["short"] == totals["short"] or taken["long"] == totals["long"]:
            break
    short_tokens = sum(s for s, _ in contested)
    share = short_tokens / sum(s + lg for s, lg in contested)
    print(f"short's token share {share:.3f} over {len(contested)} contested batches")
    assert len(contested) >= 10
    assert FAIR_BAND[0] <= share <= FAIR_BAND[1], share
