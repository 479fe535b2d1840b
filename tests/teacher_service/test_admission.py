"""Admission over real gRPC: full queues give RESOURCE_EXHAUSTED with a retry hint, and
the call deadline reaches the scheduler (a sequence that expires in the queue is
dropped uncomputed and answered DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from teacher_service.server import ThreadedServer
from tests.teacher_service.conftest import TINY_VOCAB, start_thread_server
from tests.teacher_service.wire import make_request, stub

LENGTH = 128


@pytest.fixture(scope="module")
def tight_server(tiny_model_dir: Path) -> Iterator[ThreadedServer]:
    """Batches of 2 sequences; a client may queue at most 20 sequences of 128 tokens."""
    server = start_thread_server(
        ("tiny", tiny_model_dir),
        max_batch_tokens=2 * LENGTH,
        max_batch_size=2,
        max_client_queued_tokens=20 * LENGTH,
    )
    try:
        yield server
    finally:
        server.stop()


def _requests(n: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [
        make_request(torch.randint(0, TINY_VOCAB, (LENGTH,), generator=gen), LENGTH - 8, 2,
                     request_id=str(i))
        for i in range(n)
    ]  # fmt: skip


def test_full_client_queue_is_resource_exhausted_with_retry_hint(
    tight_server: ThreadedServer,
) -> None:
    channel, client = stub(tight_server.address)
    metadata = (("x-client-id", "greedy"),)
    seed = int(time.time())
    print(f"seed={seed}")  # shown when the test fails
    with channel:
        responses = list(client.ScoreStream(iter(_requests(300, seed)), metadata=metadata))
    assert len(responses) == 300
    refused = [r.error for r in responses if r.WhichOneof("outcome") == "error"]
    served = [r for r in responses if r.WhichOneof("outcome") == "result"]
    assert refused and served
    for error in refused:
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "max_client_queued_tokens" in error.message
        assert error.retry_after_ms > 0


def test_unary_refusal_carries_retry_after_metadata(tight_server: ThreadedServer) -> None:
    channel, client = stub(tight_server.address)
    metadata = (("x-client-id", "impatient"),)
    with channel:
        # 200 calls at once from one client: ten times its queue bound.
        calls = [client.Score.future(r, metadata=metadata) for r in _requests(200, 6)]
        codes = []
        for call in calls:
            try:
                call.result(timeout=120)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
                trailing = dict(error.trailing_metadata() or ())
                assert int(trailing["retry-after-ms"]) > 0
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes


def test_call_deadline_drops_the_sequence_in_the_queue(tiny_model_dir: Path) -> None:
    server = start_thread_server(("tiny", tiny_model_dir), max_batch_tokens=2 * LENGTH)
    try:
        _deadline_case(server)
    finally:
        server.stop()


def _deadline_case(server: ThreadedServer) -> None:
    registry = server.metrics.registry

    def dropped() -> float:
        # The server cancels the call at its deadline (reason "cancelled"), or the
        # scheduler finds it expired when forming a batch (reason "deadline").
        return sum(
            registry.get_sample_value(
                "teacher_service_rejected_total", {"teacher": "tiny", "reason": reason}
            )
            or 0.0
            for reason in ("deadline", "cancelled")
        )

    before = dropped()
    channel, client = stub(server.address)
    metadata = (("x-client-id", "late"),)
    depth = {"teacher": "tiny"}
    with channel:
        # A backlog of this client's own sequences ahead (served first-in first-out
        # within one client), then one with a deadline far shorter than the backlog.
        ahead = client.ScoreStream(iter(_requests(400, 7)), metadata=metadata)
        give_up = time.monotonic() + 30
        while (registry.get_sample_value("teacher_service_queue_depth", depth) or 0) < 300:
            assert time.monotonic() < give_up, "the backlog never queued"
            time.sleep(0.002)
        with pytest.raises(grpc.RpcError) as caught:
            client.Score(_requests(1, 8)[0], metadata=metadata, timeout=0.1)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert sum(r.WhichOneof("outcome") == "result" for r in ahead) == 400
    deadline = time.monotonic() + 10
    while dropped() <= before:
        # Dropped uncomputed by the scheduler (not only timed out at the client).
        assert time.monotonic() < deadline, "the expired sequence was not dropped"
        time.sleep(0.01)


def test_cancelled_stream_leaves_the_queue(tiny_model_dir: Path) -> None:
    server = start_thread_server(("tiny", tiny_model_dir), max_batch_tokens=2 * LENGTH)
    registry = server.metrics.registry
    depth = {"teacher": "tiny"}
    cancelled = {"teacher": "tiny", "reason": "cancelled"}
    try:
        channel, client = stub(server.address)
        with channel:
            call = client.ScoreStream(
                iter(_requests(400, 9)), metadata=(("x-client-id", "quitter"),)
            )
            give_up = time.monotonic() + 30
            while (registry.get_sample_value("teacher_service_queue_depth", depth) or 0) < 300:
                assert time.monotonic() < give_up, "the backlog never queued"
                time.sleep(0.002)
            scored_before = registry.get_sample_value("teacher_service_tokens_scored_total", depth)
            call.cancel()
            while (registry.get_sample_value("teacher_service_queue_depth", depth) or 0) > 0:
                assert time.monotonic() < give_up, "cancelled sequences stayed queued"
                time.sleep(0.002)
        assert (registry.get_sample_value("teacher_service_rejected_total", cancelled) or 0) >= 250
        # At most the batches already running finished after the cancel.
        scored_after = registry.get_sample_value("teacher_service_tokens_scored_total", depth)
        assert (scored_after or 0) - (scored_before or 0) <= 4 * 8
    finally:
        server.stop()
