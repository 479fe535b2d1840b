"""Liveness and readiness follow the backend: a torch backend whose forwards keep failing
turns /healthz, /readyz and the gRPC health service unhealthy after
`max_failed_batches` failed batches in a row, and healthy again once a batch succeeds.

The failure is real: the running model's LM head is given a weight of the wrong shape,
so its forward raises inside torch, as a broken device or corrupted weights would.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from teacher_service.backends.health import FailureStreak
from teacher_service.backends.torch_backend import TorchBackend
from teacher_service.config import ServerConfig
from teacher_service.server import build_backend, serve_in_thread
from tests.teacher_service.conftest import TINY_VOCAB, local_config
from tests.teacher_service.wire import make_request, stub

LIMIT = 3


def _probe(port: int, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10)


def _grpc_health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service="teacher_service.v1.TeacherService")
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def _wait_grpc_health(address: str, want: int) -> None:
    deadline = time.monotonic() + 20
    while (status := _grpc_health(address)) != want:
        assert time.monotonic() < deadline, f"gRPC health stayed {status}, want {want}"
        time.sleep(0.05)


def test_failing_forwards_fail_liveness_readiness_and_grpc_health(tiny_model_dir: Path) -> None:
    built: list[TorchBackend] = []

    def factory(config: ServerConfig, index: int) -> TorchBackend:
        backend = build_backend(config, index)
        assert isinstance(backend, TorchBackend)
        built.append(backend)
        return backend

    config = local_config(("tiny", tiny_model_dir), max_failed_batches=LIMIT)
    server = serve_in_thread(config, backend_factory=factory)
    port, address = server.http_port, server.address
    try:
        head = built[0]._model.get_output_embeddings()  # type: ignore[union-attr]
        good = head.weight.data
        assert _probe(port, "/healthz").status_code == 200
        channel, client = stub(address)
        with channel:

            def score() -> grpc.StatusCode:
                ids = torch.randint(0, TINY_VOCAB, (int(torch.randint(8, 40, ())),))
                try:
                    client.Score(make_request(ids, 4, 3), timeout=30)
                except grpc.RpcError as err:
                    return err.code()
                return grpc.StatusCode.OK

            head.weight.data = torch.randn(7, 5)  # every forward now raises in F.linear
            for failed in range(1, LIMIT + 1):
                assert score() == grpc.StatusCode.INTERNAL
                live, ready = _probe(port, "/healthz"), _probe(port, "/readyz")
                if failed < LIMIT:  # one failure is not a verdict
                    assert (live.status_code, ready.status_code) == (200, 200), failed
            assert live.status_code == 503 and ready.status_code == 503
            for body in (live.text, ready.text):
                assert "teacher tiny" in body and f"{LIMIT} batches in a row failed" in body
                assert "RuntimeError" in body  # the last error, named
            _wait_grpc_health(address, health_pb2.HealthCheckResponse.NOT_SERVING)

            head.weight.data = good  # the device recovers: one good batch ends the streak
            assert score() == grpc.StatusCode.OK
            assert _probe(port, "/healthz").status_code == 200
            assert _probe(port, "/readyz").text.strip() == "ready"
            _wait_grpc_health(address, health_pb2.HealthCheckResponse.SERVING)
    finally:
        server.stop()


def test_failure_streak_counts_only_consecutive_failures() -> None:
    streak = FailureStreak(limit=2, backend="torch")
    streak.failed(RuntimeError("a"))
    streak.succeeded()
    streak.failed(RuntimeError("b"))
    assert streak.reason() is None
    streak.failed(ValueError("c" * 1000))
    reason = streak.reason()
    assert reason is not None and "2 batches in a row" in reason and "ValueError" in reason
    assert len(reason) < 400  # the error text is bounded
    with pytest.raises(ValueError, match="max_failed_batches"):
        FailureStreak(limit=0)


def test_max_failed_batches_flag() -> None:
    from teacher_service.config import parse_args

    assert parse_args(["--model", "m", "--max-failed-batches", "5"]).max_failed_batches == 5
    assert parse_args(["--model", "m"]).max_failed_batches == 3
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--max-failed-batches", "0"])
