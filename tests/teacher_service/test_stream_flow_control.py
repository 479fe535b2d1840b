"""A ScoreStream whose client stops reading cannot take the server's memory.

The server holds at most --max-stream-buffer-bytes per stream (requests read, answers
not yet sent) and then stops reading that stream's requests (stream.py). Checked on a
real server process: a client sends 2,400 requests whose answers total ~310 MiB and
reads none; the server's RSS stays within BUFFER + SLACK of its warmed-up size, the
stream is reported paused, and once the stalled stream's accepted work is done another
client's throughput is at least THROUGHPUT_SHARE of what it was alone. In process:
every answer arrives, correct, however small the buffer (a request bigger than the
buffer still runs, alone).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from teacher_service.codec import decode_result
from tests.teacher_service.conftest import TINY_VOCAB, start_thread_server
from tests.teacher_service.wire import Reference, make_request, random_sequence, stub

REPO = Path(__file__).resolve().parents[2]
LENGTH, TOP_K = 256, 64  # an answer: 255 rows x 64 x (int32 id + float32) = 130 KB
STALLED_REQUESTS = 2400  # ~310 MiB of answers if the server buffered them all
BUFFER = 16 * 1024 * 1024  # --max-stream-buffer-bytes of the server under test
SLACK = 48 * 1024 * 1024  # allocator and gRPC transport buffers on top of BUFFER
THROUGHPUT_SHARE = 0.4
MAX_STALLED_TAKEN = 400  # of the stalled client's 2,400 requests, at most this many are read
PROBE_CALLS = 24


def _request(gen: torch.Generator, request_id: str = ""):
    ids = torch.randint(0, TINY_VOCAB, (LENGTH,), generator=gen)
    return make_request(ids, 1, TOP_K, request_id=request_id)


def _rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def _metric(http_port: int, name: str, labels: dict[str, str] | None = None) -> float:
    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            wanted = (labels or {}).items()
            if sample.name == name and all(sample.labels.get(k) == v for k, v in wanted):
                return sample.value
    return 0.0


@pytest.fixture
def server_process(tiny_model_dir: Path) -> Iterator[tuple[subprocess.Popen, str, int]]:
    command = [
        sys.executable, "-m", "teacher_service.server", "--model", f"tiny={tiny_model_dir}",
        "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--grace-seconds", "0",
        "--torch-threads", "1", "--max-batch-tokens", str(8 * LENGTH),
        "--max-stream-buffer-bytes", str(BUFFER),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            match = re.search(r"serving grpc_port=(\d+) http_port=(\d+)", line)
            if match:
                break
        else:
            raise AssertionError(f"server exited early: {''.join(log[-20:])}")
        threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
        yield proc, f"127.0.0.1:{match.group(1)}", int(match.group(2))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _probe_throughput(address: str, gen: torch.Generator) -> float:
    """Sequences per second of PROBE_CALLS sequential Score calls from client 'probe'."""
    requests = [_request(gen) for _ in range(PROBE_CALLS)]
    channel, client = stub(address)
    with channel:
        started = time.perf_counter()
        for request in requests:
            client.Score(request, metadata=(("x-client-id", "probe"),), timeout=60)
        return PROBE_CALLS / (time.perf_counter() - started)


def _wait_until_quiet(http_port: int, timeout: float = 60) -> None:
    """Until nothing is queued and no batch delivered rows across two scrapes 0.3 s apart."""
    deadline = time.monotonic() + timeout
    last = -1.0
    while time.monotonic() < deadline:
        scored = _metric(http_port, "teacher_service_tokens_scored_total", {"teacher": "tiny"})
        depth = _metric(http_port, "teacher_service_queue_depth", {"teacher": "tiny"})
        if depth == 0 and scored == last:
            return
        last = scored
        time.sleep(0.3)
    raise AssertionError("the server never went quiet")


class _RssSampler(threading.Thread):
    """Records the peak RSS of a process until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self._pid = pid
        self.peak = _rss(pid)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, _rss(self._pid))


