"""Many clients at once over real gRPC: each gets its own correct rows, and a client
with a huge backlog cannot starve one that sends a single sequence at a time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from teacher_service.codec import decode_result
from teacher_service.server import ThreadedServer
from tests.teacher_service.conftest import TINY_VOCAB, start_thread_server
from tests.teacher_service.wire import Reference, make_request, random_sequence, stub

CLIENTS = 32
PER_CLIENT = 3
FLOOD_AHEAD = 4  # backend batches a solo sequence may wait behind under fair queueing


def test_concurrent_clients_each_get_their_own_rows(
    tiny_server: ThreadedServer, tiny_model_dir: Path
) -> None:
    seed = int(time.time())
    print(f"seed={seed}")  # shown when the test fails
    gen = torch.Generator().manual_seed(seed)
    ref = Reference.load(tiny_model_dir)
    work = []  # per client: [(ids, start, top_k, expected token log-probs, reference rows)]
    for _ in range(CLIENTS):
        mine = []
        for _ in range(PER_CLIENT):
            ids, start = random_sequence(gen, TINY_VOCAB, max_len=96)
            logp = ref.logprobs(ids, start)
            k = int(torch.randint(1, 17, (1,), generator=gen))
            mine.append((ids, start, k, logp.gather(1, ids[start:, None])[:, 0], logp))
        work.append(mine)
    barrier = threading.Barrier(CLIENTS)
    failures: list[str] = []
    batches_before = (
        tiny_server.metrics.registry.get_sample_value(
            "teacher_service_batch_size_count", {"teacher": "tiny"}
        )
        or 0.0
    )

    def client(index: int) -> None:
        channel, stub_ = stub(tiny_server.address)
        metadata = (("x-client-id", f"client-{index}"),)
        with channel:
            barrier.wait()
            try:
                if index % 2:  # half use Score, half one ScoreStream
                    responses = [
                        stub_.Score(make_request(ids, s, k, request_id=str(j)), metadata=metadata)
                        for j, (ids, s, k, _, _) in enumerate(work[index])
                    ]
                else:
                    requests = [
                        make_request(ids, s, k, request_id=str(j))
                        for j, (ids, s, k, _, _) in enumerate(work[index])
                    ]
                    stream = stub_.ScoreStream(iter(requests), metadata=metadata)
                    responses = [r.result for r in stream]
                assert len(responses) == PER_CLIENT
                for response in responses:
                    ids, start, k, token_lp, logp = work[index][int(response.request_id)]
                    got = decode_result(response)
                    assert got.topk_ids.shape == (ids.shape[0] - start, k)
                    torch.testing.assert_close(got.token_logprobs, token_lp, atol=1e-5, rtol=1e-5)
                    # The top-1 is the row's maximum. Batched with other clients' rows, a near-tie
                    # (within float32 rounding) may name either id, so check the value at the id.
                    top1 = logp.max(1).values
                    torch.testing.assert_close(got.topk_logprobs[:, 0], top1, atol=1e-5, rtol=1e-5)
                    at_id = logp.gather(1, got.topk_ids[:, :1].long())[:, 0]
                    torch.testing.assert_close(at_id, top1, atol=1e-5, rtol=1e-5)
            except Exception as exc:  # collected: assertion errors in threads are silent
                failures.append(f"client {index}: {exc!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"clients still running after 120 s: {hung}"
    assert not failures, failures[:3]
    registry = tiny_server.metrics.registry
    batches = (
        registry.get_sample_value("teacher_service_batch_size_count", {"teacher": "tiny"}) or 0.0
    ) - batches_before
    # Cross-client batching happened: fewer backend batches than sequences.
    assert 0 < batches < CLIENTS * PER_CLIENT


@pytest.fixture(scope="module")
def small_batch_server(tiny_model_dir: Path) -> Iterator[ThreadedServer]:
    """Small batches, so that a backlog takes hundreds of backend calls to drain."""
    server = start_thread_server(("tiny", tiny_model_dir), max_batch_tokens=256, max_batch_size=4)
    try:
        yield server
    finally:
        server.stop()


def test_flooding_client_cannot_starve_a_single_sequence_client(
    small_batch_server: ThreadedServer,
) -> None:
    server = small_batch_server
    seed = int(time.time()) + 1
    print(f"seed={seed}")  # shown when the test fails
    gen = torch.Generator().manual_seed(seed)
    flood_n, length = 800, 128
    flood = [
        make_request(
            torch.randint(0, TINY_VOCAB, (length,), generator=gen), 64, 4, request_id=str(i)
        )
        for i in range(flood_n)
    ]
    done = {"flood": 0}
    flood_finished = threading.Event()

    def flooder() -> None:
        channel, client = stub(server.address)
        with channel:
            stream = client.ScoreStream(iter(flood), metadata=(("x-client-id", "flood"),))
            for response in stream:
                assert response.WhichOneof("outcome") == "result", response.error
                done["flood"] += 1
        flood_finished.set()

    thread = threading.Thread(target=flooder)
    flood_started = time.monotonic()
    thread.start()
    registry = server.metrics.registry
    # Wait until the backlog is really queued.
    deadline = time.monotonic() + 30
    depth = {"teacher": "tiny"}
    while (registry.get_sample_value("teacher_service_queue_depth", depth) or 0) < 200:
        assert time.monotonic() < deadline, "flood never queued up"
        time.sleep(0.005)

    latencies, flood_during_solo, flood_done_when_solo_answered = [], [], []
    channel, client = stub(server.address)
    with channel:
        for _ in range(5):
            ids = torch.randint(0, TINY_VOCAB, (length,), generator=gen)
            t0, flood_before = time.monotonic(), done["flood"]
            client.Score(make_request(ids, 64, 4), metadata=(("x-client-id", "solo"),))
            latencies.append(time.monotonic() - t0)
            flood_during_solo.append(done["flood"] - flood_before)
            flood_done_when_solo_answered.append(done["flood"])
    thread.join(timeout=120)
    assert not thread.is_alive(), "the flood client still runs 120 s later"
    assert flood_finished.is_set() and done["flood"] == flood_n
    flood_s = time.monotonic() - flood_started
    print(
        f"solo latencies {[round(x * 1000, 1) for x in latencies]} ms; flood of "
        f"{flood_n} took {flood_s:.2f}s; flood answers during each solo call: "
        f"{flood_during_solo}; flood answered at solo answers: "
        f"{flood_done_when_solo_answered}"
    )
    # Counted in answers, not seconds. Under FIFO the first solo sequence would wait for
    # the whole backlog (hundreds of flood answers). Fair queueing puts it in the next
    # batch formed: at most the batches computing or formed when it arrived finish
    # first (FLOOD_AHEAD batches of 4), and all five are answered while most of the
    # flood is still queued.
    assert max(flood_during_solo) <= FLOOD_AHEAD * 4, flood_during_solo
    assert flood_done_when_solo_answered[-1] < flood_n // 2
