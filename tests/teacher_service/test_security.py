"""TLS, mutual TLS and bearer-token auth on the gRPC port, with certificates made here.

A fresh CA signs a server certificate (SAN 127.0.0.1, localhost) and a client
certificate for every test session; another CA's client certificate must be refused.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytest.importorskip("cryptography", reason="cryptography makes the test certificates")

from teacher_service.server import ThreadedServer
from teacher_service.v1 import teacher_pb2 as pb
from teacher_service.v1 import teacher_pb2_grpc as pb_grpc
from tests.pki import Issued, Pki, make_pki
from tests.teacher_service.conftest import TINY_VOCAB, start_thread_server
from tests.teacher_service.wire import make_request, stub


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _score_request() -> pb.ScoreRequest:
    return make_request(torch.randint(0, TINY_VOCAB, (12,)), 5, 3)


def _health(channel: grpc.Channel) -> int:
    request = health_pb2.HealthCheckRequest(service="")
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


TOKEN = secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def tls_token_server(pki: Pki, tiny_model_dir: Path) -> Iterator[ThreadedServer]:
    """TLS (no client certificates) plus a bearer token."""
    server = start_thread_server(
        ("tiny", tiny_model_dir),
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        auth_token=TOKEN,
    )
    try:
        yield server
    finally:
        server.stop()


def _tls_channel(pki: Pki, port: int, client: Issued | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)


def test_tls_with_token_scores(pki: Pki, tls_token_server: ThreadedServer) -> None:
    with _tls_channel(pki, tls_token_server.grpc_port) as channel:
        client = pb_grpc.TeacherServiceStub(channel)
        auth = (("authorization", f"Bearer {TOKEN}"),)
        response = client.Score(_score_request(), metadata=auth, timeout=30)
        assert list(response.topk_ids.shape) == [7, 3]
        streamed = list(client.ScoreStream(iter([_score_request()]), metadata=auth, timeout=30))
        assert streamed[0].WhichOneof("outcome") == "result"


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong-token"),), (("authorization", TOKEN),)],
    ids=["none", "wrong", "no-scheme"],
)
def test_missing_or_wrong_token_is_unauthenticated(
    pki: Pki, tls_token_server: ThreadedServer, metadata: tuple
) -> None:
    with _tls_channel(pki, tls_token_server.grpc_port) as channel:
        client = pb_grpc.TeacherServiceStub(channel)
        for call in (
            lambda: client.Score(_score_request(), metadata=metadata, timeout=30),
            lambda: client.Info(pb.InfoRequest(), metadata=metadata, timeout=30),
            lambda: list(client.ScoreStream(iter([_score_request()]), metadata=metadata)),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization" in caught.value.details()
        # Health checks stay open without a token (probes carry no secrets).
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_client_cannot_talk_to_tls_server(tls_token_server: ThreadedServer) -> None:
    channel, client = stub(tls_token_server.address)
    with channel, pytest.raises(grpc.RpcError) as caught:
        client.Info(pb.InfoRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    pki: Pki, tiny_model_dir: Path
) -> None:
    server = start_thread_server(
        ("tiny", tiny_model_dir),
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca_cert,
    )
    try:
        with _tls_channel(pki, server.grpc_port, pki.client) as channel:
            client = pb_grpc.TeacherServiceStub(channel)
            assert client.Score(_score_request(), timeout=30).topk_ids.shape == [7, 3]
        for wrong in (None, pki.stranger):
            with _tls_channel(pki, server.grpc_port, wrong) as channel:
                client = pb_grpc.TeacherServiceStub(channel)
                with pytest.raises(grpc.RpcError) as caught:
                    client.Info(pb.InfoRequest(), timeout=5)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