@pytest.mark.timeout(300)
def test_a_stalled_stream_is_bounded_and_others_keep_their_throughput(server_process) -> None:
    proc, address, http_port = server_process
    seed = int(torch.randint(0, 10_000, ()))
    print(f"seed={seed}")
    gen = torch.Generator().manual_seed(seed)
    # Warm up with the shapes and batch sizes to come (allocator arenas, gRPC buffers).
    channel, client = stub(address)
    with channel:
        warm = [_request(gen, str(i)) for i in range(32)]
        assert len(list(client.ScoreStream(iter(warm), timeout=120))) == len(warm)
    alone = _probe_throughput(address, gen)
    baseline = _rss(proc.pid)

    sampler = _RssSampler(proc.pid)
    sampler.start()
    stalled_channel, stalled_client = stub(address)
    sent = [0]

    def stalled_requests() -> Iterator:
        for i in range(STALLED_REQUESTS):
            sent[0] += 1
            yield _request(gen, str(i))

    call = stalled_client.ScoreStream(
        stalled_requests(), metadata=(("x-client-id", "stalled"),), timeout=300
    )  # never read
    try:
        deadline = time.monotonic() + 120
        while _metric(http_port, "teacher_service_streams_paused") < 1:
            assert time.monotonic() < deadline, (
                f"the stalled stream was never paused; server RSS grew by "
                f"{(_rss(proc.pid) - baseline) / 2**20:.0f} MiB"
            )
            time.sleep(0.05)
        _wait_until_quiet(http_port)  # the stalled stream's last accepted work is done
        during = _probe_throughput(address, gen)
        buffered = _metric(http_port, "teacher_service_stream_buffered_bytes")
        rows = _metric(http_port, "teacher_service_client_tokens_total", {"client": "stalled"})
    finally:
        sampler.stop.set()
        sampler.join(timeout=10)
        call.cancel()
        stalled_channel.close()
    assert not sampler.is_alive()
    growth = sampler.peak - baseline
    print(
        f"RSS {baseline / 2**20:.0f} MiB -> peak +{growth / 2**20:.1f} MiB; stalled client "
        f"sent {sent[0]}, {rows:.0f} rows scored, {buffered / 2**20:.1f} MiB buffered; "
        f"probe {alone:.1f} -> {during:.1f} seq/s"
    )
    assert buffered <= BUFFER + 3 * LENGTH * 4 + LENGTH * TOP_K * 8 + 4096
    # A few MiB of answers also fit in the stalled client's HTTP/2 receive window.
    assert rows <= MAX_STALLED_TAKEN * (LENGTH - 1)
    assert growth <= BUFFER + SLACK
    assert during >= THROUGHPUT_SHARE * alone


@pytest.mark.parametrize("buffer_bytes", [1, 50_000], ids=["1B", "50kB"])
def test_every_answer_arrives_through_a_small_buffer(
    tiny_model_dir: Path, buffer_bytes: int
) -> None:
    """With a buffer smaller than one answer, requests are taken one at a time and all
    are answered correctly; a client that reads slowly loses nothing."""
    server = start_thread_server(("tiny", tiny_model_dir), max_stream_buffer_bytes=buffer_bytes)
    gen = torch.Generator().manual_seed(buffer_bytes)
    sequences = [random_sequence(gen, TINY_VOCAB, min_len=4, max_len=60) for _ in range(40)]
    requests = [
        make_request(ids, start, 8, request_id=str(i)) for i, (ids, start) in enumerate(sequences)
    ]
    try:
        channel, client = stub(server.address)
        with channel:
            responses = []
            for response in client.ScoreStream(iter(requests), timeout=120):
                responses.append(response)
                time.sleep(0.01)  # a slow reader
        assert server.metrics.registry.get_sample_value(
            "teacher_service_stream_buffered_bytes"
        ) == pytest.approx(0)
    finally:
        server.stop()
    assert sorted(int(r.request_id) for r in responses) == list(range(len(requests)))
    ref = Reference.load(tiny_model_dir)
    for response in responses:
        assert response.WhichOneof("outcome") == "result", response.error
        ids, start = sequences[int(response.request_id)]
        want = ref.logprobs(ids, start).gather(1, ids[start:, None])[:, 0]
        got = decode_result(response.result).token_logprobs
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
