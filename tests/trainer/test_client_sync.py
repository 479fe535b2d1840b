"""The synchronous facade: `submit` returns at once, scoring overlaps the caller's own
work with several sequences in flight on the server; plus the async core used directly."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.trainer.client_fixtures import (  # noqa: F401
    VOCAB,
    model_dir,
    random_specs,
    server,
    thread_server,
)
from trainer.client import AsyncTeacherClient, ClientConfig, TeacherClient, TeacherError


class InFlightSampler:
    """Polls the server's count of accepted, unanswered sequences; keeps the maximum."""

    def __init__(self, srv: object) -> None:
        self._srv = srv
        self.max = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max = max(self.max, self._srv.server.servicer.inflight)
            time.sleep(0.0005)

    def __enter__(self) -> InFlightSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _student_work(seconds: float) -> None:
    """Stands in for sampling: busy CPU work on the caller's thread."""
    end = time.monotonic() + seconds
    a = torch.randn(64, 64)
    while time.monotonic() < end:
        a = torch.tanh(a @ a)


def test_submit_overlaps_scoring_with_the_rollout_loop(
    server: object,  # noqa: F811
    gen: torch.Generator,
) -> None:
    groups, group_size = 6, 8  # G rollouts of a prompt finish together
    specs = random_specs(gen, groups * group_size, max_len=48)
    futures = []
    done_while_sampling = 0
    with TeacherClient(ClientConfig(endpoints=(server.address,))) as client:
        client.connect(vocab_size=VOCAB)
        with InFlightSampler(server) as sampler:
            for g in range(groups):
                _student_work(0.03)  # sample the next group
                # Earlier groups are scored while this one is sampled. Under load that may
                # take longer than 0.03 s, so the work goes on (up to 30 s) until one is
                # done; a client that only scored inside result() would never get there.
                deadline = time.monotonic() + 30
                while g and not any(f.done() for f in futures) and time.monotonic() < deadline:
                    _student_work(0.01)
                done_while_sampling = max(done_while_sampling, sum(f.done() for f in futures))
                for spec in specs[g * group_size : (g + 1) * group_size]:
                    futures.append(client.submit(spec))  # returns at once: see below
            _student_work(0.03)  # e.g. the student's own forward
            results = [f.result(timeout=60) for f in futures]
    assert done_while_sampling >= 1, "no scoring happened while the caller worked"
    assert sampler.max >= 2, "submissions never overlapped on the server"
    assert [r.request_id for r in results] == [s.request_id for s in specs]


def test_submit_returns_before_its_sequence_can_be_scored(
    model_dir: Path,  # noqa: F811
    gen: torch.Generator,
) -> None:
    """Event-based, no timing: the server forms a batch only once N sequences are queued
    (max_wait 60 s), so none of the first N - 1 can be answered, yet each submit
    returns; the N-th fills the batch and every future resolves."""
    n = 8
    srv = thread_server(model_dir, max_batch_size=n, max_wait_s=60.0)
    specs = random_specs(gen, n, max_len=32)
    try:
        with TeacherClient(ClientConfig(endpoints=(srv.address,))) as client:
            client.connect(vocab_size=VOCAB)
            futures = [client.submit(spec) for spec in specs[:-1]]
            deadline = time.monotonic() + 30
            while srv.server.servicer.inflight < n - 1:  # every one reached the server
                assert time.monotonic() < deadline, "the submitted sequences never arrived"
                time.sleep(0.005)
            assert not any(f.done() for f in futures)
            futures.append(client.submit(specs[-1]))
            results = [f.result(timeout=60) for f in futures]
    finally:
        srv.stop()
    assert [r.request_id for r in results] == [s.request_id for s in specs]


@pytest.mark.parametrize("target", ["host:port", "dns:///localhost:port"])
def test_async_client_scores_with_a_given_request_id(
    server: object,  # noqa: F811
    gen: torch.Generator,
    target: str,
) -> None:
    spec = random_specs(gen, 1, top_k=5)[0]
    endpoint = server.address if target == "host:port" else f"dns:///localhost:{server.grpc_port}"

    async def run() -> object:
        async with AsyncTeacherClient(ClientConfig(endpoints=(endpoint,))) as client:
            await client.connect(vocab_size=VOCAB)  # also works without: score connects
            return await client.score(spec.token_ids, spec.start, 5, request_id="my-id")

    scores = asyncio.run(run())
    rows = spec.token_ids.shape[0] - spec.start
    # A dns:/// name is resolved by the client: the result names the replica's address
    # (the server listens on 127.0.0.1 only, so a ::1 from "localhost" would fail over).
    assert scores.request_id == "my-id" and scores.endpoint == server.address
    assert scores.topk_ids.shape == (rows, 5) and scores.topk_ids.dtype == torch.int64
    assert scores.token_logprobs.shape == (rows,)
    assert scores.query_logprobs is None


def test_closed_client_refuses_work(server: object, gen: torch.Generator) -> None:  # noqa: F811
    client = TeacherClient(ClientConfig(endpoints=(server.address,)))
    client.close()
    client.close()  # idempotent
    with pytest.raises(TeacherError, match="closed"):
        client.submit(random_specs(gen, 1)[0])


def test_malformed_spec_fails_before_the_network() -> None:
    # Nothing listens on port 1: reaching the network would raise TeacherUnavailableError.
    config = ClientConfig(endpoints=("127.0.0.1:1",), max_retries=0)
    with (
        TeacherClient(config) as client,
        pytest.raises(ValueError, match=r"start: must be in \[1, L - 1\] = \[1, 9\], got 10"),
    ):
        client.score(torch.arange(10), 10, 4)


def test_close_resolves_every_outstanding_future(
    model_dir: Path,  # noqa: F811
    gen: torch.Generator,
) -> None:
    srv = thread_server(model_dir)
    config = ClientConfig(
        endpoints=(srv.address,), max_retries=1000, backoff_base_s=0.5, backoff_max_s=0.5
    )
    client = TeacherClient(config)
    client.connect()
    srv.stop()  # every attempt now fails; requests sit in backoff
    futures = [client.submit(spec) for spec in random_specs(gen, 20)]
    time.sleep(0.3)
    closer = threading.Thread(target=client.close)
    closer.start()
    closer.join(timeout=30)
    assert not closer.is_alive(), "close() hung"
    done, not_done = concurrent.futures.wait(futures, timeout=10)
    assert not not_done
    for future in done:
        assert future.cancelled() or isinstance(future.exception(), TeacherError)
