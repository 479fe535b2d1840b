"""Retries against a real server: RESOURCE_EXHAUSTED is retried until it succeeds, a
request error is raised at once, and a request stuck behind a backlog hits its deadline."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
import torch

from tests.trainer.client_fixtures import (  # noqa: F401
    VOCAB,
    ReferenceModel,
    assert_matches_reference,
    model_dir,
    random_specs,
    server,
    thread_server,
)
from trainer.client import (
    AsyncTeacherClient,
    ClientConfig,
    TeacherClient,
    TeacherDeadlineError,
    TeacherRequestError,
    TeacherUnavailableError,
)


def _rejected(srv: object, reason: str) -> float:
    value = srv.metrics.registry.get_sample_value(
        "teacher_service_rejected_total", {"teacher": "teacher", "reason": reason}
    )
    return value or 0.0


def _wait_for_backlog(srv: object, sequences: int, timeout_s: float = 60.0) -> None:
    """Blocks until the server holds `sequences` accepted, unanswered sequences."""
    deadline = time.monotonic() + timeout_s
    while srv.server.servicer.inflight < sequences:
        assert time.monotonic() < deadline, "the backlog never built up on the server"
        time.sleep(0.002)


def test_resource_exhausted_is_retried_until_every_sequence_is_scored(
    model_dir: Path,  # noqa: F811
    gen: torch.Generator,
) -> None:
    # Room for one queued sequence per client: concurrent submissions get refused.
    srv = thread_server(model_dir, max_client_queued_tokens=64)
    specs = random_specs(gen, 16, min_len=40, max_len=60)
    try:
        config = ClientConfig(
            endpoints=(srv.address,), max_retries=200, backoff_base_s=0.01, backoff_max_s=0.1
        )
        with TeacherClient(config) as client:
            client.connect(vocab_size=VOCAB)
            results = client.score_batch(specs)
        rejected = _rejected(srv, "client_queue_full")
    finally:
        srv.stop()
    assert rejected >= 1, "the server never refused: retries were not exercised"
    assert [r.request_id for r in results] == [s.request_id for s in specs]
    reference = ReferenceModel(model_dir)
    for result, spec, rows in zip(results, specs, reference.rows_many(specs), strict=True):
        assert_matches_reference(result, spec, rows)


def test_resource_exhausted_without_retries_raises_with_the_servers_reason(
    model_dir: Path,  # noqa: F811
    gen: torch.Generator,
) -> None:
    srv = thread_server(model_dir, max_client_queued_tokens=64)
    try:
        config = ClientConfig(endpoints=(srv.address,), max_retries=0)
        with TeacherClient(config) as client:
            client.connect(vocab_size=VOCAB)
            futures = [client.submit(s) for s in random_specs(gen, 8, min_len=40, max_len=60)]
            errors = [f.exception(timeout=30) for f in futures]
    finally:
        srv.stop()
    refused = [e for e in errors if e is not None]
    assert refused, "no request was refused"
    for error in refused:
        assert isinstance(error, TeacherUnavailableError)
        assert "RESOURCE_EXHAUSTED: client queue is full" in str(error)


def test_invalid_request_raises_at_once_naming_the_field(
    server: object,  # noqa: F811
    gen: torch.Generator,
) -> None:
    spec = random_specs(gen, 1, top_k=65)[0]  # the server's max_top_k is 64
    with TeacherClient(ClientConfig(endpoints=(server.address,))) as client:
        client.connect()
        with pytest.raises(TeacherRequestError, match="top_k") as error:
            client.submit(spec).result(timeout=30)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    refusals = server.metrics.registry.get_sample_value(
        "teacher_service_requests_total", {"method": "ScoreStream", "code": "INVALID_ARGUMENT"}
    )
    assert refusals == 1  # not retried


def test_request_behind_a_backlog_hits_its_deadline(
    model_dir: Path,  # noqa: F811
    gen: torch.Generator,
) -> None:
    srv = thread_server(model_dir, max_batch_size=1)
    backlog = random_specs(gen, 300, min_len=200, max_len=250)
    try:
        # Same client id: the late request queues behind the backlog (FIFO per client).
        busy = TeacherClient(ClientConfig(endpoints=(srv.address,), client_id="job"))
        late = TeacherClient(ClientConfig(endpoints=(srv.address,), client_id="job",
                                          deadline_s=0.05))  # fmt: skip
        with busy, late:
            busy.connect()
            late.connect()
            futures = [busy.submit(s) for s in backlog]
            _wait_for_backlog(srv, 150)
            started = time.monotonic()
            with pytest.raises(TeacherDeadlineError, match=r"within the deadline of 0\.05 s"):
                late.submit(random_specs(gen, 1)[0]).result(timeout=30)
            elapsed = time.monotonic() - started
            # The late request queued behind this backlog (same client, FIFO): an answer
            # that waited its turn instead of honouring the deadline would come after
            # every one of these futures.
            assert not all(f.done() for f in futures), "the backlog drained too fast"
            for f in futures:
                f.cancel()
    finally:
        srv.stop()
    assert elapsed >= 0.05  # not before the deadline


def test_abandoned_request_id_resubmitted_on_the_same_stream_is_not_sent_twice(
    model_dir: Path,  # noqa: F811
    gen: torch.Generator,
) -> None:
    srv = thread_server(model_dir, max_batch_size=1)
    backlog = random_specs(gen, 200, min_len=200, max_len=250)
    spec = random_specs(gen, 1)[0]

    async def run() -> tuple[object, bool]:
        async with AsyncTeacherClient(ClientConfig(endpoints=(srv.address,))) as client:
            await client.connect()
            tasks = [asyncio.ensure_future(client.score_spec(s)) for s in backlog]
            await asyncio.to_thread(_wait_for_backlog, srv, 100)
            # Give up on the request while it is queued behind the backlog ...
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.score_spec(spec), 0.05)
            # ... and ask again with the same id while the first copy is still in flight.
            first_copy_in_flight = client._streams[srv.address].waiting_for(spec.request_id)
            scores = await client.score_spec(spec)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return scores, first_copy_in_flight

    try:
        scores, first_copy_in_flight = asyncio.run(run())
        duplicates = srv.metrics.registry.get_sample_value(
            "teacher_service_requests_total",
            {"method": "ScoreStream", "code": "INVALID_ARGUMENT"},
        )
    finally:
        srv.stop()
    assert first_copy_in_flight, "the first copy was answered before the retry: nothing shown"
    assert not duplicates  # the server never saw the id twice in flight
    assert scores.request_id == spec.request_id
    reference = ReferenceModel(model_dir)
    assert_matches_reference(scores, spec, reference.rows(spec))
