"""Drain and shutdown: readiness false, new work refused with UNAVAILABLE (with a retry
hint), accepted work finished, exit 0 — in process and with a real SIGTERM'd process.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from teacher_service.v1 import teacher_pb2 as pb
from tests.teacher_service.conftest import TINY_VOCAB, start_thread_server
from tests.teacher_service.wire import make_request, stub

REPO = Path(__file__).resolve().parents[2]
LENGTH = 128


class OpenStream:
    """A ScoreStream whose requests the test feeds one by one; answers collected."""

    def __init__(self, client, client_id: str) -> None:
        self._requests: queue.Queue[pb.ScoreRequest | None] = queue.Queue()
        self.responses: list[pb.ScoreStreamResponse] = []
        self.first = threading.Event()
        self.error: grpc.RpcError | None = None
        self._call = client.ScoreStream(self._iter(), metadata=(("x-client-id", client_id),))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _iter(self) -> Iterator[pb.ScoreRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def _read(self) -> None:
        try:
            for response in self._call:
                self.responses.append(response)
                self.first.set()
        except grpc.RpcError as error:
            self.error = error

    def send(self, request: pb.ScoreRequest) -> None:
        self._requests.put(request)

    def answer_to(self, request_id: str, timeout: float = 30) -> pb.ScoreStreamResponse:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for response in list(self.responses):
                if response.request_id == request_id:
                    return response
            time.sleep(0.005)
        raise AssertionError(f"no answer to {request_id}")

    def close(self, timeout: float = 60) -> None:
        self._requests.put(None)
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the stream's reader still runs after {timeout} s"


def backlog(stream: OpenStream, n: int, seed: int) -> None:
    print(f"backlog seed={seed}")  # shown when the test fails
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        ids = torch.randint(0, TINY_VOCAB, (LENGTH,), generator=gen)
        stream.send(make_request(ids, LENGTH // 2, 4, request_id=f"b{i}"))


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        return check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def assert_refused_while_draining(address: str, stream: OpenStream) -> None:
    """A new Score and a new stream request both get UNAVAILABLE with a retry hint."""
    probe = make_request(torch.randint(0, TINY_VOCAB, (8,)), 4, 2, request_id="late")
    channel, client = stub(address)
    with channel, pytest.raises(grpc.RpcError) as caught:
        client.Score(probe, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    trailing = dict(caught.value.trailing_metadata() or ())
    assert "draining" in caught.value.details(), caught.value.details()
    assert int(trailing["retry-after-ms"]) > 0
    stream.send(probe)
    refused = stream.answer_to("late")
    assert refused.WhichOneof("outcome") == "error"
    assert refused.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert refused.error.retry_after_ms > 0


def assert_backlog_answered(stream: OpenStream, n: int, answered_at_drain: int) -> int:
    """Every backlog sequence got one answer: a result, or (if it reached the server
    after the drain began) UNAVAILABLE; work went on after the drain. Returns #results.
    """
    answers = {r.request_id: r for r in stream.responses if r.request_id.startswith("b")}
    assert len(answers) == n == sum(r.request_id.startswith("b") for r in stream.responses)
    results = 0
    for response in answers.values():
        if response.WhichOneof("outcome") == "result":
            results += 1
        else:
            assert response.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
            assert "draining" in response.error.message
    assert results > answered_at_drain, (results, answered_at_drain)
    return results


def test_drain_refuses_new_work_and_finishes_accepted_work(tiny_model_dir: Path) -> None:
    server = start_thread_server(("tiny", tiny_model_dir), max_batch_tokens=256, max_batch_size=2)
    http = f"http://127.0.0.1:{server.http_port}"
    channel, client = stub(server.address)
    n = 150
    with channel:
        assert httpx.get(f"{http}/readyz").status_code == 200
        assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
        stream = OpenStream(client, "trainer")
        backlog(stream, n, seed=int(time.time()))
        assert stream.first.wait(30)
        servicer = server.server.servicer
        deadline = time.monotonic() + 30
        while servicer.inflight + len(stream.responses) < n:  # all n reached the server
            assert time.monotonic() < deadline
            time.sleep(0.001)
        answered_at_drain = len(stream.responses)
        server.begin_drain()
        ready = httpx.get(f"{http}/readyz")
        assert ready.status_code == 503 and "draining" in ready.text
        assert httpx.get(f"{http}/healthz").status_code == 200  # still alive
        assert health_status(server.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert server.metrics.registry.get_sample_value("teacher_service_ready") == 0
        assert_refused_while_draining(server.address, stream)
        server.stop(grace_s=60)
        stream.close()
    # Everything had been accepted before the drain, so everything has a result.
    assert assert_backlog_answered(stream, n, answered_at_drain) == n


@pytest.mark.timeout(180)
def test_sigterm_drains_and_exits_zero(tiny_model_dir: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "teacher_service.server",
        "--model",
        f"tiny={tiny_model_dir}",
        "--host",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--grace-seconds",
        "60",
        "--max-batch-tokens",
        "128",
        "--max-batch-size",
        "1",
        "--torch-threads",
        "1",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    try:
        http_port = int(_wait_for(proc, log, r"HTTP side port on [\d.]+:(\d+)"))
        # The side port answers while the model loads: alive, not ready.
        loading = httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=5)
        assert loading.status_code == 503, loading.text
        grpc_port = int(_wait_for(proc, log, r"serving grpc_port=(\d+)"))
        threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
        address = f"127.0.0.1:{grpc_port}"
        assert httpx.get(f"http://127.0.0.1:{http_port}/readyz").status_code == 200
        channel, client = stub(address)
        n = 1000  # seconds of work at one sequence per batch
        with channel:
            stream = OpenStream(client, "trainer")
            backlog(stream, n, seed=int(time.time()))
            assert stream.first.wait(30)
            answered_at_drain = len(stream.responses)
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while httpx.get(f"http://127.0.0.1:{http_port}/readyz").status_code != 503:
                assert time.monotonic() < deadline, "readiness never went false"
                time.sleep(0.01)
            assert len(stream.responses) < n, "backlog finished before the checks"
            assert_refused_while_draining(address, stream)
            stream.close()
        assert proc.wait(timeout=90) == 0, "".join(log[-20:])
        assert stream.error is None, stream.error
        assert_backlog_answered(stream, n, answered_at_drain)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_for(proc: subprocess.Popen, log: list[str], pattern: str, timeout: float = 120) -> str:
    """Reads the server's stderr until a line matches; returns the first group."""
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"server exited early: {''.join(log[-20:])}")
        log.append(line)
        match = re.search(pattern, line)
        if match:
            return match.group(1)
    raise AssertionError(f"no line matching {pattern!r}")
